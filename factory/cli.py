"""The ``factory`` command line."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from factory import api
from factory.auth import Scope
from factory.cli_output import API_OPTIONS, EXIT_FAILED, EXIT_INVALID, api_client, err, out
from factory.cli_output import fail as _fail
from factory.client import FactoryClient
from factory.dag import load_workflow
from factory.engine import Progress as RunProgress
from factory.engine import RunResult
from factory.errors import FactoryError, WorkflowValidationError
from factory.limits import DocumentLimits, check_inputs
from factory.safeyaml import DocumentRefused, read_input_value
from factory.settings import get_settings, use_config_file
from factory.store import ApiKeyRecord, RunRecord, RunStatus, StepRecord

app = typer.Typer(
    help=(
        "The Factory: durable AI workflows on Ray.\n\n"
        "State lives in SQLite under $FACTORY_HOME (default ~/.factory), or where FACTORY_STORE_URL says "
        "(postgresql://...). Ray: the cluster in RAY_ADDRESS, else a running local one, else a new local Ray. "
        "`factory config` shows the effective settings."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global_options(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML settings file (else FACTORY_CONFIG); FACTORY_* variables override it."),
    ] = None,
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api", help="Use the Factory's HTTP API at this URL instead of local state (else FACTORY_API_URL)."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="API key for --api (else FACTORY_API_KEY).", show_default=False)
    ] = None,
) -> None:
    if config is not None:
        try:
            use_config_file(config)
        except FactoryError as exc:
            raise _fail(str(exc)) from None
    API_OPTIONS["url"], API_OPTIONS["key"] = api_url, api_key


def _api_client() -> FactoryClient | None:
    return api_client()


def _record_from_api(view: dict[str, Any]) -> RunRecord:
    """A run as the API shows it, in the shape the local commands print."""
    return RunRecord(
        id=view["id"],
        workflow_name=view["workflow"],
        status=view["status"],
        spec_json="",
        inputs=view["inputs"],
        error=view["error"],
        created_at=view["created_at"],
        started_at=view["started_at"],
        finished_at=view["finished_at"],
    )


def _run_via_api(client: FactoryClient, workflow: Path, inputs: dict[str, Any], as_json: bool) -> None:
    """`factory run --api`: submit, follow the events with the progress bar, print the outputs."""
    try:
        run_id = client.submit(workflow, inputs)
        if not as_json:
            err.print(f"run [bold]{escape(run_id)}[/bold] submitted to {escape(str(client.http.base_url))}")
        bar = _Bar(enabled=not as_json)
        counts = RunProgress(total=0)
        with bar:
            for event in client.events(run_id):
                kind = event["type"]
                if kind == "step.created":
                    counts.total += 1
                elif kind == "step.succeeded" or kind == "step.cached":
                    counts.succeeded += 1
                elif kind == "step.failed":
                    counts.failed += 1
                bar.update(counts)
                if kind in ("run.succeeded", "run.failed", "run.cancelled"):
                    break
        run = client.get_run(run_id)
    except FactoryError as exc:
        raise _fail(str(exc)) from None
    outputs = {s["step_id"]: s["output"] for s in run.get("steps") or [] if s["status"] == "succeeded"}
    result = RunResult(run_id, RunStatus(run["status"]), outputs, run.get("error"))
    _print_result(result, as_json)
    raise typer.Exit(0 if result.ok else EXIT_FAILED)


STATUS_STYLE = {
    "succeeded": "green",
    "running": "cyan",
    "retrying": "yellow",
    "failed": "red",
    "cancelled": "magenta",
    "skipped": "dim",
    "pending": "dim",
}


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


def _document_limits() -> DocumentLimits:
    """The bounds on workflow documents and inputs from the settings (an invalid setting: exit 2)."""
    try:
        return DocumentLimits.from_settings(get_settings())
    except FactoryError as exc:
        raise _fail(str(exc)) from None


def _short(value: Any, width: int = 100) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _status_text(record: RunRecord) -> str:
    status = record.status.value
    settings = get_settings()
    if record.status == RunStatus.RUNNING and (record.heartbeat_at or 0) < time.time() - settings.lease_seconds:
        return f"[yellow]{status} (coordinator gone: `factory resume {record.id}`)[/yellow]"
    return f"[{STATUS_STYLE.get(status, '')}]{status}[/]"


class _Bar:
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

    def __enter__(self) -> _Bar:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()

    def started(self, run_id: str) -> None:
        err.print(f"run [bold]{run_id}[/bold] started")

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
        self.progress.update(self.task, completed=p.succeeded, detail=detail)


def _print_result(result: RunResult, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
        return
    table = Table(title=f"outputs of run {result.run_id}", show_lines=False)
    table.add_column("step")
    table.add_column("output", overflow="fold")
    for step_id, value in result.outputs.items():
        table.add_row(step_id, escape(_short(value, 160)))
    out.print(table)
    style = STATUS_STYLE.get(result.status.value, "")
    out.print(f"run {result.run_id}: [{style}]{result.status.value}[/]")
    if result.error:
        out.print(f"[red]{escape(result.error)}[/red]")
        out.print(f"details: factory logs {result.run_id}")


@app.command()
def validate(
    workflow: Annotated[Path, typer.Argument(help="Workflow YAML file.")],
) -> None:
    """Check a workflow: every problem at once, each naming its step and field. Exit 0 if valid, 2 if not."""
    limits = _document_limits()
    try:
        wf = load_workflow(workflow, limits=limits)
    except WorkflowValidationError as exc:
        err.print(f"[red]invalid workflow[/red] {escape(str(workflow))}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            err.print(f"  - {escape(problem)}")
        raise typer.Exit(EXIT_INVALID) from None
    out.print(f"[green]valid[/green]: {escape(wf.name)} ({len(wf.steps)} steps)")


@app.command("run")
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
    agents: Annotated[
        Path | None,
        typer.Option("--agents", help="Agent catalogue (agents.yaml) serving the agent: and route: steps."),
    ] = None,
) -> None:
    """Run a workflow on Ray with a live progress bar. Exit 0 on success, 1 if the run failed."""
    client = _api_client()
    limits = _document_limits()
    if client is not None:
        _run_via_api(client, workflow, parse_inputs(input or [], limits), as_json)
    from factory.catalog import load_catalog

    try:
        inputs = parse_inputs(input or [], limits)
        catalog = load_catalog(agents) if agents is not None else None
        wf = load_workflow(workflow, agents=catalog, limits=limits)
    except WorkflowValidationError as exc:
        err.print(
            f"[red]invalid {'workflow' if exc.source != str(agents) else 'agent catalogue'}[/red] "
            f"{escape(str(exc.source or workflow))}:"
        )
        for problem in exc.problems:
            err.print(f"  - {escape(problem)}")
        raise typer.Exit(EXIT_INVALID) from None
    bar = _Bar(enabled=not as_json)
    try:
        with bar:
            result = api.run(
                wf, inputs, on_progress=bar.update, on_start=None if as_json else bar.started, agents=agents
            )
    except WorkflowValidationError as exc:
        raise _fail(str(exc)) from None
    except FactoryError as exc:
        raise _fail(str(exc)) from None
    _print_result(result, as_json)
    raise typer.Exit(0 if result.ok else EXIT_FAILED)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="Run id (see `factory runs`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    agents: Annotated[
        Path | None,
        typer.Option("--agents", help="Agent catalogue (agents.yaml) serving the agent: and route: steps."),
    ] = None,
) -> None:
    """Finish an interrupted, failed or cancelled run; steps that committed their output do not run again."""
    client = _api_client()
    if client is not None:
        try:
            accepted = client.resume(run_id)
        except FactoryError as exc:
            raise _fail(str(exc)) from None
        out.print(
            f"run {run_id}: {accepted['status']} ({accepted['detail']}); follow it with `factory events {run_id} -f`"
        )
        return
    bar = _Bar(enabled=not as_json)
    try:
        with bar:
            result = api.resume(run_id, on_progress=bar.update, agents=agents)
    except FactoryError as exc:
        raise _fail(str(exc)) from None
    _print_result(result, as_json)
    raise typer.Exit(0 if result.ok else EXIT_FAILED)


@app.command()
def cancel(run_id: Annotated[str, typer.Argument(help="Run id.")]) -> None:
    """Ask a running run to stop: attempts in flight are stopped, unfinished steps are cancelled."""
    client = _api_client()
    try:
        if client is not None:
            client.cancel(run_id)
            requested = True
        else:
            requested = api.cancel(run_id)
    except FactoryError as exc:
        raise _fail(str(exc)) from None
    if requested:
        out.print(f"cancel requested for run {escape(run_id)}")
    else:
        out.print(f"run {escape(run_id)} has already finished; nothing to cancel")


@app.command()
def runs(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    status: Annotated[RunStatus | None, typer.Option(help="Only runs with this status.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List runs, newest first."""
    client = _api_client()
    if client is not None:
        try:
            page = client.list_runs(status.value if status else None, limit)
        except FactoryError as exc:
            raise _fail(str(exc)) from None
        records = [_record_from_api(r) for r in page["runs"]]
    else:
        store = api.store_for()
        try:
            records = store.list_runs(limit, status)
        finally:
            store.close()
    if as_json:
        sys.stdout.write(json.dumps([r.model_dump(mode="json", exclude={"spec_json"}) for r in records]) + "\n")
        return
    table = Table()
    for column in ("run", "workflow", "status", "created", "finished", "error"):
        table.add_column(column)
    for r in records:
        table.add_row(
            escape(r.id),
            escape(r.workflow_name),
            _status_text(r),
            _when(r.created_at),
            _when(r.finished_at),
            escape((r.error or "")[:80]),
        )
    out.print(table)


@app.command()
def status(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A run and its steps: status, attempts, duration, error."""
    client = _api_client()
    if client is not None:
        try:
            view = client.get_run(run_id)
        except FactoryError as exc:
            raise _fail(str(exc)) from None
        record = _record_from_api(view)
        steps = [
            StepRecord(
                run_id=run_id,
                **{k: v for k, v in s.items() if k != "output"},
                output_json=None if s["output"] is None and s["status"] != "succeeded" else json.dumps(s["output"]),
            )
            for s in view["steps"] or []
        ]
    else:
        store = api.store_for()
        try:
            try:
                record = store.get_run(run_id)
            except FactoryError as exc:
                raise _fail(str(exc)) from None
            steps = store.get_steps(run_id)
        finally:
            store.close()
    if as_json:
        data = record.model_dump(mode="json", exclude={"spec_json"})
        data["steps"] = [{**s.model_dump(mode="json", exclude={"output_json"}), "output": s.output} for s in steps]
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
        return
    out.print(f"run [bold]{record.id}[/bold]  workflow {escape(record.workflow_name)}  {_status_text(record)}")
    out.print(f"created {_when(record.created_at)}  finished {_when(record.finished_at)}")
    if record.error:
        out.print(f"[red]{escape(record.error)}[/red]")
    table = Table()
    for column in ("step", "status", "attempts", "seconds", "output / error"):
        table.add_column(column, overflow="fold")
    for s in steps:
        seconds = f"{s.finished_at - s.started_at:.3f}" if s.finished_at and s.started_at else "-"
        style = STATUS_STYLE.get(s.status.value, "")
        label = s.status.value + (" (cached)" if s.cached else "")
        detail = s.error if s.error else (_short(s.output, 80) if s.output_json is not None else "")
        table.add_row(s.step_id, f"[{style}]{label}[/]", str(s.attempts), seconds, escape(detail or ""))
    out.print(table)


@app.command()
def logs(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    step: Annotated[str | None, typer.Argument(help="Only this step.")] = None,
) -> None:
    """What each attempt printed or logged, and the traceback of each failure."""
    store = api.store_for()
    try:
        try:
            store.get_run(run_id)
        except FactoryError as exc:
            raise _fail(str(exc)) from None
        attempts = store.get_attempts(run_id, step)
    finally:
        store.close()
    if not attempts:
        out.print("no finished attempts yet" + (f" for step {step}" if step else ""))
        return
    for a in attempts:
        style = STATUS_STYLE.get(a.status.value, "")
        duration = f"{a.duration:.3f}s" if a.duration is not None else "-"
        out.print(f"[bold]── {a.step_id} attempt {a.attempt}[/bold] [{style}]{a.status.value}[/] {duration}")
        if a.error:
            out.print(f"[red]{escape(a.error)}[/red]")
        if a.logs:
            out.print(escape(a.logs.rstrip("\n")), highlight=False)


@app.command()
def events(
    run_id: Annotated[str | None, typer.Argument(help="Only this run's events.")] = None,
    after: Annotated[int, typer.Option(help="Start after this event id.")] = 0,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until the run ends.")
    ] = False,
) -> None:
    """Print events as JSON lines, from an event id on."""
    from factory.events import tail

    client = _api_client()
    if client is not None:
        if run_id is None:
            raise _fail("with --api, name the run: factory --api URL events RUN_ID")
        try:
            for data in client.events(run_id, after, follow):
                sys.stdout.write(json.dumps(data) + "\n")
                sys.stdout.flush()
        except FactoryError as exc:
            raise _fail(str(exc)) from None
        except KeyboardInterrupt:
            pass
        return
    store = api.store_for()
    try:
        for event in tail(store, after, run_id, follow=follow):
            sys.stdout.write(event.model_dump_json() + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


@app.command("config")
def config_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The effective settings (environment, --config file, defaults), with secrets masked."""
    try:
        settings = get_settings()
    except FactoryError as exc:
        raise _fail(str(exc)) from None
    data = settings.masked()
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        return
    table = Table("setting", "environment variable", "value")
    for name, value in data.items():
        table.add_row(name, f"FACTORY_{name.upper()}", escape(str(value)))
    out.print(table)


@app.command("publish-events")
def publish_events() -> None:
    """Publish to Redis (FACTORY_EVENTS_URL) the events it has not received yet, e.g. after an outage."""
    settings = get_settings()
    if not settings.events_url:
        raise _fail("FACTORY_EVENTS_URL is not set: events stay in the store (the embedded bus)")
    from factory.redisbus import RedisEventPublisher

    store = api.store_for(settings)
    try:
        publisher = RedisEventPublisher(store, settings.events_url, settings.events_stream_maxlen)
        count = publisher.publish_pending()
    except Exception as exc:  # noqa: BLE001 - redis errors of every kind end here
        raise _fail(f"cannot publish to Redis: {exc}", EXIT_FAILED) from None
    finally:
        store.close()
    out.print(f"published {count} event(s); Redis has everything up to event {publisher.cursor()}")


keys_app = typer.Typer(help="API keys for the HTTP API: stored hashed, shown once.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    scope: Annotated[
        list[Scope], typer.Option("--scope", help="read, submit (includes read) or admin (includes all). Repeatable.")
    ],
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "",
    expires_in: Annotated[
        str | None, typer.Option("--expires-in", help="The key stops working after this long: 90s, 15m, 12h, 30d, 2w.")
    ] = None,
    secret: Annotated[
        list[str] | None,
        typer.Option("--secret", help="Grant a secret to the container steps of this key's workflows. Repeatable."),
    ] = None,
) -> None:
    """Create an API key and print it once (to stdout; everything else goes to stderr)."""
    from factory.auth import create_key, parse_duration
    from factory.sandbox.secrets import check_name

    try:
        seconds = parse_duration(expires_in) if expires_in else None
        granted = [check_name(s) for s in secret or []]
    except (ValueError, FactoryError) as exc:
        raise _fail(str(exc)) from None
    client = _api_client()
    if client is not None:
        try:
            created = client.create_key([s.value for s in scope], name, seconds, granted)
        except FactoryError as exc:
            raise _fail(str(exc)) from None
        key, record = created["key"], ApiKeyRecord(key_hash="", **{k: v for k, v in created.items() if k != "key"})
    else:
        store = api.store_for()
        try:
            key, record = create_key(store, scope, name, expires_in=seconds, secrets_granted=granted)
        finally:
            store.close()
    expiry = f", expires {_when(record.expires_at)}" if record.expires_at else ""
    grants = f", secrets {', '.join(record.secrets)}" if record.secrets else ""
    err.print(
        escape(f"created key {record.id} ({record.name}) with scopes [{', '.join(record.scopes)}]{expiry}{grants}")
        + "; it is shown once:"
    )
    out.print(key, highlight=False, markup=False)


@keys_app.command("list")
def keys_list() -> None:
    """The API keys: ids, names, scopes, expiry, last use, granted secrets (never the keys)."""
    client = _api_client()
    if client is not None:
        try:
            records = [ApiKeyRecord(key_hash="", **view) for view in client.list_keys()]
        except FactoryError as exc:
            raise _fail(str(exc)) from None
    else:
        store = api.store_for()
        try:
            records = store.list_api_keys()
        finally:
            store.close()
    now = time.time()
    table = Table("id", "name", "scopes", "created", "expires", "last used", "secrets", "state")
    for r in records:
        state = "revoked" if r.revoked else ("expired" if r.expired(now) else "active")
        table.add_row(
            escape(r.id),
            escape(r.name),
            escape(",".join(r.scopes)),
            _when(r.created_at),
            _when(r.expires_at) if r.expires_at else "never",
            _when(r.last_used_at) if r.last_used_at else "never",
            escape(",".join(r.secrets)),
            state,
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (`factory keys list`).")]) -> None:
    """Revoke an API key: the API refuses it from its next request on."""
    client = _api_client()
    if client is not None:
        try:
            client.revoke_key(key_id)
        except FactoryError as exc:
            raise _fail(str(exc)) from None
        found = True
    else:
        store = api.store_for()
        try:
            found = store.revoke_api_key(key_id)
        finally:
            store.close()
    if not found:
        raise _fail(f"no API key with id {key_id!r}; `factory keys list` shows them")
    out.print(f"revoked key {escape(key_id)}")


def main() -> None:
    app()


def _register_command_modules() -> None:
    """Commands that live beside their subsystem register themselves on ``app``."""
    import importlib

    for name in ("factory.cli_agents", "factory.cli_sandbox", "factory.cli_workflows", "deployments.cli"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(app)


_register_command_modules()


if __name__ == "__main__":
    main()
