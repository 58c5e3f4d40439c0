"""Generate the ``serveConfigV2`` of ``cluster/kuberay/rayservice.yaml`` from ``deployments/serve.yaml``.

    python -m cluster.render           # rewrite the block in rayservice.yaml
    python -m cluster.render --check   # exit 1 if the committed file is out of date

Only the ``serveConfigV2: |`` block scalar of the RayService is generated; the rest of the
manifest (cluster, image, secrets) is written by hand. The Serve config is parsed, checked
with Ray's own ``ServeDeploySchema`` and written back as plain YAML (comments dropped, key
order kept), so the RayService serves exactly what ``serve deploy deployments/serve.yaml`` would.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO / "deployments" / "serve.yaml"
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice.yaml"
KEY = "serveConfigV2: |"
REGENERATE = "python -m cluster.render"


class RenderError(Exception):
    """The Serve config or the RayService manifest cannot be rendered; the message says why."""


def load_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    """The Serve config as data, validated with Ray's ServeDeploySchema."""
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise RenderError(f"{path} is not a Serve config (a mapping with applications:)")
    # pydantic's ValidationError names the field; Ray's schema also refuses a runtime_env whose
    # working_dir or py_modules is a local path, which pods could not see
    ServeDeploySchema.model_validate(data)
    return data


def render_block(config: dict[str, Any], indent: str = "  ") -> str:
    """The ``serveConfigV2: |`` line and its indented block, ending with a newline."""
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=120)
    lines = [indent + KEY] + [(indent * 2 + line) if line else "" for line in body.splitlines()]
    return "\n".join(lines) + "\n"


def render_manifest(manifest: str, config: dict[str, Any]) -> str:
    """``manifest`` with its serveConfigV2 block replaced by one rendered from ``config``."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == KEY]
    if len(starts) != 1:
        raise RenderError(f"expected one '{KEY}' line in the RayService manifest, found {len(starts)}")
    start = starts[0]
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    end = start + 1
    # the block runs while lines are blank or indented deeper than the key
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(indent + " ")):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines after the block stay outside it
        end -= 1
    return "".join(lines[:start]) + render_block(config, indent or "  ") + "".join(lines[end:])


def render(serve_config: Path = SERVE_CONFIG, rayservice: Path = RAYSERVICE) -> str:
    """The RayService manifest as it should be committed."""
    return render_manifest(rayservice.read_text(), load_serve_config(serve_config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.render", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if rayservice.yaml is out of date")
    args = parser.parse_args(argv)
    try:
        fresh = render()
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    current = RAYSERVICE.read_text()
    if args.check:
        if fresh != current:
            print(f"{RAYSERVICE.relative_to(REPO)} is out of date: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    if fresh != current:
        RAYSERVICE.write_text(fresh)
        print(f"wrote {RAYSERVICE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
