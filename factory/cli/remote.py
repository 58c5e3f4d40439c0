"""The CLI's backend over the Factory's HTTP API (``factory --api URL``): everything goes
through :class:`factory.client.FactoryClient`; runs run on the server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from factory.approvals import Decision
from factory.auth import Scope
from factory.cli.backend import (
    Checked,
    ProgressCounter,
    Registered,
    RegisteredInfo,
    RouteOptions,
    RunInfo,
    RunWaitTimeout,
    Watch,
)
from factory.client import ApiError, FactoryClient, WaitTimeoutError
from factory.costs import RunSpend
from factory.dag import read_workflow_file
from factory.engine import RunResult
from factory.errors import FactoryError, NoEligibleAgentError, WorkflowValidationError
from factory.limits import DocumentLimits
from factory.routing.models import RouteDecision, RouteRequest
from factory.schedules import ScheduleView, TickView
from factory.spec import Budget
from factory.store import (
    FINAL_RUN_STATUSES,
    ApiKeyRecord,
    ApprovalRecord,
    AttemptRecord,
    RunRecord,
    RunStatus,
    StepRecord,
)

LOCAL_ONLY_HINT = "with --api the server's own {what} is used; drop {option}"


def run_info(view: dict[str, Any]) -> RunInfo:
    """A run as the API shows it, as the store's records."""
    record = RunRecord(
        id=view["id"],
        workflow_name=view["workflow"],
        status=view["status"],
        spec_json="",
        inputs=view["inputs"],
        error=view.get("error"),
        created_at=view["created_at"],
        started_at=view.get("started_at"),
        finished_at=view.get("finished_at"),
    )
    steps = [
        StepRecord(
            run_id=view["id"],
            **{k: v for k, v in s.items() if k != "output"},
            output_json=None if s["output"] is None and s["status"] != "succeeded" else json.dumps(s["output"]),
        )
        for s in view.get("steps") or []
    ]
    spent = view.get("spent")
    return RunInfo(record, bool(view.get("stalled")), steps, RunSpend.model_validate(spent) if spent else None)


def _result(run: dict[str, Any]) -> RunResult:
    outputs = {s["step_id"]: s["output"] for s in run.get("steps") or [] if s["status"] == "succeeded"}
    return RunResult(run["id"], RunStatus(run["status"]), outputs, run.get("error"))


class ApiBackend:
    """Commands on the HTTP API at ``client``'s base URL, with its key."""

    def __init__(self, client: FactoryClient) -> None:
        self.client = client
        self.where = f"the API at {client.http.base_url}"

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def _refuse_local(option: str, what: str, given: object) -> None:
        if given is not None:
            raise FactoryError(LOCAL_ONLY_HINT.format(what=what, option=option))

    # -- runs ----------------------------------------------------------------------------------

    def validate(self, workflow: Path, inputs: dict[str, Any], agents: Path | None) -> Checked:
        self._refuse_local("--agents", "agent catalogue", agents)
        data = read_workflow_file(workflow, limits=DocumentLimits())
        view = self.client.validate(data, inputs)
        if not view["valid"] or view.get("refused"):
            raise WorkflowValidationError(view["problems"], str(workflow))
        return Checked(view["name"], list(view["steps"]))

    def _follow(self, run_id: str, watch: Watch, after: int = 0) -> RunResult:
        watch.started(run_id)
        counter = ProgressCounter()
        if after:  # a resumed run: its steps are known already
            counter.counts.total = len(self.client.get_run(run_id).get("steps") or [])

        def on_event(event: dict[str, Any]) -> None:
            watch.progress(counter.add(event.get("type", ""), event.get("step_id"), event.get("data")))
            watch.event(event)

        try:
            run = self.client.wait(run_id, watch.timeout, after=after, on_event=on_event)
        except WaitTimeoutError:
            assert watch.timeout is not None
            raise RunWaitTimeout(
                run_id, watch.timeout, f"it goes on on the server; `factory --api URL status {run_id}` shows it"
            ) from None
        return _result(run)

    def run(
        self, workflow: Path, inputs: dict[str, Any], agents: Path | None, watch: Watch, budget: Budget | None = None
    ) -> RunResult:
        self._refuse_local("--agents", "agent catalogue", agents)
        if watch.run_id is not None:
            raise FactoryError("with --api the server chooses the run id; drop --run-id")
        data: Any = workflow
        if budget is not None:  # the run's limits travel in its workflow's budget:
            data = read_workflow_file(workflow, limits=DocumentLimits())
            if isinstance(data, dict):
                own = data.get("budget")
                own = own if isinstance(own, dict) else {}
                data = {**data, "budget": {**own, **budget.model_dump(exclude_none=True)}}
        run_id = self.client.submit(data, inputs)
        return self._follow(run_id, watch)

    def resume(self, run_id: str, agents: Path | None, watch: Watch, budget: Budget | None = None) -> RunResult:
        self._refuse_local("--agents", "agent catalogue", agents)
        accepted = self.client.resume(run_id, budget.model_dump(exclude_none=True) if budget else None)
        return self._follow(run_id, watch, after=int(accepted.get("after_event_id") or 0))

    def approve(
        self, decision: Decision, watch: Watch | None, agents: Path | None = None
    ) -> tuple[ApprovalRecord, RunResult | None]:
        self._refuse_local("--agents", "agent catalogue", agents)
        answer = self.client.approve(decision.run_id, decision.step_id, decision.approved, decision.comment)
        record = ApprovalRecord.model_validate(answer["decision"])
        if watch is None or answer.get("run_status") != RunStatus.PENDING.value:
            return record, None  # not resumed by this decision: a live coordinator takes it
        return record, self._follow(decision.run_id, watch, after=int(answer.get("after_event_id") or 0))

    def cancel(self, run_id: str) -> bool:
        try:
            self.client.cancel(run_id)
        except ApiError as exc:
            if exc.status == 409 and exc.problem.get("run_status") in {s.value for s in FINAL_RUN_STATUSES}:
                return False  # the problem names the run's final status
            raise
        return True

    def list_runs(self, limit: int, status: RunStatus | None) -> list[RunInfo]:
        infos: list[RunInfo] = []
        cursor: str | None = None
        while len(infos) < limit:  # the API pages at 200 runs
            page = self.client.list_runs(status.value if status else None, min(200, limit - len(infos)), cursor)
            infos += [run_info(view) for view in page["runs"]]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return infos

    def get_run(self, run_id: str) -> RunInfo:
        return run_info(self.client.get_run(run_id))

    def attempts(self, run_id: str, step: str | None) -> list[AttemptRecord]:
        return [AttemptRecord(run_id=run_id, **view) for view in self.client.attempts(run_id, step)]

    def events(self, run_id: str | None, after: int, follow: bool) -> Iterator[dict[str, Any]]:
        return self.client.events(run_id, after, follow)

    # -- agents --------------------------------------------------------------------------------

    def route(self, request: RouteRequest, options: RouteOptions) -> RouteDecision:
        self._refuse_local("--agents", "agent catalogue", options.agents)
        self._refuse_local("--scorer", "scorer (FACTORY_ROUTER_SCORER there)", options.scorer)
        self._refuse_local("--model-path", "embedding model", options.model_path)
        try:
            answer = self.client.route(request.text, request.capabilities, request.resources)
        except ApiError as exc:
            filtered = exc.problem.get("filtered_out")
            if exc.status == 422 and isinstance(filtered, dict):
                raise NoEligibleAgentError(filtered, request.capabilities) from None
            raise
        return RouteDecision.model_validate(answer)

    def correct_route(self, text: str, agent: str, decision_id: str | None) -> int:
        try:
            return int(self.client.route_feedback(text, agent, decision_id)["id"])
        except ApiError as exc:
            if exc.status == 422:
                raise FactoryError(str(exc.problem.get("detail") or exc)) from None
            raise

    def agents(self, catalogue: Path | None) -> dict[str, Any]:
        self._refuse_local("--agents", "agent catalogue", catalogue)
        return self.client.agents()

    # -- keys ----------------------------------------------------------------------------------

    def create_key(
        self, scopes: list[Scope], name: str, expires_in: float | None, secrets: list[str]
    ) -> tuple[str, ApiKeyRecord]:
        created = self.client.create_key([s.value for s in scopes], name, expires_in, secrets)
        record = ApiKeyRecord(key_hash="", **{k: v for k, v in created.items() if k != "key"})
        return created["key"], record

    def list_keys(self) -> list[ApiKeyRecord]:
        return [ApiKeyRecord(key_hash="", **view) for view in self.client.list_keys()]

    def revoke_key(self, key_id: str) -> bool:
        try:
            self.client.revoke_key(key_id)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # -- registered workflows ------------------------------------------------------------------

    def register_workflow(
        self, workflow: Path, name: str | None, secrets: list[str], base_dir: str | None
    ) -> Registered:
        view = self.client.register_workflow(workflow, name, secrets, base_dir)
        return Registered(view["name"], view["version"])

    def list_workflows(self) -> list[RegisteredInfo]:
        return [
            RegisteredInfo(
                name=v["name"],
                version=v["version"],
                inputs=v["inputs"],
                secrets=v["secrets"],
                created_at=v["created_at"],
                created_by=v["created_by"],
            )
            for v in self.client.list_workflows()
        ]

    def add_schedule(self, workflow: Path, name: str | None, secrets: list[str], base_dir: str | None) -> ScheduleView:
        return ScheduleView.model_validate(self.client.add_schedule(workflow, name, secrets, base_dir))

    def list_schedules(self) -> list[ScheduleView]:
        return [ScheduleView.model_validate(v) for v in self.client.list_schedules()]

    def schedule_action(self, name: str, action: Literal["pause", "resume", "remove"]) -> ScheduleView | None:
        answer = self.client.schedule_action(name, action)
        return None if answer is None else ScheduleView.model_validate(answer)

    def schedule_ticks(self, name: str, limit: int) -> list[TickView]:
        return [TickView.model_validate(v) for v in self.client.schedule_ticks(name, limit)]

    def start_workflow(
        self, name: str, inputs: dict[str, Any], version: int | None, watch: Watch | None
    ) -> tuple[str, RunResult | None]:
        run_id = self.client.start(name, inputs, version)
        if watch is None:
            return run_id, None
        return run_id, self._follow(run_id, watch)
