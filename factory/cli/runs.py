"""Run commands: ``validate``, ``run``, ``resume``, ``cancel``, ``runs``, ``status``, ``logs``,
``events``. Each works on a :class:`~factory.cli.backend.Backend`, so each means the same on
this machine's state and with ``--api URL``."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from factory.approvals import Decision
from factory.cli.backend import Backend, RunInfo, RunWaitTimeout, Watch
from factory.cli.output import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_TIMEOUT,
    EXIT_WAITING,
    cli_settings,
    err,
    fail,
    open_backend,
    out,
)
from factory.costs import Usage, cost_text, price_table, total_usage, usage_of
from factory.engine import Progress as RunProgress
from factory.engine import RunResult
from factory.errors import FactoryError, WorkflowValidationError
from factory.limits import DocumentLimits, check_inputs
from factory.safeyaml import DocumentRefused, read_input_value
from factory.spec import Budget
from factory.store import RunStatus

RUN_ID = re.compile(r"^[0-9a-f]{12}$")
STATUS_STYLE = {
    "succeeded": "green",
    "running": "cyan",
    "retrying": "yellow",
    "waiting": "bold yellow",
    "failed": "red",
    "cancelled": "magenta",
    "skipped": "dim",
    "pending": "dim",
}

BUDGET_OPTION = typer.Option(
    "--budget",
    help=(
        "A limit the run stops at: NAME=VALUE with NAME max_seconds, max_steps, max_attempts, max_tokens or "
        "max_cost_usd (the max_ may be left out). Repeatable; replaces the workflow's own limit of that name."
    ),
)


def parse_budget(items: list[str] | None) -> Budget | None:
    """The --budget options, or None; a bad one ends the command (exit 2) saying what to fix."""
    if not items:
        return None
    try:
        return Budget.parse(items)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise fail(f"--budget {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    except ValueError as exc:
        raise fail(str(exc)) from None


AGENTS_OPTION = typer.Option("--agents", help="Agent catalogue (agents.yaml) serving the agent: and route: steps.")
TIMEOUT_OPTION = typer.Option(
    "--timeout",
    min=0.001,
    help="Stop waiting after this many seconds and exit 3. With --api the run goes on on the server; "
    "locally it runs in this process and is cancelled (`factory resume` finishes it).",
)


@contextmanager
def using_backend() -> Iterator[Backend]:
    """The command's backend; its errors end the command with a message and an exit code:
    2 for what the user can fix (a bad workflow, an unknown run, a refused key), 3 at --timeout."""
    backend = open_backend()
    try:
        yield backend
    except WorkflowValidationError as exc:
        source = f" {exc.source}" if exc.source else ""
        err.print(f"[red]invalid[/red]{escape(source)}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            err.print(f"  - {escape(problem)}")
        raise typer.Exit(EXIT_INVALID) from None
    except RunWaitTimeout as exc:
        raise fail(str(exc), EXIT_TIMEOUT) from None
    except FactoryError as exc:
        raise fail(str(exc)) from None
    finally:
        backend.close()


def parse_inputs(pairs: list[str], limits: DocumentLimits | None = None) -> dict[str, Any]:
    """``key=value`` pairs; values are read as YAML scalars (``n=6`` is an integer, ``2024-01-01``
    stays a string) and must be JSON data within ``limits`` (default: the default DocumentLimits)."""
    limits = limits or DocumentLimits()
    inputs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="--input")
        try:
            value = read_input_value(raw, limits) if raw.strip() else ""
        except DocumentRefused as exc:
            raise typer.BadParameter(f"{key.strip()}: {exc.problem}", param_hint="--input") from None
        inputs[key.strip()] = value
    try:
        return check_inputs(inputs, limits)
    except WorkflowValidationError as exc:
        raise typer.BadParameter("; ".join(exc.problems), param_hint="--input") from None


def document_limits() -> DocumentLimits:
    """The bounds on workflow documents and inputs from the settings (an invalid setting: exit 2)."""
    try:
        return DocumentLimits.from_settings(cli_settings())
    except FactoryError as exc:
        raise fail(str(exc)) from None


def short(value: Any, width: int = 100) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def status_text(info: RunInfo) -> str:
    status = info.record.status.value
    if info.stalled:
        return f"[yellow]{status} (coordinator gone: `factory resume {escape(info.record.id)}`)[/yellow]"
    return f"[{STATUS_STYLE.get(status, '')}]{status}[/]"


# Events after which a step's own progress line goes: it ended, or waits to retry.
STEP_ENDS = frozenset(
    {"step.succeeded", "step.cached", "step.failed", "step.skipped", "step.cancelled", "step.retrying"}
)


class ProgressBar:
    """Live progress bar on stderr: done/total, running, retrying, failed."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and err.is_terminal
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=err,
            transient=False,
        )
        self.task: Any = None
        self.step_tasks: dict[str, Any] = {}  # a running step that reports progress: its own line

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, p: RunProgress) -> None:
        if not self.enabled:
            return
        detail = f"running {p.running}  retrying {p.retrying}  failed {p.failed}"
        if p.skipped:
            detail += f"  skipped {p.skipped}"
        if p.items_total:
            detail += f"  items {p.items_done}/{p.items_total}"
        if self.task is None:
            self.task = self.progress.add_task("steps", total=p.total, detail=detail)
        self.progress.update(self.task, total=max(p.total, 1), completed=p.succeeded, detail=detail)

    def event(self, event: dict[str, Any]) -> None:
        """A step's ``step.progress`` gives it a line of its own (fraction, message) until it ends."""
        if not self.enabled:
            return
        kind, step = event.get("type"), event.get("step_id")
        if not isinstance(step, str):
            return
        if kind == "step.progress":
            data = event.get("data") or {}
            fraction = data.get("fraction")
            total = 100 if isinstance(fraction, int | float) else None
            completed = round(100 * fraction) if isinstance(fraction, int | float) else 0
            detail = escape(str(data.get("message") or ""))[:80]
            task = self.step_tasks.get(step)
            if task is None:
                self.step_tasks[step] = self.progress.add_task(
                    f"  {escape(step)}", total=total, completed=completed, detail=detail
                )
            else:
                self.progress.update(task, total=total, completed=completed, detail=detail)
        elif kind in STEP_ENDS and step in self.step_tasks:
            self.progress.remove_task(self.step_tasks.pop(step))


def watch_with(bar: ProgressBar, as_json: bool, verb: str, timeout: float | None) -> Watch:
    def started(run_id: str) -> None:
        err.print(f"run [bold]{escape(run_id)}[/bold] {verb}")

    return Watch(
        on_start=None if as_json else started,
        on_progress=bar.update,
        on_event=bar.event if bar.enabled else None,
        timeout=timeout,
    )


def print_result(result: RunResult, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
        return
    table = Table(title=f"outputs of run {escape(result.run_id)}", show_lines=False)
    table.add_column("step")
    table.add_column("output", overflow="fold")
    for step_id, value in result.outputs.items():
        table.add_row(escape(step_id), escape(short(value, 160)))
    out.print(table)
    style = STATUS_STYLE.get(result.status.value, "")
    out.print(f"run {escape(result.run_id)}: [{style}]{result.status.value}[/]")
    if result.status == RunStatus.WAITING:
        out.print(
            f"it waits for a decision: [bold]factory approve {escape(result.run_id)} STEP[/] (or --reject); "
            f"`factory status {escape(result.run_id)}` shows which steps wait"
        )
    if result.error:
        out.print(f"[red]{escape(result.error)}[/red]")
        out.print(f"details: factory logs {escape(result.run_id)}")


def exit_code(result: RunResult) -> int:
    """0 succeeded, 4 waiting at approval gates, 1 otherwise."""
    if result.ok:
        return 0
    return EXIT_WAITING if result.status == RunStatus.WAITING else EXIT_FAILED


def validate(
    workflow: Annotated[Path, typer.Argument(help="Workflow YAML file.")],
    input: Annotated[
        list[str] | None, typer.Option("--input", "-i", help="Check an input too: key=value. Repeatable.")
    ] = None,
    agents: Annotated[Path | None, AGENTS_OPTION] = None,
) -> None:
    """Check a workflow: every problem at once, each naming its step and field. Exit 0 if valid, 2 if not.

    With --api, the server checks it as a submission of your key: python modules it does not
    allow and secrets not granted to the key are problems too."""
    inputs = parse_inputs(input or [], document_limits())
    with using_backend() as backend:
        checked = backend.validate(workflow, inputs, agents)
    out.print(f"[green]valid[/green]: {escape(checked.name)} ({len(checked.steps)} steps)")


def run_cmd(
    workflow: Annotated[Path, typer.Argument(help="Workflow YAML file.")],
    input: Annotated[
        list[str] | None,
        typer.Option(
            "--input", "-i", help="Override an input: key=value (value read as YAML: n=6 is an integer). Repeatable."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: run_id, status, outputs, error.")
    ] = False,
    agents: Annotated[Path | None, AGENTS_OPTION] = None,
    timeout: Annotated[float | None, TIMEOUT_OPTION] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id", help="Give the run this id (12 hex digits; `factory submit` does, to follow its job's run)."
        ),
    ] = None,
    budget: Annotated[list[str] | None, BUDGET_OPTION] = None,
) -> None:
    """Run a workflow with a live progress bar (a step that reports progress gets a line of its own).
    Exit 0 on success, 1 if the run failed, 3 at --timeout, 4 when it waits at approval gates
    (see `factory approve`).

    Locally it runs on Ray from this process; with --api the server runs it and this command follows it."""
    inputs = parse_inputs(input or [], document_limits())
    if run_id is not None and not RUN_ID.match(run_id):
        raise fail(f"--run-id {run_id!r}: a run id is 12 lowercase hex digits")
    bar = ProgressBar(enabled=not as_json)
    watch = watch_with(bar, as_json, "started", timeout)
    watch.run_id = run_id
    limits = parse_budget(budget)
    with using_backend() as backend, bar:
        result = backend.run(workflow, inputs, agents, watch, limits)
    print_result(result, as_json)
    raise typer.Exit(exit_code(result))


def resume(
    run_id: Annotated[str, typer.Argument(help="Run id (see `factory runs`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    agents: Annotated[Path | None, AGENTS_OPTION] = None,
    timeout: Annotated[float | None, TIMEOUT_OPTION] = None,
    budget: Annotated[list[str] | None, BUDGET_OPTION] = None,
) -> None:
    """Finish an interrupted, failed or cancelled run and follow it to its end; steps that
    committed their output do not run again. A run stopped at its budget continues with
    --budget (what it used so far still counts). Exit codes as for `factory run`."""
    limits = parse_budget(budget)
    bar = ProgressBar(enabled=not as_json)
    with using_backend() as backend, bar:
        result = backend.resume(run_id, agents, watch_with(bar, as_json, "resumed", timeout), limits)
    print_result(result, as_json)
    raise typer.Exit(exit_code(result))


def approve(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    step: Annotated[str, typer.Argument(help="The approval step (gate) that waits.")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead of approving.")] = False,
    comment: Annotated[str, typer.Option("--comment", "-m", help="Why (recorded and shown with the decision).")] = "",
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Record the decision and return; do not follow the run.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: decision, then the run's result.")
    ] = False,
    timeout: Annotated[float | None, TIMEOUT_OPTION] = None,
    agents: Annotated[Path | None, AGENTS_OPTION] = None,
) -> None:
    """Decide at an approval gate that waits: approve (or --reject) with a --comment.

    The decision is recorded (who, when, why) and is the step's output. A run parked at its gates
    then goes on: locally in this process (with a progress bar; exit codes as for `factory run`),
    with --api on the server, followed here. A run whose coordinator still runs takes the decision
    itself; then, and with --no-wait, the command returns at once (exit 0)."""
    decision = Decision(run_id=run_id, step_id=step, approved=not reject, comment=comment)
    bar = ProgressBar(enabled=not as_json and not no_wait)
    watch = None if no_wait else watch_with(bar, as_json, "goes on", timeout)
    with using_backend() as backend, bar:
        record, result = backend.approve(decision, watch, agents)
    verb = "approved" if record.approved else "rejected"
    if as_json:
        data = {"decision": record.model_dump(mode="json"), "result": result.to_dict() if result else None}
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
        raise typer.Exit(exit_code(result) if result else 0)
    out.print(f"gate {escape(step)} of run {escape(run_id)}: [bold]{verb}[/] by {escape(record.by)}")
    if result is None:
        raise typer.Exit(0)
    print_result(result, False)
    raise typer.Exit(exit_code(result))


def cancel(run_id: Annotated[str, typer.Argument(help="Run id.")]) -> None:
    """Ask a running run to stop: attempts in flight are stopped, unfinished steps are cancelled."""
    with using_backend() as backend:
        requested = backend.cancel(run_id)
    if requested:
        out.print(f"cancel requested for run {escape(run_id)}")
    else:
        out.print(f"run {escape(run_id)} has already finished; nothing to cancel")


def runs(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="How many, newest first.")] = 20,
    status: Annotated[RunStatus | None, typer.Option(help="Only runs with this status.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List runs, newest first."""
    with using_backend() as backend:
        infos = backend.list_runs(limit, status)
    if as_json:
        rows = [{**i.record.model_dump(mode="json", exclude=_HIDDEN), "stalled": i.stalled} for i in infos]
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table()
    for column in ("run", "workflow", "status", "created", "finished", "error"):
        table.add_column(column)
    for info in infos:
        r = info.record
        table.add_row(
            escape(r.id),
            escape(r.workflow_name),
            status_text(info),
            when(r.created_at),
            when(r.finished_at),
            escape((r.error or "")[:80]),
        )
    out.print(table)


# store-side fields a command does not show the same way everywhere (the API does not expose them)
_HIDDEN = {"spec_json", "owner", "heartbeat_at", "cancel_requested", "grants"}


def tokens_text(usage: Usage | None) -> str:
    if usage is None:
        return ""
    return f"{usage.input_tokens} in / {usage.output_tokens} out"


def step_costs(usages: list[Usage | None]) -> list[str]:
    """Each step's estimated cost, as text."""
    return ["" if u is None else cost_text(u.cost_usd, u.unpriced_models) for u in usages]


def status(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A run and its steps: status, attempts, duration, error."""
    with using_backend() as backend:
        info = backend.get_run(run_id)
    record, steps = info.record, info.steps
    if as_json:
        data = {**record.model_dump(mode="json", exclude=_HIDDEN), "stalled": info.stalled}
        data["spent"] = info.spent.model_dump(mode="json") if info.spent is not None else None
        data["steps"] = [
            {**s.model_dump(mode="json", exclude={"output_json", "run_id"}), "output": s.output} for s in steps
        ]
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
        return
    out.print(f"run [bold]{escape(record.id)}[/bold]  workflow {escape(record.workflow_name)}  {status_text(info)}")
    out.print(f"created {when(record.created_at)}  finished {when(record.finished_at)}")
    if record.error:
        out.print(f"[red]{escape(record.error)}[/red]")
    # the prices of this command's settings (model_prices); tokens from the outputs committed
    prices = price_table(cli_settings().model_prices)
    outputs = [s.output if s.output_json is not None else None for s in steps]
    usages = [usage_of(output, prices) for output in outputs]
    total = total_usage(outputs, prices)
    with_tokens = total is not None
    costs = step_costs(usages)
    table = Table()
    usage_columns = ("tokens", "est. cost") if with_tokens else ()
    columns = ("step", "status", "attempts", "seconds", *usage_columns, "output / error")
    for column in columns:
        table.add_column(column, overflow="fold")
    for s, usage, cost in zip(steps, usages, costs, strict=True):
        seconds = f"{s.finished_at - s.started_at:.3f}" if s.finished_at and s.started_at else "-"
        style = STATUS_STYLE.get(s.status.value, "")
        label = s.status.value + (" (cached)" if s.cached else "")
        if s.items_total and s.status.value not in ("succeeded", "skipped"):
            label += f" {s.items_done}/{s.items_total} items"
        detail = s.error if s.error else (short(s.output, 80) if s.output_json is not None else "")
        tokens = (tokens_text(usage), cost) if with_tokens else ()
        table.add_row(
            escape(s.step_id), f"[{style}]{label}[/]", str(s.attempts), seconds, *tokens, escape(detail or "")
        )
    out.print(table)
    if total is not None:
        out.print(
            f"tokens: {tokens_text(total)} (steps that succeeded), "
            f"estimated cost {cost_text(total.cost_usd, total.unpriced_models)}",
            highlight=False,
        )
        if total.unpriced_models:
            out.print(
                f"no price for {', '.join(total.unpriced_models)}: set model_prices (FACTORY_MODEL_PRICES) to "
                "estimate it",
                highlight=False,
            )
    spent = info.spent
    if spent is not None and (spent.tokens or spent.cost_usd):
        out.print(
            f"spent in all {spent.attempts} attempt(s), failed ones included: {spent.tokens} tokens, "
            f"estimated cost {cost_text(spent.cost_usd, spent.unpriced_models)} (what its budgets count)",
            highlight=False,
        )


def logs(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    step: Annotated[str | None, typer.Argument(help="Only this step.")] = None,
) -> None:
    """What each attempt printed or logged, and the traceback of each failure."""
    with using_backend() as backend:
        attempts = backend.attempts(run_id, step)
    if not attempts:
        out.print("no finished attempts yet" + (f" for step {escape(step)}" if step else ""))
        return
    for a in attempts:
        style = STATUS_STYLE.get(a.status.value, "")
        duration = f"{a.duration:.3f}s" if a.duration is not None else "-"
        out.print(f"[bold]── {escape(a.step_id)} attempt {a.attempt}[/bold] [{style}]{a.status.value}[/] {duration}")
        if a.error:
            out.print(f"[red]{escape(a.error)}[/red]")
        if a.logs:
            out.print(escape(a.logs.rstrip("\n")), highlight=False)


def events(
    run_id: Annotated[str | None, typer.Argument(help="Only this run's events.")] = None,
    after: Annotated[int, typer.Option(min=0, help="Start after this event id.")] = 0,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Keep printing new events (until the run ends, if one is named)."),
    ] = False,
) -> None:
    """Print events as JSON lines, from an event id on."""
    try:
        with using_backend() as backend:
            for data in backend.events(run_id, after, follow):
                sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command("run")(run_cmd)
    app.command()(resume)
    app.command()(approve)
    app.command()(cancel)
    app.command()(runs)
    app.command()(status)
    app.command()(logs)
    app.command()(events)
