"""Near copies of evaluation tasks in what the Factory ships.

    python -m benchmarks.leakage [--embedding] [--extra-tasks FILE.tsv ...]

Nothing the router ships (the intent corpus, the lexicon, the example catalogues, the
built-in agents' examples, the llm scorer's prompt) may contain a task of an evaluation
set or a close paraphrase of one: it would be tuning on the test. A shipped text is a
*near copy* of a task when their word 3-grams overlap with Jaccard >= 0.5, or (with
``--embedding``) when their all-MiniLM-L6-v2 embeddings have cosine >= 0.92. Exit 1 when
any pair is found, listing each with both sources.

The evaluation tasks are every ``*.tsv`` under benchmarks/data and the shared datasets
folder beside the project (``../shared/datasets``), read from their ``description``
column (or ``text``).
"""

from __future__ import annotations

import argparse
import ast
import csv
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
JACCARD_LIMIT = 0.5
COSINE_LIMIT = 0.92

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@dataclass(frozen=True)
class Text:
    source: str  # file:line or file:field
    text: str


@dataclass(frozen=True)
class NearCopy:
    shipped: Text
    task: Text
    how: str  # "jaccard 0.62" or "cosine 0.95"


def trigrams(text: str) -> set[tuple[str, ...]]:
    tokens = _WORD.findall(text.lower())
    if len(tokens) < 3:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)}


def jaccard(a: set[tuple[str, ...]], b: set[tuple[str, ...]]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def _tsv_texts(path: Path, columns: Sequence[str]) -> list[Text]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        column = next((c for c in columns if c in (reader.fieldnames or [])), None)
        if column is None:
            return []
        return [Text(f"{path}:{n + 2}", row[column]) for n, row in enumerate(reader) if row.get(column)]


def _catalog_texts(path: Path) -> list[Text]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    found: list[Text] = []
    for agent in data.get("agents") or []:
        for n, example in enumerate(agent.get("examples") or []):
            found.append(Text(f"{path}:{agent.get('name')}.examples[{n}]", str(example)))
        if agent.get("description"):
            found.append(Text(f"{path}:{agent.get('name')}.description", str(agent["description"])))
    return found


def _python_strings(path: Path) -> list[Text]:
    """String literals of a module with at least four words (examples, prompts)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        Text(f"{path}:{node.lineno}", node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value.split()) >= 4
    ]


def shipped_texts(repo: Path = REPO) -> list[Text]:
    """What the Factory ships that a router reads or shows as an example of a task."""
    texts = _tsv_texts(repo / "factory" / "routing" / "data" / "intents.tsv", ["text"])
    for catalogue in sorted((repo / "examples").glob("*/agents.yaml")):
        texts += _catalog_texts(catalogue)
    for module in [*sorted((repo / "agents").glob("*.py")), *sorted((repo / "factory" / "routing").glob("*.py"))]:
        texts += _python_strings(module)
    return texts


def evaluation_tasks(extra: Iterable[Path] = (), repo: Path = REPO) -> list[Text]:
    files = sorted((repo / "benchmarks" / "data").rglob("*.tsv"))
    if SHARED_DATASETS.is_dir():
        files += sorted(SHARED_DATASETS.rglob("*.tsv"))
    files += list(extra)
    tasks: list[Text] = []
    for path in files:
        tasks += _tsv_texts(path, ["description", "text"])
    return tasks


def lexical_near_copies(shipped: Sequence[Text], tasks: Sequence[Text], limit: float = JACCARD_LIMIT) -> list[NearCopy]:
    task_grams = [(task, trigrams(task.text)) for task in tasks]
    index: dict[tuple[str, ...], list[int]] = {}
    for i, (_, grams) in enumerate(task_grams):
        for gram in grams:
            index.setdefault(gram, []).append(i)
    found: list[NearCopy] = []
    for text in shipped:
        grams = trigrams(text.text)
        candidates = {i for gram in grams for i in index.get(gram, [])}
        for i in sorted(candidates):
            task, other = task_grams[i]
            score = jaccard(grams, other)
            if score >= limit:
                found.append(NearCopy(text, task, f"jaccard {score:.2f}"))
    return found


def embedding_near_copies(
    shipped: Sequence[Text], tasks: Sequence[Text], model_dir: Path | None = None, limit: float = COSINE_LIMIT
) -> list[NearCopy]:
    import numpy as np

    from factory.models.minilm import load_encoder

    encoder = load_encoder(model_dir)
    a = np.asarray(encoder.encode([t.text for t in shipped]), dtype=np.float32)
    b = np.asarray(encoder.encode([t.text for t in tasks]), dtype=np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-12
    b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-12
    found: list[NearCopy] = []
    for start in range(0, len(a), 512):
        sims = a[start : start + 512] @ b.T
        for i, j in zip(*np.nonzero(sims >= limit), strict=True):
            found.append(NearCopy(shipped[start + int(i)], tasks[int(j)], f"cosine {float(sims[i, j]):.3f}"))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedding", action="store_true", help="Also compare embeddings (needs the model).")
    parser.add_argument("--model-path", type=Path, default=None, help="all-MiniLM-L6-v2's folder.")
    parser.add_argument("--extra-tasks", type=Path, nargs="*", default=[], help="More evaluation TSV files.")
    args = parser.parse_args(argv)
    shipped, tasks = shipped_texts(), evaluation_tasks(args.extra_tasks)
    found = lexical_near_copies(shipped, tasks)
    if args.embedding:
        found += embedding_near_copies(shipped, tasks, args.model_path)
    print(f"{len(shipped)} shipped texts, {len(tasks)} evaluation tasks: {len(found)} near copies")
    for near in found:
        print(f"  {near.how}\n    shipped {near.shipped.source}: {near.shipped.text}")
        print(f"    task    {near.task.source}: {near.task.text}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
