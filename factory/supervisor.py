"""The supervisor: no run stays ``pending`` or ``running`` for ever.

Every run has an owner that can die: the runner actor that hosts API runs, a
``factory run`` process, a node. The supervisor (a detached Ray actor that Ray restarts
when it dies, started by the API) looks every ``supervisor_interval_seconds`` for runs
that are pending or running with no live owner:

- an expired lease, or an owner known dead on this machine (factory.owner);
- a pending run nobody took within ``supervisor_pending_grace_seconds``;

and hands each to the runner to resume (committed steps are kept), or finishes a
cancel that was asked while nobody ran the run. A run adopted
``supervisor_max_adoptions`` times that never got going is failed with the reason.
:func:`decide` makes these choices from plain data (no Ray, no store, no clock of
its own); :class:`SupervisorActor` carries them out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import ray
from ray.exceptions import RayError

from factory.settings import Settings
from factory.store import RunRecord, RunStatus

log = logging.getLogger(__name__)

SUPERVISOR_NAME = "factory-supervisor"


@dataclass(frozen=True)
class Adoption:
    """What to do with one orphaned run."""

    run_id: str
    action: Literal["start", "resume", "cancel", "fail"]
    reason: str


def decide(
    runs: Iterable[RunRecord],
    *,
    now: float,
    lease_seconds: float,
    pending_grace: float,
    adopted: dict[str, int],
    max_adoptions: int,
    owner_gone: Callable[[str], bool],
) -> list[Adoption]:
    """The runs among ``runs`` that nobody runs, and what to do with each."""
    decisions: list[Adoption] = []
    for run in runs:
        if run.status not in (RunStatus.PENDING, RunStatus.RUNNING):
            continue
        if run.owner:
            expired = (run.heartbeat_at or 0) <= now - lease_seconds
            if not expired and not owner_gone(run.owner):
                continue
            why = "its owner died" if not expired else f"its owner's lease expired ({lease_seconds:g}s)"
        elif run.status == RunStatus.PENDING:
            if now - run.created_at < pending_grace:
                continue  # just created: whoever created it is handing it over
            why = f"nobody started it within {pending_grace:g}s"
        else:
            why = "it has no owner"
        if run.cancel_requested:
            decisions.append(Adoption(run.id, "cancel", f"cancel asked and {why}"))
        elif adopted.get(run.id, 0) >= max_adoptions:
            decisions.append(
                Adoption(
                    run.id,
                    "fail",
                    f"the run was resumed {adopted[run.id]} time(s) by the supervisor and {why} again; "
                    "see `factory logs` for the last attempt, then `factory resume` it",
                )
            )
        else:
            action: Literal["start", "resume"] = "start" if run.status == RunStatus.PENDING else "resume"
            decisions.append(Adoption(run.id, action, why))
    return decisions


WAITING_PAGE = 500
MAX_WAITING_SCANNED = 20_000  # parked runs looked at per sweep (oldest ones too: pages, not just the newest)


def _waiting_runs(store: Any) -> Iterable[RunRecord]:
    """Every parked run, page by page (newest first), up to MAX_WAITING_SCANNED."""
    before: tuple[float, str] | None = None
    seen = 0
    while seen < MAX_WAITING_SCANNED:
        page = store.list_runs(WAITING_PAGE, RunStatus.WAITING, before)
        yield from page
        seen += len(page)
        if len(page) < WAITING_PAGE:
            return
        before = (page[-1].created_at, page[-1].id)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class SupervisorActor:
    """Sweeps the store for orphaned runs in a thread of its own; Ray restarts it if it dies."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings.model_validate(settings)
        self.adopted: dict[str, int] = {}
        self.log: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.supervisor_interval_seconds):
            try:
                self.sweep()
            except Exception:
                log.warning("supervisor sweep failed; trying again", exc_info=True)

    def sweep(self) -> list[dict[str, Any]]:
        """One look at the store; returns what was done (also kept for :meth:`history`)."""
        from factory.api import cancel, store_for
        from factory.owner import owner_is_gone
        from factory.runner import get_runner

        store = store_for(self.settings)
        try:
            runs = store.list_runs(1000, RunStatus.RUNNING) + store.list_runs(1000, RunStatus.PENDING)
            decisions = decide(
                runs,
                now=time.time(),
                lease_seconds=self.settings.lease_seconds,
                pending_grace=self.settings.supervisor_pending_grace_seconds,
                adopted=self.adopted,
                max_adoptions=self.settings.supervisor_max_adoptions,
                owner_gone=owner_is_gone,
            )
            done = []
            for decision in decisions:
                if decision.action == "cancel":
                    cancel(decision.run_id, store=store, settings=self.settings)
                elif decision.action == "fail":
                    self._fail(store, decision.run_id, decision.reason)
                else:
                    try:
                        runner = get_runner(self.settings)
                        ray.get(runner.start.remote(decision.run_id, decision.action == "resume", True), timeout=30)
                    except (RayError, TimeoutError) as exc:
                        # the runner died with its node and Ray has not declared it dead yet (about
                        # 12 s): not an adoption of the run, which the next sweep hands over again
                        log.warning("run %s: no runner takes it yet (%s); next sweep", decision.run_id, exc)
                        continue
                    self.adopted[decision.run_id] = self.adopted.get(decision.run_id, 0) + 1
                    store.append_event(
                        decision.run_id,
                        None,
                        "run.adopted",
                        {"reason": decision.reason, "adoption": self.adopted[decision.run_id]},
                    )
                done.append(
                    {"run_id": decision.run_id, "action": decision.action, "reason": decision.reason, "at": time.time()}
                )
            done += self._wake_waiting(store)
            self.log = (self.log + done)[-1000:]
            return done
        finally:
            store.close()

    def _wake_waiting(self, store: Any) -> list[dict[str, Any]]:
        """Parked runs (approval gates) that a decision or a gate's timeout lets go on: resumed."""
        from factory.approvals import is_due
        from factory.runner import get_runner

        woken = []
        now = time.time()
        for run in _waiting_runs(store):
            if not is_due(store, run, now):
                continue
            try:
                ray.get(get_runner(self.settings).start.remote(run.id, True, True), timeout=30)
            except (RayError, TimeoutError) as exc:
                log.warning("run %s: no runner takes it yet (%s); next sweep", run.id, exc)
                continue
            reason = "an approval gate was decided or timed out"
            woken.append({"run_id": run.id, "action": "resume", "reason": reason, "at": now})
        return woken

    @staticmethod
    def _fail(store: Any, run_id: str, reason: str) -> None:
        from factory.store import FINAL_STEP_STATUSES, Change, RunChange, StepChange, StepStatus

        changes: list[Change] = [
            StepChange(run_id, s.step_id, StepStatus.CANCELLED, "step.cancelled", data={"reason": reason})
            for s in store.get_steps(run_id)
            if s.status not in FINAL_STEP_STATUSES
        ]
        changes.append(RunChange(run_id, RunStatus.FAILED, "run.failed", error=reason))
        store.record(changes)

    def history(self) -> list[dict[str, Any]]:
        return list(self.log)

    def stop(self) -> None:
        self._stop.set()


def supervisor_name(settings: Settings) -> str:
    from factory.runner import runner_name

    return runner_name(settings).replace("factory-runner", SUPERVISOR_NAME)


def get_supervisor(settings: Settings) -> Any:
    """The supervisor of these settings' store, created on first use (one per configuration)."""
    from factory.runner import NAMESPACE

    return SupervisorActor.options(  # type: ignore[attr-defined]
        name=supervisor_name(settings), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(settings.model_dump(mode="json", exclude={"api_key"}))
