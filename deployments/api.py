"""The Factory's HTTP API (FastAPI on Ray Serve): workflows, runs, events, agents, health, metrics.

``POST /v1/route`` is served by a separate application (deployments.route) whose
replicas keep the router warm; the Serve proxy sends that path there.
"""

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import ray
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from starlette.concurrency import run_in_threadpool

from deployments import dashboard_views as views
from deployments.http import ApiProblem, Authorizer, install_error_handlers
from factory import __version__, registry, schedules
from factory.api import approve as approve_gate
from factory.api import cancel as cancel_run
from factory.api import create_run, merge_inputs, run_is_stalled, run_spent, store_for, with_budget
from factory.approvals import MAX_COMMENT_CHARS, Decision
from factory.auth import Scope, has_scope
from factory.auth import create_key as make_key
from factory.catalog import load_catalog
from factory.costs import RunSpend, Usage, price_table, total_usage, usage_of
from factory.dag import parse_workflow_text, validate_data
from factory.errors import PermissionDeniedError, RunStateError, StepInputError, WorkflowValidationError
from factory.limits import MAX_API_WAIT_SECONDS, DocumentLimits, check_data_bounds
from factory.owner import owner_is_gone
from factory.policy import Submitter, check_inline, resume_problem
from factory.runner import get_runner
from factory.sandbox.secrets import check_name
from factory.schedules import ScheduleView, TickView, get_cron_scheduler
from factory.settings import Settings
from factory.spec import Budget, Workflow
from factory.store import (
    FINAL_RUN_STATUSES,
    ApiKeyRecord,
    ApprovalRecord,
    AttemptRecord,
    Event,
    RegisteredWorkflow,
    RunChange,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
)
from factory.supervisor import get_supervisor

log = logging.getLogger(__name__)
MAX_EVENT_ID = 2**53  # event ids are 64-bit integers in the store; JSON clients handle up to 2**53
MAX_EVENTS_PAGE = 10_000  # events a stream that does not follow sends before it ends (ask again from the last id)
MAX_ATTEMPTS_PAGE = 1_000  # attempts per GET /v1/runs/{id}/attempts
WAIT_POLL_FIRST = 0.05  # ?wait= reads the run's status after this long, then twice as long each time...
WAIT_POLL_MAX = 1.0  # ...up to this
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


# -- request and response models ---------------------------------------------------------------


class SubmitWorkflow(BaseModel):
    """A workflow (the same mapping as its YAML) and input values."""

    workflow: dict[str, Any] = Field(description="The workflow: name, inputs, steps.")
    inputs: dict[str, Any] = Field(default_factory=dict, description="Input values over the workflow's defaults.")


class RegisterWorkflow(BaseModel):
    """A workflow to register (admin): keys start it by name with ``POST /v1/workflows/{name}/runs``."""

    workflow: dict[str, Any] = Field(description="The workflow: name, inputs, steps.")
    secrets: list[str] = Field(default_factory=list, description="Secrets its container steps may use.")
    base_dir: str | None = Field(
        default=None, description="A folder on the cluster its python steps are imported from (vouched for by you)."
    )


class RegisteredView(BaseModel):
    name: str
    version: int
    secrets: list[str]
    base_dir: str | None
    created_at: float
    created_by: str
    inputs: dict[str, Any]
    steps: int


class AddSchedule(BaseModel):
    """A workflow with a ``schedule:`` to register and schedule (admin)."""

    model_config = ConfigDict(extra="forbid")

    workflow: dict[str, Any] = Field(description="The workflow: name, inputs, steps and schedule.")
    name: str | None = Field(default=None, description="The schedule's (and registered workflow's) name.")
    secrets: list[str] = Field(default_factory=list, description="Secrets its container steps may use.")
    base_dir: str | None = Field(
        default=None, description="A folder on the cluster its python steps are imported from (vouched for by you)."
    )


class StartRun(BaseModel):
    """Inputs of a run of a registered workflow (nothing else: its steps are the operator's)."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] = Field(default_factory=dict, description="Input values over the workflow's defaults.")
    version: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="A version of the workflow; default: the latest."
    )


class CreateKey(BaseModel):
    scopes: list[Scope] = Field(min_length=1, description="read, submit (includes read) or admin (includes all).")
    name: str = Field(default="", max_length=200)
    expires_in: float | None = Field(default=None, gt=0, le=10 * 365 * 86400, description="Seconds until it expires.")
    secrets: list[str] = Field(
        default_factory=list, description="Secrets its inline workflows' container steps may use."
    )


class KeyView(BaseModel):
    id: str
    name: str
    scopes: list[str]
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    revoked: bool
    secrets: list[str]

    @classmethod
    def of(cls, r: ApiKeyRecord) -> "KeyView":
        return cls.model_validate(r.model_dump(exclude={"key_hash"}))


class CreatedKey(KeyView):
    key: str = Field(description="The key itself: shown once, stored only hashed.")


class Submitted(BaseModel):
    """A run started (202), or, with ``?wait=``, a run that ended within the wait (200)."""

    run_id: str
    status: RunStatus
    url: str
    outputs: dict[str, Any] | None = Field(
        default=None, description="With ?wait= and status 200: the outputs of the steps that succeeded, by step id."
    )
    error: str | None = Field(default=None, description="With ?wait= and status 200: why the run failed, if it did.")


class StepView(BaseModel):
    step_id: str
    status: str
    attempts: int
    output: Any = None
    error: str | None = None
    cached: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    items_done: int = Field(default=0, description="for_each steps: items whose output is committed.")
    items_total: int = Field(default=0, description="for_each steps: items in the list (0 before it is known).")
    usage: Usage | None = Field(
        default=None,
        description="Tokens the step's agents used, per model, with the cost estimated from the API's model_prices "
        "setting: from the committed output (agent and route steps, python steps that asked agents and report "
        "`usage`, summed over a for_each step's items); null when it records none.",
    )

    @classmethod
    def of(cls, s: StepRecord, prices: Mapping[str, tuple[float, float]] | None = None) -> "StepView":
        output = s.output
        return cls(
            step_id=s.step_id,
            status=s.status.value,
            attempts=s.attempts,
            output=output,
            error=s.error,
            cached=s.cached,
            started_at=s.started_at,
            finished_at=s.finished_at,
            items_done=s.items_done,
            items_total=s.items_total,
            usage=usage_of(output, prices or {}),
        )


class RunView(BaseModel):
    id: str
    workflow: str
    status: RunStatus
    inputs: dict[str, Any]
    error: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    started_by: str = Field(default="local", description="key:<id> for runs submitted over the API.")
    workflow_ref: str | None = Field(default=None, description="name@version of a registered workflow.")
    schedule: str | None = Field(default=None, description="The schedule that started the run, if any.")
    stalled: bool = Field(
        default=False,
        description="Running, but its coordinator is gone (lease lapsed or process dead): the supervisor or a resume "
        "takes it over.",
    )
    steps: list[StepView] | None = None
    usage: Usage | None = Field(
        default=None,
        description="With the steps: the tokens of all its steps' committed outputs, summed per model, with the "
        "estimated cost (cost_usd); null when no step records usage, and in lists of runs.",
    )
    spent: RunSpend | None = Field(
        default=None,
        description="With the steps: what the run spent in all its attempts, failed ones included, as it counted "
        "it against its budgets (tokens, estimated cost, attempts, running seconds); null before it records any, "
        "and in lists of runs.",
    )

    @classmethod
    def of(
        cls,
        r: RunRecord,
        steps: list[StepRecord] | None = None,
        *,
        lease_seconds: float = 10.0,
        prices: Mapping[str, tuple[float, float]] | None = None,
        spent: RunSpend | None = None,
    ) -> "RunView":
        views = None if steps is None else [StepView.of(s, prices) for s in steps]
        return cls(
            id=r.id,
            stalled=run_is_stalled(r, lease_seconds, time.time()),
            workflow=r.workflow_name,
            status=r.status,
            inputs=r.inputs,
            error=r.error,
            started_by=r.grants.principal if r.grants else "local",
            workflow_ref=r.grants.workflow_ref if r.grants else None,
            schedule=r.grants.schedule if r.grants else None,
            created_at=r.created_at,
            started_at=r.started_at,
            finished_at=r.finished_at,
            steps=views,
            usage=None if views is None else total_usage((v.output for v in views), prices or {}),
            spent=spent,
        )


class RunPage(BaseModel):
    runs: list[RunView]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next (older) page; null at the end.")


class Accepted(BaseModel):
    run_id: str
    status: str
    detail: str
    after_event_id: int | None = Field(
        default=None, description="Follow what happens next with the events endpoint from this id (?after=)."
    )


class ResumeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget: Budget | None = Field(default=None, description="New limits for the run, replacing those it had.")


class ApprovalBody(BaseModel):
    """A decision at an approval gate."""

    model_config = ConfigDict(extra="forbid")
    approved: bool = Field(default=True, description="false rejects.")
    comment: str = Field(default="", max_length=MAX_COMMENT_CHARS, description="Why; recorded with the decision.")


class ApprovalAnswer(BaseModel):
    decision: ApprovalRecord
    run_status: str = Field(description="pending: the decision let a parked run go on (it is being resumed).")
    after_event_id: int | None = Field(
        default=None, description="Follow what happens next with the events endpoint from this id (?after=)."
    )


class AttemptView(BaseModel):
    """A finished attempt of a step: what it printed or logged (secrets masked) and its error."""

    step_id: str
    attempt: int
    status: str
    error: str | None = None
    logs: str = ""
    duration: float | None = None
    finished_at: float

    @classmethod
    def of(cls, a: AttemptRecord) -> "AttemptView":
        return cls.model_validate(a.model_dump(mode="json", exclude={"run_id"}))


class Validation(BaseModel):
    """What ``POST /v1/workflows`` would say of this workflow, without running or storing anything."""

    valid: bool
    name: str | None = None
    steps: list[str] = Field(default_factory=list, description="Step ids, in the workflow's order.")
    inputs: dict[str, Any] = Field(default_factory=dict, description="Declared inputs with their defaults.")
    problems: list[str] = Field(default_factory=list, description="Each naming its step and field.")
    refused: bool = Field(default=False, description="Valid, but this key may not run it (the problems say why).")


# -- the application ------------------------------------------------------------------------------

app = FastAPI(
    title="The Factory API",
    version=__version__,
    description=(
        "Submit workflows, follow runs and their events, route tasks to agents. "
        "Authenticate with 'Authorization: Bearer <key>' (`factory keys create`). "
        "Errors are application/problem+json."
    ),
)


LIMITS = {"max_body": Settings.model_fields["api_max_body_bytes"].default}
install_error_handlers(app, lambda: int(LIMITS["max_body"]))


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _pydantic_detail(exc: ValueError) -> str:
    errors: list[dict[str, Any]] = getattr(exc, "errors", lambda: [])()
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors) or str(exc)


def _registered_view(r: RegisteredWorkflow) -> RegisteredView:
    spec = json.loads(r.spec_json)
    return RegisteredView(
        name=r.name,
        version=r.version,
        secrets=r.secrets,
        base_dir=r.base_dir,
        created_at=r.created_at,
        created_by=r.created_by,
        inputs=spec.get("inputs") or {},
        steps=len(spec.get("steps") or []),
    )


def _cursor(record: RunRecord) -> str:
    return f"{record.created_at!r}:{record.id}"


def _parse_cursor(cursor: str) -> tuple[float, str]:
    created, sep, run_id = cursor.partition(":")
    try:
        if not sep or not run_id:
            raise ValueError
        return float(created), run_id
    except ValueError:
        raise ApiProblem(422, f"cursor {cursor!r} is not one this API gave out; use next_cursor as given") from None


WaitQuery = Annotated[
    float,
    Query(
        ge=0,
        le=MAX_API_WAIT_SECONDS,
        description=f"Wait up to this many seconds (at most {MAX_API_WAIT_SECONDS:g}) for the run to end: "
        "200 with its outputs if it does, else 202 as without it.",
    ),
]
CancelQuery = Annotated[bool, Query(description="With wait: cancel the run if the caller disconnects before it ends.")]


def _last_event_id(header: str | None) -> int:
    """The Last-Event-ID header of an SSE reconnect as an event id (0 when absent)."""
    if not header:
        return 0
    try:
        last_seen = int(header)
        if not 0 <= last_seen <= MAX_EVENT_ID:
            raise ValueError
    except ValueError:
        raise ApiProblem(422, f"Last-Event-ID must be an event id (0 to {MAX_EVENT_ID})") from None
    return last_seen


@serve.deployment(name="FactoryAPI", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
@serve.ingress(app)
class FactoryAPI:
    def __init__(self, settings: dict[str, Any], open_mode: bool = False) -> None:
        self.settings = Settings.model_validate(settings)
        self.store = store_for(self.settings)
        self.auth = Authorizer(self.store, self.settings, open_mode)
        self.runner = get_runner(self.settings)
        self.supervisor = get_supervisor(self.settings)  # resumes runs whose owner died; Ray restarts it
        self.cron_scheduler = get_cron_scheduler(
            self.settings
        )  # starts the runs of schedules' due ticks; Ray restarts it
        self.catalog = load_catalog(self.settings.agents_file) if self.settings.agents_file else None
        LIMITS["max_body"] = self.settings.api_max_body_bytes
        self.limits = DocumentLimits.from_settings(self.settings)
        self.prices = price_table(self.settings.model_prices)  # for the estimated cost of runs' usage
        self.requests = 0
        self.started = time.time()
        self._streams: dict[str, int] = {}  # open event streams per key id

    def _start(self, run_id: str, resume: bool) -> None:
        """Hand the run to the runner actor; fetch the actor again if it died."""
        try:
            ray.get(self.runner.start.remote(run_id, resume), timeout=30)
        except RayActorError:
            self.runner = get_runner(self.settings)
            ray.get(self.runner.start.remote(run_id, resume), timeout=30)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon(self) -> Response:
        """Browsers ask for it at the root, also on the dashboard (/ui): an icon, not a 404."""
        from ui.server import favicon

        return favicon()

    @app.get("/healthz", summary="Liveness: the API and its store answer")
    def healthz(self) -> dict[str, Any]:
        self.store.list_runs(limit=1)
        return {"status": "ok", "version": __version__}

    @app.post(
        "/v1/workflows",
        status_code=202,
        response_model=Submitted,
        responses={200: {"model": Submitted, "description": "With ?wait=: the run ended within it (outputs, error)."}},
        summary="Submit a workflow to run",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": SubmitWorkflow.model_json_schema()},
                    "application/yaml": {"schema": {"type": "string", "description": "The workflow's YAML."}},
                },
            }
        },
    )
    async def submit(
        self, request: Request, response: Response, wait: WaitQuery = 0.0, cancel_on_disconnect: CancelQuery = False
    ) -> Submitted:
        """JSON: ``{"workflow": {...}, "inputs": {...}}``; or the workflow's YAML with
        Content-Type application/yaml. Python steps may name only modules the operator allowed
        (``allowed_modules``), container steps only secrets granted to the key; start a
        registered workflow with ``POST /v1/workflows/{name}/runs`` instead. The run starts
        at once; follow it with the events endpoint, or wait for its end in this request with
        ``?wait=SECONDS``: 200 with the outputs if it ended in time, else 202 (it goes on).
        With ``cancel_on_disconnect=true``, a caller that leaves before the run ends cancels it."""
        key = self.auth.authorize(request, Scope.SUBMIT)
        self._check_wait(key.id, wait, cancel_on_disconnect)
        data, inputs = await self._workflow_body(request)
        workflow = await run_in_threadpool(
            partial(validate_data, data, None, "the submitted workflow", False, self.catalog, limits=self.limits)
        )  # names only: the API never imports a step module
        grants = check_inline(
            workflow, Submitter.of_key(key), self.settings.allowed_modules, self.settings.container_executor
        )
        run_id = await run_in_threadpool(
            create_run, workflow, inputs, store=self.store, settings=self.settings, grants=grants, check_imports=False
        )
        await run_in_threadpool(self._start, run_id, False)
        return await self._answer(request, response, key.id, run_id, wait, cancel_on_disconnect)

    async def _validated_body_workflow(self, name: str, data: Any, base_dir: str | None) -> Workflow:
        """A workflow an admin registers or schedules: ``base_dir`` must be a folder here; its
        modules are named, never imported (the runner imports them)."""
        if base_dir is not None and not await run_in_threadpool(Path(base_dir).is_dir):
            raise ApiProblem(422, f"base_dir {base_dir!r} is not a folder on the API's host")
        return await run_in_threadpool(
            partial(validate_data, data, base_dir, f"workflow {name!r}", False, self.catalog, limits=self.limits)
        )

    def _check_wait(self, key_id: str, wait: float, cancel_on_disconnect: bool) -> None:
        """Refuse a wait before the run exists: one without ``wait``, or past the key's places."""
        if cancel_on_disconnect and not wait:
            raise ApiProblem(422, "cancel_on_disconnect needs wait=SECONDS: only a caller that waits can leave")
        open_now = self._streams.get(key_id, 0)
        if wait and open_now >= self.settings.api_max_streams_per_key:
            raise ApiProblem(
                429,
                f"this key holds {open_now} event streams and waits open already (the limit is "
                f"{self.settings.api_max_streams_per_key}); close one, or submit without wait and follow the events",
                headers={"Retry-After": "5"},
            )

    async def _answer(
        self, request: Request, response: Response, key_id: str, run_id: str, wait: float, cancel_on_disconnect: bool
    ) -> Submitted:
        """202 with the run id; or, with ``wait``, 200 with the outputs if the run ends within it."""
        started = Submitted(run_id=run_id, status=RunStatus.PENDING, url=f"/v1/runs/{run_id}")
        if not wait:
            return started
        record = await self._wait_for_end(request, key_id, run_id, wait, cancel_on_disconnect)
        if record is None:
            current = await run_in_threadpool(self.store.get_run, run_id)
            return started.model_copy(update={"status": current.status})
        steps = await run_in_threadpool(self.store.get_steps, run_id)
        response.status_code = 200
        outputs = {s.step_id: s.output for s in steps if s.status == StepStatus.SUCCEEDED}
        return started.model_copy(update={"status": record.status, "outputs": outputs, "error": record.error})

    async def _wait_for_end(
        self, request: Request, key_id: str, run_id: str, wait: float, cancel_on_disconnect: bool
    ) -> RunRecord | None:
        """The run once it has ended, or None at the deadline or when the caller left (then the
        run is cancelled if asked). It reads the run's status with a growing pause (WAIT_POLL_*),
        on the event loop: no thread is held while it waits. A wait holds one of the key's
        event stream places (api_max_streams_per_key)."""
        open_now = self._streams.get(key_id, 0)
        if open_now >= self.settings.api_max_streams_per_key:
            return None  # the run goes on: 202, follow it with the events endpoint
        self._streams[key_id] = open_now + 1
        deadline = time.monotonic() + wait
        pause = WAIT_POLL_FIRST
        try:
            while True:
                record: RunRecord = await run_in_threadpool(self.store.get_run, run_id)
                if record.status in FINAL_RUN_STATUSES:
                    return record
                if await request.is_disconnected():
                    if cancel_on_disconnect:
                        await run_in_threadpool(self._cancel_left_run, run_id)
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, WAIT_POLL_MAX)
        except asyncio.CancelledError:  # Serve cancels the request when its client disconnects
            if cancel_on_disconnect:
                self._cancel_left_run(run_id)
            raise
        finally:
            left_open = self._streams.get(key_id, 1) - 1
            if left_open > 0:
                self._streams[key_id] = left_open
            else:
                self._streams.pop(key_id, None)

    def _cancel_left_run(self, run_id: str) -> None:
        """The caller of a ``cancel_on_disconnect`` wait left: cancel its run (if it still runs)."""
        try:
            cancel_run(run_id, store=self.store, settings=self.settings)
        except Exception:  # nobody is left to tell; the run's own events show what happened
            log.exception("could not cancel run %s after its caller disconnected", run_id)

    async def _workflow_body(self, request: Request) -> tuple[Any, dict[str, Any]]:
        """The workflow data and the inputs of a JSON body (SubmitWorkflow) or a YAML one."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = await request.body()
        try:
            if content_type in YAML_TYPES:  # bounded: aliases, depth, size, plain JSON types only
                return parse_workflow_text(raw, limits=self.limits, source="the submitted workflow"), {}
            if content_type in ("application/json", ""):
                body = SubmitWorkflow.model_validate_json(raw or b"{}")
                check_data_bounds(body.workflow, self.limits, source="the submitted workflow")
                return body.workflow, body.inputs
            raise ApiProblem(415, f"send application/json or application/yaml, not {content_type!r}")
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ApiProblem(
                422, f"the body is not {{'workflow': ..., 'inputs': ...}}: {_pydantic_detail(exc)}"
            ) from None

    @app.post(
        "/v1/validate",
        response_model=Validation,
        summary="Check a workflow (and inputs) as a submission would, without running it",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": SubmitWorkflow.model_json_schema()},
                    "application/yaml": {"schema": {"type": "string", "description": "The workflow's YAML."}},
                },
            }
        },
    )
    async def validate(self, request: Request) -> Validation:
        """Every problem at once, as ``POST /v1/workflows`` would find them: the workflow's own,
        its inputs', and what this key may not use (python modules not allowed, secrets not granted)."""
        key = self.auth.authorize(request, Scope.SUBMIT)  # what this key may run: a question for who may run
        data, inputs = await self._workflow_body(request)
        try:
            workflow = await run_in_threadpool(
                partial(validate_data, data, None, "the submitted workflow", False, self.catalog, limits=self.limits)
            )
        except WorkflowValidationError as exc:
            name = data.get("name") if isinstance(data, dict) and isinstance(data.get("name"), str) else None
            return Validation(valid=False, name=name, problems=exc.problems)
        view = Validation(
            valid=True, name=workflow.name, steps=[s.id for s in workflow.steps], inputs=dict(workflow.inputs)
        )
        try:  # the inputs' problems and the key's, all of them
            merge_inputs(workflow, inputs, self.limits)
        except WorkflowValidationError as exc:
            view.valid, view.problems = False, list(exc.problems)
        try:
            check_inline(
                workflow, Submitter.of_key(key), self.settings.allowed_modules, self.settings.container_executor
            )
        except PermissionDeniedError as exc:
            view.refused = True
            view.problems += exc.problems or [str(exc)]
        return view

    # -- registered workflows ---------------------------------------------------------------------

    @app.put(
        "/v1/workflows/{name}",
        status_code=201,
        response_model=RegisteredView,
        summary="Register a workflow (admin): the next version of this name",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": RegisterWorkflow.model_json_schema()},
                    "application/yaml": {"schema": {"type": "string", "description": "The workflow's YAML."}},
                },
            }
        },
    )
    async def register(self, request: Request, name: str) -> RegisteredView:
        """JSON: ``{"workflow": {...}, "secrets": [...], "base_dir": "/opt/steps"}``, or the YAML alone.
        The workflow is validated without importing its modules; keys then start it by name."""
        key = self.auth.authorize(request, Scope.ADMIN)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if content_type in YAML_TYPES:
                data, _ = await self._workflow_body(request)
                body = RegisterWorkflow.model_validate({"workflow": data})
            else:
                body = RegisterWorkflow.model_validate_json(await request.body() or b"{}")
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ApiProblem(422, f"the body is not a RegisterWorkflow: {_pydantic_detail(exc)}") from None
        if not _NAME_RE.match(name):
            raise ApiProblem(422, f"{name!r} is not a workflow name: letters, digits, '.', '_' and '-', at most 100")
        workflow = await self._validated_body_workflow(name, body.workflow, body.base_dir)
        try:
            record = await run_in_threadpool(
                registry.register, self.store, workflow, name=name, secrets=body.secrets, created_by=f"key:{key.id}"
            )
        except StepInputError as exc:  # a secret name that is not one
            raise ApiProblem(422, str(exc)) from None
        return _registered_view(record)

    @app.get("/v1/workflows", response_model=list[RegisteredView], summary="Registered workflows (latest versions)")
    def registered(self, request: Request) -> list[RegisteredView]:
        self.auth.authorize(request, Scope.READ)
        return [_registered_view(r) for r in self.store.list_registered_workflows()]

    @app.get("/v1/workflows/{name}", response_model=RegisteredView, summary="A registered workflow")
    def registered_one(
        self, request: Request, name: str, version: Annotated[int | None, Query(ge=1, le=2**31)] = None
    ) -> RegisteredView:
        self.auth.authorize(request, Scope.READ)
        return _registered_view(registry.lookup(self.store, name, version))

    @app.post(
        "/v1/workflows/{name}/runs",
        status_code=202,
        response_model=Submitted,
        responses={200: {"model": Submitted, "description": "With ?wait=: the run ended within it (outputs, error)."}},
        summary="Start a run of a registered workflow",
    )
    async def start_registered(
        self,
        request: Request,
        response: Response,
        name: str,
        body: StartRun,
        wait: WaitQuery = 0.0,
        cancel_on_disconnect: CancelQuery = False,
    ) -> Submitted:
        """``?wait=`` and ``cancel_on_disconnect`` as for ``POST /v1/workflows``."""
        key = self.auth.authorize(request, Scope.SUBMIT)
        self._check_wait(key.id, wait, cancel_on_disconnect)
        run_id = await run_in_threadpool(
            registry.start, self.store, self.settings, name, body.inputs, Submitter.of_key(key), body.version
        )
        await run_in_threadpool(self._start, run_id, False)
        return await self._answer(request, response, key.id, run_id, wait, cancel_on_disconnect)

    # -- schedules --------------------------------------------------------------------------------

    @app.post(
        "/v1/schedules",
        status_code=201,
        response_model=ScheduleView,
        summary="Register a workflow and run it on its schedule (admin)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": AddSchedule.model_json_schema()},
                    "application/yaml": {"schema": {"type": "string", "description": "The workflow's YAML."}},
                },
            }
        },
    )
    async def add_schedule(self, request: Request) -> ScheduleView:
        """JSON: ``{"workflow": {..., "schedule": {"cron": "0 6 * * *"}}, "name": ..., "secrets": [...],
        "base_dir": ...}``, or the workflow's YAML alone. The workflow is registered as the next version
        of the name, as ``PUT /v1/workflows/{name}`` does; its runs carry this key's grants, and stop
        (the schedule is paused, with the reason) once the key is revoked or expires."""
        key = self.auth.authorize(request, Scope.ADMIN)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if content_type in YAML_TYPES:
                data, _ = await self._workflow_body(request)
                body = AddSchedule.model_validate({"workflow": data})
            else:
                raw = await request.body()
                body = AddSchedule.model_validate_json(raw or b"{}")
                check_data_bounds(body.workflow, self.limits, source="the submitted workflow")
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ApiProblem(422, f"the body is not an AddSchedule: {_pydantic_detail(exc)}") from None
        name = body.name or (body.workflow.get("name") if isinstance(body.workflow.get("name"), str) else None)
        if not name or not _NAME_RE.match(name):
            raise ApiProblem(422, f"{name!r} is not a schedule name: letters, digits, '.', '_' and '-', at most 100")
        workflow = await self._validated_body_workflow(name, body.workflow, body.base_dir)
        try:
            return await run_in_threadpool(
                partial(
                    schedules.add,
                    self.store,
                    self.settings,
                    workflow,
                    principal=f"key:{key.id}",
                    name=name,
                    secrets=body.secrets,
                )
            )
        except StepInputError as exc:  # a secret name that is not one
            raise ApiProblem(422, str(exc)) from None

    @app.get("/v1/schedules", response_model=list[ScheduleView], summary="Schedules, with their next fire times")
    def list_schedules(self, request: Request) -> list[ScheduleView]:
        self.auth.authorize(request, Scope.READ)
        return schedules.list_views(self.store)

    @app.get("/v1/schedules/{name}", response_model=ScheduleView, summary="A schedule, with its last decided tick")
    def get_schedule(self, request: Request, name: str) -> ScheduleView:
        self.auth.authorize(request, Scope.READ)
        return schedules.view(self.store, name)

    @app.get(
        "/v1/schedules/{name}/ticks",
        response_model=list[TickView],
        summary="A schedule's decided ticks, newest first: the run each started, or why it was skipped",
    )
    def schedule_ticks(
        self, request: Request, name: str, limit: Annotated[int, Query(ge=1, le=1000)] = 50
    ) -> list[TickView]:
        self.auth.authorize(request, Scope.READ)
        schedules.lookup(self.store, name)
        return [TickView.of(t) for t in self.store.schedule_ticks(name, limit)]

    @app.post("/v1/schedules/{name}/pause", response_model=ScheduleView, summary="Pause a schedule (admin)")
    def pause_schedule(self, request: Request, name: str) -> ScheduleView:
        key = self.auth.authorize(request, Scope.ADMIN)
        return schedules.pause(self.store, name, f"paused by key:{key.id}")

    @app.post(
        "/v1/schedules/{name}/resume",
        response_model=ScheduleView,
        summary="Resume a schedule (admin): ticks of the paused time are not run",
    )
    def resume_schedule(self, request: Request, name: str) -> ScheduleView:
        self.auth.authorize(request, Scope.ADMIN)
        return schedules.resume(self.store, name)

    @app.delete("/v1/schedules/{name}", status_code=204, summary="Remove a schedule (admin); its runs are kept")
    def remove_schedule(self, request: Request, name: str) -> Response:
        self.auth.authorize(request, Scope.ADMIN)
        schedules.remove(self.store, name)
        return Response(status_code=204)

    # -- keys -------------------------------------------------------------------------------------

    @app.post("/v1/keys", status_code=201, response_model=CreatedKey, summary="Create an API key (admin)")
    def create_key(self, request: Request, body: CreateKey) -> CreatedKey:
        self.auth.authorize(request, Scope.ADMIN)
        try:
            for secret in body.secrets:
                check_name(secret)
            key, record = make_key(
                self.store, body.scopes, body.name, expires_in=body.expires_in, secrets_granted=body.secrets
            )
        except (ValueError, StepInputError) as exc:
            raise ApiProblem(422, str(exc)) from None
        return CreatedKey(key=key, **KeyView.of(record).model_dump())

    @app.get("/v1/whoami", response_model=views.WhoAmI, summary="The calling key: its id, name and scopes")
    def whoami(self, request: Request) -> views.WhoAmI:
        key = self.auth.authorize(request, Scope.READ)
        return views.who_am_i(key)

    @app.get("/v1/keys", response_model=list[KeyView], summary="API keys (admin; never the keys themselves)")
    def list_keys(self, request: Request) -> list[KeyView]:
        self.auth.authorize(request, Scope.ADMIN)
        return [KeyView.of(r) for r in self.store.list_api_keys()]

    @app.post("/v1/keys/{key_id}/revoke", response_model=KeyView, summary="Revoke an API key (admin)")
    def revoke_key(self, request: Request, key_id: str) -> KeyView:
        self.auth.authorize(request, Scope.ADMIN)
        if not self.store.revoke_api_key(key_id):
            raise ApiProblem(404, f"no API key with id {key_id!r}; GET /v1/keys lists them")
        found = [r for r in self.store.list_api_keys() if r.id == key_id]
        return KeyView.of(found[0])

    @app.get("/v1/runs", response_model=RunPage, summary="Runs, newest first, paginated")
    def list_runs(
        self,
        request: Request,
        status: Annotated[RunStatus | None, Query(description="Only runs with this status.")] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 20,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
    ) -> RunPage:
        self.auth.authorize(request, Scope.READ)
        before = _parse_cursor(cursor) if cursor else None
        records = self.store.list_runs(limit + 1, status, before)
        page = records[:limit]
        lease = self.settings.lease_seconds
        return RunPage(
            runs=[RunView.of(r, lease_seconds=lease) for r in page],
            next_cursor=_cursor(page[-1]) if len(records) > limit else None,
        )

    @app.get(
        "/v1/run-summaries",
        response_model=views.SummaryPage,
        summary="Runs as a list shows them (steps counted, no inputs), newest first, filtered and paginated",
    )
    def run_summaries(
        self,
        request: Request,
        status: Annotated[RunStatus | None, Query(description="Only runs with this status.")] = None,
        workflow: Annotated[str | None, Query(max_length=200, description="Only runs of this workflow.")] = None,
        q: Annotated[
            str | None, Query(max_length=200, description="Text in the run's id, workflow name or error.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page.")] = None,
    ) -> views.SummaryPage:
        self.auth.authorize(request, Scope.READ)
        before = _parse_cursor(cursor) if cursor else None
        # before the query: following from here misses nothing. The store's newest id, not a run's: the
        # list follows every run's events (GET /v1/events, which any read key may follow anyway)
        last_event = self.store.last_event_id()
        records = self.store.run_summaries(limit + 1, status, workflow or None, q or None, before)
        return views.summary_page(records, limit, last_event)

    @app.get(
        "/v1/runs/{run_id}/graph",
        response_model=views.RunGraph,
        summary="The run's DAG: steps with their status, dependencies; a for_each step as one node",
    )
    def run_graph(self, request: Request, run_id: str) -> views.RunGraph:
        key = self.auth.authorize(request, Scope.READ)
        # the run's own newest event (not the store's: that would tell how busy other runs are), read
        # before the steps: ids follow commit order, so its events after this id may be news to the graph
        last_event = self.store.last_event_id(run_id)
        record = self.store.get_run(run_id)
        steps = self.store.get_steps(run_id)
        progress = reported = None
        if any(s.status in (StepStatus.RUNNING, StepStatus.RETRYING) for s in steps):  # for_each items done
            progress = views.item_progress(self.store.latest_events(run_id, "step.items", 1000))
            reported = views.step_progress(self.store.latest_events(run_id, "step.progress", 200))
        # the spec only for keys that may submit it again: it can hold container env values and mounts
        return views.run_graph(
            record,
            steps,
            time.time(),
            progress,
            with_spec=has_scope(key, Scope.SUBMIT),
            step_progress=reported,
            last_event_id=last_event,
            prices=self.prices,
        )

    @app.get("/v1/system", response_model=views.SystemView, summary="Throughput, latency, failures over time; nodes")
    def system(
        self,
        request: Request,
        window: Annotated[float, Query(ge=10, le=views.SYSTEM_WINDOW_MAX, description="Seconds back.")] = 900,
        buckets: Annotated[int, Query(ge=1, le=views.SYSTEM_BUCKETS_MAX)] = 60,
    ) -> views.SystemView:
        self.auth.authorize(request, Scope.READ)
        now = time.time()
        bucket = window / buckets
        since = now - buckets * bucket
        attempts = self.store.attempts_since(since)
        retries = [ts for ts, _ in self.store.event_times(since, ["step.retrying"])]
        counts = self.store.run_status_counts()
        from factory.agents_view import agents_view

        try:
            queues = views.pool_queues(agents_view(self.settings))
        except Exception:  # noqa: BLE001 - the agent manager may be starting or gone: no queues then
            queues = {}
        try:
            from ray._private.state import available_resources_per_node

            listed = ray.nodes()  # type: ignore[no-untyped-call]
            free = available_resources_per_node()  # type: ignore[no-untyped-call]
            nodes = views.ray_nodes(listed, free)
        except Exception:  # noqa: BLE001 - Ray's internal state API: the nodes are optional
            nodes = []
        return views.SystemView(
            now=now,
            window=window,
            bucket=bucket,
            series=views.system_series(attempts, retries, now, window, bucket),
            runs_by_status={s.value: n for s, n in counts.items()},
            queues=queues,
            nodes=nodes,
        )

    @app.get("/v1/runs/{run_id}", response_model=RunView, summary="A run with its steps and outputs")
    def get_run(self, request: Request, run_id: str) -> RunView:
        self.auth.authorize(request, Scope.READ)
        record = self.store.get_run(run_id)
        return RunView.of(
            record,
            self.store.get_steps(run_id),
            lease_seconds=self.settings.lease_seconds,
            prices=self.prices,
            spent=run_spent(self.store, run_id),
        )

    @app.get(
        "/v1/runs/{run_id}/attempts",
        response_model=list[AttemptView],
        summary="A run's finished attempts: what each printed or logged, and its error",
    )
    def attempts(
        self,
        request: Request,
        run_id: str,
        step: Annotated[str | None, Query(max_length=200, description="Only this step's attempts.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_ATTEMPTS_PAGE, description="At most this many, the newest.")] = 200,
    ) -> list[AttemptView]:
        """Oldest first; the newest ``limit`` of them. Each attempt's logs were bounded when it
        ran (``max_log_bytes``), so a page is at most ``limit`` times that."""
        self.auth.authorize(request, Scope.READ)
        self.store.get_run(run_id)  # 404 for an unknown run
        return [AttemptView.of(a) for a in self.store.get_attempts(run_id, step, limit)]

    @app.post("/v1/runs/{run_id}/cancel", status_code=202, response_model=Accepted, summary="Cancel a run")
    def cancel(self, request: Request, run_id: str) -> Accepted:
        self.auth.authorize(request, Scope.SUBMIT)
        if not cancel_run(run_id, store=self.store, settings=self.settings):
            status = self.store.get_run(run_id).status.value
            raise ApiProblem(409, f"run {run_id} has already finished ({status}); nothing to cancel", run_status=status)
        return Accepted(run_id=run_id, status="cancelling", detail="attempts in flight are being stopped")

    @app.post("/v1/runs/{run_id}/resume", status_code=202, response_model=Accepted, summary="Resume a run")
    def resume(self, request: Request, run_id: str, body: ResumeBody | None = None) -> Accepted:
        """Finish an interrupted, failed or cancelled run; committed steps are not run again.
        ``budget`` replaces limits the run had (a run stopped at its budget continues)."""
        key = self.auth.authorize(request, Scope.SUBMIT)
        record = self.store.get_run(run_id)
        if record.status == RunStatus.SUCCEEDED:
            raise RunStateError(f"run {run_id} already succeeded; nothing to resume")
        starter_id = record.grants.principal.removeprefix("key:") if record.grants else None
        starter = next((k for k in self.store.list_api_keys() if k.id == starter_id), None) if starter_id else None
        problem = resume_problem(record.grants, has_scope(key, Scope.ADMIN), starter, time.time())
        if problem:
            raise PermissionDeniedError(problem)
        lapsed = (record.heartbeat_at or 0) < time.time() - self.settings.lease_seconds
        if record.owner and not lapsed and not owner_is_gone(record.owner):
            raise RunStateError(f"run {run_id} is being run right now; wait for it or cancel it first")
        after = self.store.last_event_id()
        # pending at once, with its event: a client that waits from `after_event_id` never sees
        # the run's old final status; the runner then starts it as any pending run (a cancel
        # asked from now on is kept, an earlier one is cleared: resuming overrides it)
        self.store.clear_cancel(run_id)
        if body is not None and body.budget is not None:
            starter_key = record.grants.principal if record.grants else None
            if not has_scope(key, Scope.ADMIN) and starter_key != f"key:{key.id}":
                raise PermissionDeniedError(
                    f"only the key that started run {run_id} or an admin key may change its budget; "
                    "resume it without a budget, or ask an admin"
                )
            workflow = with_budget(Workflow.model_validate_json(record.spec_json), body.budget)
            self.store.set_run_spec(run_id, workflow.model_dump_json(by_alias=True))
        self.store.record([RunChange(run_id, RunStatus.PENDING, "run.resume_requested", data={"by": f"key:{key.id}"})])
        self._start(run_id, False)
        return Accepted(
            run_id=run_id,
            status="resuming",
            detail="steps that committed their output are kept",
            after_event_id=after,
        )

    @app.post(
        "/v1/runs/{run_id}/steps/{step_id}/approval",
        response_model=ApprovalAnswer,
        summary="Decide at an approval gate",
    )
    def approval(self, request: Request, run_id: str, step_id: str, body: ApprovalBody) -> ApprovalAnswer:
        """Approve or reject a gate that waits. The key must be one of the gate's approvers
        (scope:admin by default). The first decision stands (409 after); it is the step's
        output. A run parked at its gates goes on at once."""
        key = self.auth.authorize(request, Scope.READ)  # the gate's approvers say who may decide
        after = self.store.last_event_id()
        record = approve_gate(
            Decision(run_id=run_id, step_id=step_id, approved=body.approved, comment=body.comment),
            key=key,
            store=self.store,
            settings=self.settings,
        )
        run = self.store.get_run(run_id)
        status = run.status.value
        if run.status == RunStatus.WAITING or run_is_stalled(run, self.settings.lease_seconds, time.time()):
            self.store.record(
                [RunChange(run_id, RunStatus.PENDING, "run.resume_requested", data={"by": f"key:{key.id}"})]
            )
            self._start(run_id, False)
            status = RunStatus.PENDING.value
        return ApprovalAnswer(decision=record, run_status=status, after_event_id=after)

    @app.get(
        "/v1/runs/{run_id}/events",
        summary="The run's events as Server-Sent Events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def events(
        self,
        request: Request,
        run_id: str,
        after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID, description="Start after this event id.")] = 0,
        last_event_id: Annotated[str | None, Header(description="Resume after this id (SSE reconnects).")] = None,
        follow: Annotated[bool, Query(description="Keep the stream open until the run ends.")] = True,
        limit: Annotated[
            int | None, Query(ge=1, le=MAX_EVENTS_PAGE, description="Without follow: at most this many events.")
        ] = None,
    ) -> StreamingResponse:
        key = self.auth.authorize(request, Scope.READ)
        await run_in_threadpool(self.store.get_run, run_id)  # 404 before the stream starts
        start = max(after, _last_event_id(last_event_id))
        return self._stream(key.id, run_id, start, follow, limit)

    @app.get(
        "/v1/events",
        summary="Every run's events as Server-Sent Events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def all_events(
        self,
        request: Request,
        after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID, description="Start after this event id.")] = 0,
        last_event_id: Annotated[str | None, Header(description="Resume after this id (SSE reconnects).")] = None,
        follow: Annotated[bool, Query(description="Keep the stream open for new events.")] = False,
        limit: Annotated[
            int | None, Query(ge=1, le=MAX_EVENTS_PAGE, description="Without follow: at most this many events.")
        ] = None,
    ) -> StreamingResponse:
        key = self.auth.authorize(request, Scope.READ)
        start = max(after, _last_event_id(last_event_id))
        return self._stream(key.id, None, start, follow, limit)

    def _stream(
        self, key_id: str, run_id: str | None, after: int, follow: bool, limit: int | None
    ) -> StreamingResponse:
        """An SSE response, counted against the key's open streams (429 past the limit). A
        followed stream ends after ``api_stream_max_seconds`` (the client reconnects with
        Last-Event-ID); one that does not follow sends at most ``limit`` events (default
        MAX_EVENTS_PAGE) and ends: ask again from the last id for more."""
        open_now = self._streams.get(key_id, 0)
        if open_now >= self.settings.api_max_streams_per_key:
            raise ApiProblem(
                429,
                f"this key holds {open_now} event streams open already (the limit is "
                f"{self.settings.api_max_streams_per_key}); close one, or follow GET /v1/events for all runs",
                headers={"Retry-After": "5"},
            )
        count = limit if (limit is not None and not follow) else (None if follow else MAX_EVENTS_PAGE)
        lifetime = time.monotonic() + self.settings.api_stream_max_seconds

        async def counted() -> AsyncIterator[str]:
            # counted from the stream's first step: a response that never starts holds no place
            self._streams[key_id] = self._streams.get(key_id, 0) + 1
            try:
                async for chunk in self._sse(run_id, after, follow, count, lifetime):
                    yield chunk
            finally:
                left = self._streams.get(key_id, 1) - 1
                if left > 0:
                    self._streams[key_id] = left
                else:
                    self._streams.pop(key_id, None)

        return StreamingResponse(counted(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _sse(
        self, run_id: str | None, after: int, follow: bool, count: int | None, deadline: float
    ) -> AsyncIterator[str]:
        last, idle, sent = after, 0.0, 0
        while True:
            want = 500 if count is None else min(500, count - sent)
            page: list[Event] = await run_in_threadpool(self.store.events, last, run_id, want)
            for event in page:
                last = event.id
                payload = json.dumps(event.model_dump(mode="json"))
                yield f"id: {event.id}\nevent: {event.type}\ndata: {payload}\n\n"
            sent += len(page)
            if count is not None and sent >= count:
                return
            if len(page) == want and time.monotonic() <= deadline:
                continue
            if not follow or time.monotonic() > deadline:
                return
            if not page and run_id is not None:
                record = await run_in_threadpool(self.store.get_run, run_id)
                if record.status in FINAL_RUN_STATUSES:
                    final = await run_in_threadpool(self.store.events, last, run_id, 500)
                    if not final:
                        return
                    continue
            await asyncio.sleep(0.2)
            idle = 0.0 if page else idle + 0.2
            if idle >= 15:
                idle = 0.0
                yield ": keep-alive\n\n"

    @app.get("/v1/agents", summary="Agents of the catalogue with their pools' state")
    def agents(self, request: Request) -> dict[str, Any]:
        self.auth.authorize(request, Scope.READ)
        from factory.agents_view import agents_view

        return agents_view(self.settings)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def metrics(self, request: Request) -> PlainTextResponse:
        self.auth.authorize(request, Scope.READ)
        lines = [
            "# HELP factory_runs Runs in the store by status (latest 10000).",
            "# TYPE factory_runs gauge",
        ]
        counts: dict[str, int] = {s.value: 0 for s in RunStatus}
        for record in self.store.list_runs(limit=10_000):
            counts[record.status.value] += 1
        lines += [f'factory_runs{{status="{status}"}} {n}' for status, n in counts.items()]
        lines += [
            "# HELP factory_api_uptime_seconds Seconds since this API replica started.",
            "# TYPE factory_api_uptime_seconds gauge",
            f"factory_api_uptime_seconds {time.time() - self.started:.3f}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
