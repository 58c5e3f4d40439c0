"""``factory submit`` and ``factory jobs``: runs as Ray jobs on a cluster (Ray's Jobs API).

The job runs ``factory run WORKFLOW --run-id ID`` on the cluster, with the workflow's folder
as its ``working_dir``; the run id is chosen here, so ``--follow`` watches the run in the
store that the cluster and this machine share (PostgreSQL: an embedded SQLite store is
refused for a remote cluster, its nodes cannot reach it).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import typer
from rich.markup import escape
from rich.table import Table

from factory.cli.backend import ProgressCounter
from factory.cli.output import EXIT_FAILED, EXIT_INVALID, EXIT_TIMEOUT, cli_settings, err, fail, out
from factory.cli.runs import (
    AGENTS_OPTION,
    STATUS_STYLE,
    ProgressBar,
    document_limits,
    parse_inputs,
    print_result,
    when,
)
from factory.engine import RunResult, new_run_id
from factory.errors import FactoryError, NotFoundError, WorkflowValidationError
from factory.settings import Settings
from factory.spec import MAX_REQUIREMENTS, Workflow
from factory.store import FINAL_RUN_STATUSES, Store

JOB_METADATA_KEY = "factory_run_id"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# settings the job's `factory run` must share with this machine; passed in its runtime_env
SHARED_SETTINGS = ("store_url", "events_url", "cache_url")
# after the run ends, how long --follow waits for its job's process to exit (ray.shutdown, the
# job supervisor noticing): long enough for a quiet or busy cluster, short enough for a hung exit
JOB_EXIT_GRACE_S = 30.0
JOB_END_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
ADDRESS_HELP = "The cluster's Ray dashboard: http://HEAD:8265 (else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)."


class ClusterAccessError(FactoryError):
    """The Ray cluster's Jobs API could not be used (unreachable, or it wants a token)."""


def jobs_address(address: str | None) -> str:
    """The Jobs API address: the option, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS."""
    for candidate in (address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if candidate and candidate.startswith(("http://", "https://")):
            return candidate.rstrip("/")
    raise fail("name the cluster: --address http://HEAD:8265 (the Ray dashboard's address), or RAY_API_SERVER_ADDRESS")


def check_store_reachable(settings: Settings, address: str) -> None:
    """A remote cluster cannot reach this machine's SQLite file: refuse with what to do."""
    host = urlparse(address).hostname or ""
    store_url = settings.resolved_store_url()
    if store_url.startswith("sqlite:///") and host not in LOOPBACK:
        raise FactoryError(
            f"the store is SQLite on this machine ({store_url.removeprefix('sqlite:///')}), which the nodes of the "
            f"cluster at {address} cannot reach: set FACTORY_STORE_URL=postgresql://... (a database every node "
            "and this machine reach) and submit again"
        )


def job_env(settings: Settings) -> tuple[dict[str, str], list[str]]:
    """Environment for the job's runtime_env (the store, the event bus and the cache this machine
    uses), and the names of settings left out because their URL carries a password: a
    runtime_env is shown to everyone who can read the cluster's dashboard, so those must be
    set on the cluster itself (e.g. from a Kubernetes Secret)."""
    from factory.settings import mask_secrets

    env: dict[str, str] = {}
    withheld: list[str] = []
    values = {
        "store_url": settings.resolved_store_url(),
        "events_url": settings.events_url,
        "cache_url": settings.cache_url,
    }
    for name in SHARED_SETTINGS:
        value = values[name]
        if not value:
            continue
        if mask_secrets(value) != value:
            withheld.append(f"FACTORY_{name.upper()}")
        else:
            env[f"FACTORY_{name.upper()}"] = value
    return env, withheld


def job_runtime_env(workflow: Workflow, folder: Path, env_vars: dict[str, str]) -> dict[str, Any]:
    """The job's runtime_env: the workflow's folder as its working_dir, the environment it
    shares with this machine, and the workflow's ``runtime:`` (pip requirements, py_modules;
    paths relative to ``folder``). A file that is not there is a FactoryError naming it."""
    runtime_env: dict[str, Any] = {"working_dir": str(folder), "env_vars": env_vars}
    runtime = workflow.runtime
    if runtime is None:
        return runtime_env
    requirements = runtime.requirements
    if isinstance(requirements, str):
        path = folder / requirements
        if not path.is_file():
            raise FactoryError(f"runtime.requirements: {path} is not a file (give a path relative to {folder})")
        lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
        requirements = [line for line in lines if line]
        if len(requirements) > MAX_REQUIREMENTS:
            raise FactoryError(f"runtime.requirements: {path} lists {len(requirements)}, at most {MAX_REQUIREMENTS}")
    if requirements:
        runtime_env["pip"] = list(requirements)
    modules = []
    for entry in runtime.py_modules:
        path = (folder / entry).resolve()
        if not path.exists():
            raise FactoryError(f"runtime.py_modules: {path} does not exist (give a path relative to {folder})")
        modules.append(str(path))
    if modules:
        runtime_env["py_modules"] = modules
    return runtime_env


def entrypoint(workflow: Path, run_id: str, inputs: dict[str, Any], agents: str | None) -> str:
    """The job's shell command: `factory run` of the workflow file in its working_dir."""
    argv = ["factory", "run", workflow.name, "--run-id", run_id, "--json"]
    for key, value in inputs.items():
        argv += ["--input", f"{key}={json.dumps(value)}"]  # JSON is YAML: the job reads it back as given
    if agents is not None:
        argv += ["--agents", agents]
    return shlex.join(argv)


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
        raise fail(str(cluster_error(address, exc))) from None


def cluster_error(address: str, exc: BaseException) -> ClusterAccessError:
    text = str(exc)
    if "authentication token" in text.lower() or "AuthenticationError" in type(exc).__name__:
        return ClusterAccessError(
            f"the Ray cluster at {address} requires token authentication ({text.splitlines()[0][:200]}): "
            "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's token (the head's ~/.ray/auth_token, "
            "or the one it was started with), then retry"
        )
    return ClusterAccessError(
        f"cannot reach the Ray Jobs API at {address}: {text.splitlines()[0][:300] if text else exc!r}"
    )


def _agents_in_folder(agents: Path | None, folder: Path) -> str | None:
    if agents is None:
        return None
    try:
        return str(agents.resolve().relative_to(folder))
    except ValueError:
        raise fail(
            f"--agents {agents}: the catalogue must be inside the workflow's folder ({folder}), which is all the "
            "job receives"
        ) from None


def submit(
    workflow: Annotated[Path, typer.Argument(help="Workflow YAML file; its folder becomes the job's working_dir.")],
    input: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="key=value (value read as YAML: n=6 is an integer). Repeatable."),
    ] = None,
    address: Annotated[str | None, typer.Option("--address", help=ADDRESS_HELP)] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Show the run's progress and exit 0/1 like `factory run`.")
    ] = False,
    agents: Annotated[Path | None, AGENTS_OPTION] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0.001, help="With --follow: stop following after this many seconds (exit 3)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: run_id, job_id (and the result with --follow).")
    ] = False,
) -> None:
    """Run a workflow on a Ray cluster as a Ray job (Ray's Jobs API); prints the run id and the job id.

    The workflow is checked here first. The job runs `factory run` on the cluster with the same
    store, event bus and cache URLs as this machine (a URL with a password is not passed: set it on
    the cluster). Plain `ray job submit --working-dir DIR -- factory run workflow.yaml` works too."""
    from factory import api
    from factory.catalog import load_catalog
    from factory.dag import load_workflow

    settings = cli_settings()
    inputs = parse_inputs(input or [], document_limits())
    url = jobs_address(address)
    folder = workflow.resolve().parent
    agents_rel = _agents_in_folder(agents, folder)
    try:
        check_store_reachable(settings, url)
        catalog = load_catalog(agents) if agents is not None else None
        wf = load_workflow(workflow, agents=catalog, limits=document_limits())
        api.merge_inputs(wf, inputs, document_limits())
    except WorkflowValidationError as exc:
        err.print(f"[red]invalid[/red] {escape(str(exc.source or workflow))}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            err.print(f"  - {escape(problem)}")
        raise typer.Exit(EXIT_INVALID) from None
    except FactoryError as exc:
        raise fail(str(exc)) from None
    env, withheld = job_env(settings)
    run_id = new_run_id()
    client = _client(url)
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint(workflow.resolve(), run_id, inputs, agents_rel),
            runtime_env=job_runtime_env(wf, folder, env),
            metadata={JOB_METADATA_KEY: run_id, "workflow": wf.name},
            submission_id=f"factory-{run_id}",
        )
    except Exception as exc:  # noqa: BLE001 - the Jobs API's errors come in many types
        raise fail(str(cluster_error(url, exc))) from None
    if withheld:
        err.print(
            f"[yellow]not passed to the job (their URLs carry a password):[/yellow] {', '.join(withheld)}; "
            "the job uses the cluster's own values"
        )
    if not follow:
        if as_json:
            sys.stdout.write(json.dumps({"run_id": run_id, "job_id": job_id}) + "\n")
        else:
            out.print(f"run {escape(run_id)}  job {escape(job_id)}  (follow: factory status {escape(run_id)})")
        return
    if not as_json:
        err.print(f"run [bold]{escape(run_id)}[/bold] submitted as job {escape(job_id)} to {escape(url)}")
    try:
        result = follow_job(client, job_id, run_id, settings, not as_json, timeout)
    except TimeoutError:
        raise fail(f"run {run_id} did not end within {timeout:g}s; it goes on in job {job_id}", EXIT_TIMEOUT) from None
    except FactoryError as exc:
        raise fail(str(exc), EXIT_FAILED) from None
    job_status = wait_for_job_end(client, job_id, JOB_EXIT_GRACE_S)
    if job_status not in JOB_END_STATUSES:
        err.print(
            f"[yellow]the run ended; its job {escape(job_id)} was {escape(job_status)} {JOB_EXIT_GRACE_S:g}s "
            f"later[/yellow] (see `factory jobs` or `ray job logs {escape(job_id)}`)"
        )
    elif result.ok and job_status != "SUCCEEDED":
        err.print(f"[yellow]the run succeeded, then job {escape(job_id)} ended {job_status}[/yellow]")
    if as_json:
        sys.stdout.write(
            json.dumps({**result.to_dict(), "job_id": job_id, "job_status": job_status}, ensure_ascii=False) + "\n"
        )
    else:
        print_result(result, False)
    raise typer.Exit(0 if result.ok else EXIT_FAILED)


def follow_job(
    client: Any, job_id: str, run_id: str, settings: Settings, show: bool, timeout: float | None
) -> RunResult:
    """Watch the run the job creates, in the shared store, until it ends; a job that ends
    without the run ending is an error carrying the tail of the job's logs."""
    from factory.api import store_for

    deadline = None if timeout is None else time.monotonic() + timeout
    store = store_for(settings)
    try:
        with ProgressBar(enabled=show) as bar:
            counter = ProgressCounter()
            last = 0
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError
                record = _run_or_none(store, run_id)
                if record is not None:
                    for event in store.events(last, run_id, 1000):
                        last = event.id
                        counter.add(event.type, event.step_id, event.data)
                    bar.update(counter.counts)
                    if record.status in FINAL_RUN_STATUSES:
                        steps = store.get_steps(run_id)
                        outputs = {s.step_id: s.output for s in steps if s.status.value == "succeeded"}
                        return RunResult(run_id, record.status, outputs, record.error)
                status = str(client.get_job_status(job_id))
                if status.rsplit(".", 1)[-1] in ("FAILED", "STOPPED"):
                    logs = (client.get_job_logs(job_id) or "").strip().splitlines()[-15:]
                    raise FactoryError(
                        f"job {job_id} ended {status.rsplit('.', 1)[-1].lower()} before run {run_id} ended"
                        + (":\n" + "\n".join(logs) if logs else "")
                    )
                time.sleep(0.5)
    finally:
        store.close()


def wait_for_job_end(client: Any, job_id: str, grace: float) -> str:
    """The job's status once its process has exited (the run it carries has already ended),
    or its status as it stands after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        try:
            status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        except Exception:  # noqa: BLE001 - the Jobs API's errors come in many types; the run's end is known
            return "UNREACHABLE"
        if status in JOB_END_STATUSES or time.monotonic() >= deadline:
            return status
        time.sleep(0.25)


def _run_or_none(store: Store, run_id: str) -> Any:
    try:
        return store.get_run(run_id)
    except NotFoundError:
        return None


def jobs(
    address: Annotated[str | None, typer.Option("--address", help=ADDRESS_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The Factory's Ray jobs on the cluster, newest first, with the status of their runs."""
    from factory.api import store_for

    url = jobs_address(address)
    client = _client(url)
    try:
        listed = [j for j in client.list_jobs() if (j.metadata or {}).get(JOB_METADATA_KEY)]
    except Exception as exc:  # noqa: BLE001
        raise fail(str(cluster_error(url, exc))) from None
    listed.sort(key=lambda j: j.start_time or 0, reverse=True)
    store = store_for(cli_settings())
    rows = []
    try:
        for job in listed:
            run_id = job.metadata[JOB_METADATA_KEY]
            record = _run_or_none(store, run_id)
            rows.append(
                {
                    "job_id": job.submission_id or job.job_id,
                    "job_status": str(job.status).rsplit(".", 1)[-1],
                    "run_id": run_id,
                    "workflow": job.metadata.get("workflow", ""),
                    "run_status": record.status.value if record is not None else None,
                    "started": (job.start_time or 0) / 1000 or None,
                }
            )
    finally:
        store.close()
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")  # rich would wrap it at the console width
        return
    table = Table("job", "job status", "run", "workflow", "run status", "started")
    for row in rows:
        status = row["run_status"] or "not in this store"
        table.add_row(
            escape(row["job_id"]),
            escape(row["job_status"]),
            escape(row["run_id"]),
            escape(row["workflow"]),
            f"[{STATUS_STYLE.get(status, '')}]{escape(status)}[/]",
            when(row["started"]),
        )
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command()(jobs)
