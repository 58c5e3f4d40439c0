"""A long-lived Ray actor that hosts coordinators for runs submitted from elsewhere
(the HTTP API): ``start(run_id)`` runs the run in a thread of the actor.

It is detached and named, so any process of the cluster finds it; if it dies,
the runs it hosted keep their state and the next ``start`` (or ``factory resume``)
finishes them once their lease has lapsed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

import ray

from factory.errors import FactoryError
from factory.settings import Settings

RUNNER_NAME = "factory-runner"
NAMESPACE = "factory"

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_concurrency=64)  # type: ignore[call-overload]
class RunnerActor:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings.model_validate(settings)
        self._threads: dict[str, threading.Thread] = {}
        self._errors: dict[str, str] = {}

    def start(self, run_id: str, resume: bool = False, adopt: bool = False) -> bool:
        """Run a submitted run (or, with ``resume``, resume one) in the background; False if
        this actor already runs it. ``adopt``: the supervisor resumes a run whose owner died
        (a cancel asked meanwhile stays in force)."""
        current = self._threads.get(run_id)
        if current is not None and current.is_alive():
            return False
        self._threads = {k: t for k, t in self._threads.items() if t.is_alive()}
        thread = threading.Thread(target=self._execute, args=(run_id, resume, adopt), name=f"run-{run_id}", daemon=True)
        self._threads[run_id] = thread
        thread.start()
        return True

    def _execute(self, run_id: str, resume_run: bool, adopt: bool = False) -> None:
        from factory.api import fail_unstarted, resume

        try:
            resume(
                run_id,
                settings=self.settings,
                agents=self.settings.agents_file,
                pending_only=not resume_run,
                keep_cancel=adopt,
            )
        except FactoryError as exc:
            self._errors[run_id] = str(exc)
            log.warning("run %s: %s", run_id, exc)
            fail_unstarted(run_id, f"the run could not start: {exc}", settings=self.settings)
        except Exception as exc:  # keep the actor alive whatever a run does
            self._errors[run_id] = f"{type(exc).__name__}: {exc}"
            log.exception("run %s crashed its coordinator", run_id)
            fail_unstarted(run_id, f"the run could not start: {type(exc).__name__}: {exc}", settings=self.settings)

    def active(self) -> list[str]:
        return [run_id for run_id, thread in self._threads.items() if thread.is_alive()]

    def error(self, run_id: str) -> str | None:
        return self._errors.get(run_id)


def runner_name(settings: Settings) -> str:
    """One runner per distinct configuration: an API with other settings gets its own."""
    digest = hashlib.sha256(settings.model_dump_json(exclude={"api_key"}).encode()).hexdigest()[:10]
    return f"{RUNNER_NAME}-{digest}"


def get_runner(settings: Settings) -> Any:
    """The runner actor for these settings, created on first use."""
    return RunnerActor.options(  # type: ignore[attr-defined]
        name=runner_name(settings), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(settings.model_dump(mode="json", exclude={"api_key"}))
