"""The CLI's backend on this machine's state: the store the settings name, runs executed by
this process on Ray (:mod:`factory.api`)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from factory import api
from factory.approvals import Decision
from factory.auth import Scope, create_key
from factory.catalog import Catalog, load_catalog
from factory.cli.backend import (
    Checked,
    Registered,
    RegisteredInfo,
    RouteOptions,
    RunInfo,
    RunWaitTimeout,
    Watch,
)
from factory.dag import load_workflow, read_workflow_file, validate_data
from factory.engine import RunResult
from factory.errors import FactoryError
from factory.limits import DocumentLimits
from factory.routing.models import RouteDecision, RouteRequest
from factory.schedules import ScheduleView, TickView
from factory.settings import Settings
from factory.spec import Budget, Workflow
from factory.store import ApiKeyRecord, ApprovalRecord, AttemptRecord, RunStatus, Store

FOLLOW_SECONDS = 0.25  # how often `factory run` reads its run's new events for the progress bar


class LocalBackend:
    """Commands on the store of ``settings``, opened on first use and closed by :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.where = "local state"
        self._store: Store | None = None
        self._route_catalog: Catalog | None = None  # the catalogue of the last route: --correct checks against it

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = api.store_for(self.settings)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _limits(self) -> DocumentLimits:
        return DocumentLimits.from_settings(self.settings)

    def _info(self, run_id: str, with_steps: bool = False) -> RunInfo:
        record = self.store.get_run(run_id)
        steps = self.store.get_steps(run_id) if with_steps else []
        spent = api.run_spent(self.store, run_id) if with_steps else None
        return RunInfo(record, api.run_is_stalled(record, self.settings.lease_seconds, time.time()), steps, spent)

    # -- runs ----------------------------------------------------------------------------------

    def validate(self, workflow: Path, inputs: dict[str, Any], agents: Path | None) -> Checked:
        catalog = load_catalog(agents) if agents is not None else None
        wf = load_workflow(workflow, agents=catalog, limits=self._limits())
        api.merge_inputs(wf, inputs, self._limits())
        return Checked(wf.name, [s.id for s in wf.steps])

    def _until_deadline(self, watch: Watch, run: Any) -> RunResult:
        """Run ``run(on_start)``; at ``watch.timeout`` cancel the run (it lives in this process)."""
        started: list[str] = []
        deadline_passed = threading.Event()
        stop_following = threading.Event()
        follower: list[threading.Thread] = []

        def on_start(run_id: str) -> None:
            started.append(run_id)
            watch.started(run_id)
            if watch.on_event is not None:  # the steps' progress events, for the bar
                follower.append(self._follow_events(run_id, watch, stop_following))
            if deadline_passed.is_set():  # the deadline came while Ray was starting
                api.cancel(run_id, settings=self.settings)

        timer: threading.Timer | None = None
        if watch.timeout is not None:

            def at_deadline() -> None:
                deadline_passed.set()
                if started:
                    api.cancel(started[0], settings=self.settings)

            timer = threading.Timer(watch.timeout, at_deadline)
            timer.daemon = True
            timer.start()
        try:
            result: RunResult = run(on_start)
        finally:
            if timer is not None:
                timer.cancel()
            stop_following.set()
            for thread in follower:
                thread.join(timeout=5)
        if deadline_passed.is_set() and result.status == RunStatus.CANCELLED:
            assert watch.timeout is not None
            raise RunWaitTimeout(
                result.run_id,
                watch.timeout,
                f"it ran in this process and was cancelled; `factory resume {result.run_id}` finishes it",
            )
        return result

    def _follow_events(self, run_id: str, watch: Watch, stop: threading.Event) -> threading.Thread:
        """A thread handing the run's events to ``watch`` (every FOLLOW_SECONDS) while this
        process runs it: the coordinator does not see what its workers publish (step.progress)."""

        def follow() -> None:
            last = 0
            while True:
                final = stop.is_set()
                try:
                    for event in self.store.events(last, run_id, 500):
                        last = event.id
                        watch.event(event.model_dump(mode="json"))
                except Exception:  # noqa: BLE001 - the bar's details only; the run goes on
                    return
                if final:
                    return
                stop.wait(FOLLOW_SECONDS)

        thread = threading.Thread(target=follow, name=f"events-{run_id}", daemon=True)
        thread.start()
        return thread

    def run(
        self, workflow: Path, inputs: dict[str, Any], agents: Path | None, watch: Watch, budget: Budget | None = None
    ) -> RunResult:
        catalog = load_catalog(agents) if agents is not None else None
        wf = load_workflow(workflow, agents=catalog, limits=self._limits())
        return self._until_deadline(
            watch,
            lambda on_start: api.run(
                wf,
                inputs,
                store=self.store,
                settings=self.settings,
                on_progress=watch.on_progress,
                on_start=on_start,
                run_id=watch.run_id,
                agents=catalog,
                validated=True,
                budget=budget,
            ),
        )

    def resume(self, run_id: str, agents: Path | None, watch: Watch, budget: Budget | None = None) -> RunResult:
        def go(on_start: Any) -> RunResult:
            # on_start once the run is ours and an earlier cancel cleared: a --timeout that
            # passes while Ray starts then still cancels it
            return api.resume(
                run_id,
                store=self.store,
                settings=self.settings,
                on_progress=watch.on_progress,
                agents=agents,
                on_start=on_start,
                budget=budget,
            )

        return self._until_deadline(watch, go)

    def cancel(self, run_id: str) -> bool:
        return api.cancel(run_id, store=self.store, settings=self.settings)

    def approve(
        self, decision: Decision, watch: Watch | None, agents: Path | None = None
    ) -> tuple[ApprovalRecord, RunResult | None]:
        record = api.approve(decision, store=self.store, settings=self.settings)
        run = self.store.get_run(decision.run_id)
        stalled = api.run_is_stalled(run, self.settings.lease_seconds, time.time())
        if watch is None or not (run.status == RunStatus.WAITING or stalled):
            return record, None  # a live coordinator runs it: it takes the decision itself
        # parked (nobody runs it) or its coordinator died: go on with it here
        return record, self.resume(decision.run_id, agents, watch)

    def list_runs(self, limit: int, status: RunStatus | None) -> list[RunInfo]:
        now = time.time()
        return [
            RunInfo(r, api.run_is_stalled(r, self.settings.lease_seconds, now))
            for r in self.store.list_runs(limit, status)
        ]

    def get_run(self, run_id: str) -> RunInfo:
        return self._info(run_id, with_steps=True)

    def attempts(self, run_id: str, step: str | None) -> list[AttemptRecord]:
        self.store.get_run(run_id)
        return self.store.get_attempts(run_id, step)

    def events(self, run_id: str | None, after: int, follow: bool) -> Iterator[dict[str, Any]]:
        from factory.events import tail

        if run_id is not None:
            self.store.get_run(run_id)
        for event in tail(self.store, after, run_id, follow=follow):
            yield event.model_dump(mode="json")

    # -- agents --------------------------------------------------------------------------------

    def route(self, request: RouteRequest, options: RouteOptions) -> RouteDecision:
        from factory.routing import Router, Scorer, fallback_for, make_scorer
        from factory.routing.corrections import CorrectionSync

        catalog = load_catalog(options.agents or self.settings.agents_file or Path("agents.yaml"))
        scorer = options.scorer or self.settings.router_scorer
        chosen: Scorer
        if scorer == "embedding" and options.model_path is not None:
            from factory.routing.embedding import EmbeddingScorer

            chosen = EmbeddingScorer(
                catalog,
                model_dir=options.model_path,
                backend=self.settings.embedding_backend,
                cache_dir=self.settings.home / "cache",
            )
        else:
            chosen = make_scorer(scorer, catalog, self.settings)
        router = Router(catalog, chosen, fallback=fallback_for(catalog, self.settings))
        self._route_catalog = catalog  # what --correct checks its agent against
        CorrectionSync().pull(router, self.store)  # what people corrected before (the newest count)
        return router.route(request)

    def correct_route(self, text: str, agent: str, decision_id: str | None) -> int:
        from factory.routing.corrections import MAX_CORRECTION_CHARS
        from factory.store import RouteCorrection

        catalog = self._route_catalog or load_catalog(self.settings.agents_file or Path("agents.yaml"))
        if agent not in {a.name for a in catalog.agents}:
            raise FactoryError(f"--correct {agent}: the catalogue has no such agent; `factory agents` lists them")
        if len(text) > MAX_CORRECTION_CHARS:
            raise FactoryError(f"a corrected task is at most {MAX_CORRECTION_CHARS} characters")
        record = RouteCorrection(text=text, agent=agent, decision_id=decision_id, who="local", created_at=time.time())
        return self.store.add_route_correction(record).id

    def agents(self, catalogue: Path | None) -> dict[str, Any]:
        from factory.agents_view import agents_view
        from factory.raysession import join_running_ray

        settings = self.settings
        if catalogue is not None:
            settings = settings.model_copy(update={"agents_file": catalogue})
        return agents_view(settings, with_pools=join_running_ray(settings.ray_address))

    # -- keys ----------------------------------------------------------------------------------

    def create_key(
        self, scopes: list[Scope], name: str, expires_in: float | None, secrets: list[str]
    ) -> tuple[str, ApiKeyRecord]:
        return create_key(self.store, scopes, name, expires_in=expires_in, secrets_granted=secrets)

    def list_keys(self) -> list[ApiKeyRecord]:
        return self.store.list_api_keys()

    def revoke_key(self, key_id: str) -> bool:
        return self.store.revoke_api_key(key_id)

    # -- registered workflows ------------------------------------------------------------------

    def register_workflow(
        self, workflow: Path, name: str | None, secrets: list[str], base_dir: str | None
    ) -> Registered:
        from factory import registry

        loaded = self._loaded_for_registration(workflow, base_dir)
        record = registry.register(self.store, loaded, name=name, secrets=secrets, created_by="local")
        return Registered(record.name, record.version)

    def _loaded_for_registration(self, workflow: Path, base_dir: str | None) -> Workflow:
        if base_dir is None:  # the operator's machine: modules are checked, from the YAML's folder
            return load_workflow(workflow, limits=self._limits())
        if not Path(base_dir).is_dir():
            raise FactoryError(f"--base-dir {base_dir} is not a folder")
        data = read_workflow_file(workflow, limits=self._limits())
        return validate_data(data, str(Path(base_dir).resolve()), str(workflow), True, limits=self._limits())

    def list_workflows(self) -> list[RegisteredInfo]:
        return [
            RegisteredInfo(
                name=r.name,
                version=r.version,
                inputs=json.loads(r.spec_json).get("inputs") or {},
                secrets=r.secrets,
                created_at=r.created_at,
                created_by=r.created_by,
            )
            for r in self.store.list_registered_workflows()
        ]

    def add_schedule(self, workflow: Path, name: str | None, secrets: list[str], base_dir: str | None) -> ScheduleView:
        from factory import schedules

        loaded = self._loaded_for_registration(workflow, base_dir)
        return schedules.add(self.store, self.settings, loaded, principal="local", name=name, secrets=secrets)

    def list_schedules(self) -> list[ScheduleView]:
        from factory import schedules

        return schedules.list_views(self.store)

    def schedule_action(self, name: str, action: Literal["pause", "resume", "remove"]) -> ScheduleView | None:
        from factory import schedules

        if action == "pause":
            return schedules.pause(self.store, name, "paused on the machine (factory schedules pause)")
        if action == "resume":
            return schedules.resume(self.store, name)
        schedules.remove(self.store, name)
        return None

    def schedule_ticks(self, name: str, limit: int) -> list[TickView]:
        from factory import schedules

        schedules.lookup(self.store, name)
        return [TickView.of(t) for t in self.store.schedule_ticks(name, limit)]

    def start_workflow(
        self, name: str, inputs: dict[str, Any], version: int | None, watch: Watch | None
    ) -> tuple[str, RunResult | None]:
        from factory import registry
        from factory.policy import Submitter

        if watch is None:  # refused before a run exists that nothing would ever start
            raise FactoryError(
                "--no-wait needs a Factory service to run the run: add --api URL (see `factory up`); "
                "here the run lives in this process, so follow it (leave out --no-wait)"
            )
        run_id = registry.start(self.store, self.settings, name, inputs, Submitter(principal="local"), version)

        def go(on_start: Any) -> RunResult:
            on_start(run_id)
            return api.resume(
                run_id, store=self.store, settings=self.settings, on_progress=watch.on_progress, pending_only=True
            )

        return run_id, self._until_deadline(watch, go)
