"""The Factory's HTTP API (FastAPI on Ray Serve): workflows, runs, events, agents, health, metrics.

``POST /v1/route`` is served by a separate application (deployments.route) whose
replicas keep the router warm; the Serve proxy sends that path there.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import ray
import yaml
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from starlette.concurrency import run_in_threadpool

from deployments.http import ApiProblem, Authorizer, install_error_handlers
from factory import __version__
from factory.api import cancel as cancel_run
from factory.api import create_run, store_for
from factory.auth import Scope
from factory.catalog import load_catalog
from factory.dag import validate_data
from factory.errors import RunStateError, WorkflowValidationError
from factory.runner import get_runner
from factory.settings import Settings
from factory.store import FINAL_RUN_STATUSES, Event, RunRecord, RunStatus, StepRecord

MAX_EVENT_ID = 2**53  # event ids are 64-bit integers in the store; JSON clients handle up to 2**53
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


# -- request and response models ---------------------------------------------------------------


class SubmitWorkflow(BaseModel):
    """A workflow (the same mapping as its YAML) and input values."""

    workflow: dict[str, Any] = Field(description="The workflow: name, inputs, steps.")
    inputs: dict[str, Any] = Field(default_factory=dict, description="Input values over the workflow's defaults.")


class Submitted(BaseModel):
    run_id: str
    status: RunStatus
    url: str


class StepView(BaseModel):
    step_id: str
    status: str
    attempts: int
    output: Any = None
    error: str | None = None
    cached: bool = False
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def of(cls, s: StepRecord) -> "StepView":
        return cls(
            step_id=s.step_id,
            status=s.status.value,
            attempts=s.attempts,
            output=s.output,
            error=s.error,
            cached=s.cached,
            started_at=s.started_at,
            finished_at=s.finished_at,
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
    steps: list[StepView] | None = None

    @classmethod
    def of(cls, r: RunRecord, steps: list[StepRecord] | None = None) -> "RunView":
        return cls(
            id=r.id,
            workflow=r.workflow_name,
            status=r.status,
            inputs=r.inputs,
            error=r.error,
            created_at=r.created_at,
            started_at=r.started_at,
            finished_at=r.finished_at,
            steps=None if steps is None else [StepView.of(s) for s in steps],
        )


class RunPage(BaseModel):
    runs: list[RunView]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next (older) page; null at the end.")


class Accepted(BaseModel):
    run_id: str
    status: str
    detail: str


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


@serve.deployment(name="FactoryAPI", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
@serve.ingress(app)
class FactoryAPI:
    def __init__(self, settings: dict[str, Any], open_mode: bool = False) -> None:
        self.settings = Settings.model_validate(settings)
        self.store = store_for(self.settings)
        self.auth = Authorizer(self.store, self.settings, open_mode)
        self.runner = get_runner(self.settings)
        self.catalog = load_catalog(self.settings.agents_file) if self.settings.agents_file else None
        LIMITS["max_body"] = self.settings.api_max_body_bytes
        self.requests = 0
        self.started = time.time()

    def _start(self, run_id: str, resume: bool) -> None:
        """Hand the run to the runner actor; fetch the actor again if it died."""
        try:
            ray.get(self.runner.start.remote(run_id, resume), timeout=30)
        except RayActorError:
            self.runner = get_runner(self.settings)
            ray.get(self.runner.start.remote(run_id, resume), timeout=30)

    @app.get("/healthz", summary="Liveness: the API and its store answer")
    def healthz(self) -> dict[str, Any]:
        self.store.list_runs(limit=1)
        return {"status": "ok", "version": __version__}

    @app.post(
        "/v1/workflows",
        status_code=202,
        response_model=Submitted,
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
    async def submit(self, request: Request) -> Submitted:
        """JSON: ``{"workflow": {...}, "inputs": {...}}``; or the workflow's YAML with
        Content-Type application/yaml. The run starts at once; follow it with the events endpoint."""
        self.auth.authorize(request, Scope.SUBMIT)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = await request.body()
        try:
            if content_type in YAML_TYPES:
                data, inputs = yaml.safe_load(raw.decode("utf-8")), {}
            elif content_type in ("application/json", ""):
                body = SubmitWorkflow.model_validate_json(raw or b"{}")
                data, inputs = body.workflow, body.inputs
            else:
                raise ApiProblem(415, f"send application/json or application/yaml, not {content_type!r}")
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise WorkflowValidationError([f"malformed YAML: {exc}"]) from None
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            errors: list[dict[str, Any]] = getattr(exc, "errors", lambda: [])()
            detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors) or str(
                exc
            )
            raise ApiProblem(422, f"the body is not {{'workflow': ..., 'inputs': ...}}: {detail}") from None
        workflow = await run_in_threadpool(validate_data, data, None, "the submitted workflow", True, self.catalog)
        run_id = await run_in_threadpool(create_run, workflow, inputs, store=self.store, settings=self.settings)
        await run_in_threadpool(self._start, run_id, False)
        return Submitted(run_id=run_id, status=RunStatus.PENDING, url=f"/v1/runs/{run_id}")

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
        return RunPage(
            runs=[RunView.of(r) for r in page], next_cursor=_cursor(page[-1]) if len(records) > limit else None
        )

    @app.get("/v1/runs/{run_id}", response_model=RunView, summary="A run with its steps and outputs")
    def get_run(self, request: Request, run_id: str) -> RunView:
        self.auth.authorize(request, Scope.READ)
        return RunView.of(self.store.get_run(run_id), self.store.get_steps(run_id))

    @app.post("/v1/runs/{run_id}/cancel", status_code=202, response_model=Accepted, summary="Cancel a run")
    def cancel(self, request: Request, run_id: str) -> Accepted:
        self.auth.authorize(request, Scope.SUBMIT)
        if not cancel_run(run_id, store=self.store):
            status = self.store.get_run(run_id).status.value
            raise RunStateError(f"run {run_id} has already finished ({status}); nothing to cancel")
        return Accepted(run_id=run_id, status="cancelling", detail="attempts in flight are being stopped")

    @app.post("/v1/runs/{run_id}/resume", status_code=202, response_model=Accepted, summary="Resume a run")
    def resume(self, request: Request, run_id: str) -> Accepted:
        """Finish an interrupted, failed or cancelled run; committed steps are not run again."""
        self.auth.authorize(request, Scope.SUBMIT)
        record = self.store.get_run(run_id)
        if record.status == RunStatus.SUCCEEDED:
            raise RunStateError(f"run {run_id} already succeeded; nothing to resume")
        lapsed = (record.heartbeat_at or 0) < time.time() - self.settings.lease_seconds
        if record.owner and not lapsed:
            raise RunStateError(f"run {run_id} is being run right now; wait for it or cancel it first")
        self._start(run_id, True)
        return Accepted(run_id=run_id, status="resuming", detail="steps that committed their output are kept")

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
    ) -> StreamingResponse:
        self.auth.authorize(request, Scope.READ)
        await run_in_threadpool(self.store.get_run, run_id)  # 404 before the stream starts
        start = after
        if last_event_id:
            try:
                last_seen = int(last_event_id)
                if not 0 <= last_seen <= MAX_EVENT_ID:
                    raise ValueError
            except ValueError:
                raise ApiProblem(422, f"Last-Event-ID must be an event id (0 to {MAX_EVENT_ID})") from None
            start = max(start, last_seen)
        return StreamingResponse(
            self._sse(run_id, start, follow), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def _sse(self, run_id: str, after: int, follow: bool) -> AsyncIterator[str]:
        last, idle = after, 0.0
        while True:
            page: list[Event] = await run_in_threadpool(self.store.events, last, run_id, 500)
            for event in page:
                last = event.id
                payload = json.dumps(event.model_dump(mode="json"))
                yield f"id: {event.id}\nevent: {event.type}\ndata: {payload}\n\n"
            if len(page) == 500:
                continue
            if not follow:
                return
            if not page:
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
        from deployments.agents_view import agents_view

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
