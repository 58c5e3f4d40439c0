"""A Python client of the Factory's HTTP API, used the way a service would use it.

    from factory.client import FactoryClient
    with FactoryClient("http://127.0.0.1:8000", api_key="fk_...") as client:
        run_id = client.submit("examples/sales_stats/workflow.yaml", {"z": 3})
        run = client.wait(run_id)

Errors come back as :class:`ApiError` (a FactoryError) carrying the problem+json body;
each error says with ``retryable`` whether the same request may succeed later.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from factory.dag import read_workflow_file
from factory.errors import FactoryError
from factory.limits import DocumentLimits

FINAL = {"succeeded", "failed", "cancelled"}
# a run parked at approval gates: nothing happens until someone decides, so a waiter stops here too
PARKED = "waiting"
KEEP_ALIVE = -1  # the id _server_sent_events gives a comment line
FINAL_EVENTS = {"run.succeeded", "run.failed", "run.cancelled"}
MAX_RECONNECT_DELAY = 5.0


def _seg(value: str) -> str:
    """``value`` as one path segment: a run id, name or key id with '/', '?', '#' or '..' in it
    cannot reach another endpoint."""
    return quote(str(value), safe="") if value not in (".", "..") else quote(value).replace(".", "%2E")


class ApiError(FactoryError):
    """The API answered with an error; ``problem`` is its problem+json body."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        detail = problem.get("detail") or problem.get("title") or "error"
        errors = problem.get("errors")
        if isinstance(errors, list) and errors and all(isinstance(e, str) for e in errors):
            detail += ":\n" + "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"HTTP {status}: {detail}")

    @property
    def retryable(self) -> bool:
        """Rate limited, or a server or proxy that is restarting: the same request may succeed later."""
        return self.status in (429, 502, 503, 504)


class ApiUnreachableError(FactoryError):
    """The API could not be reached, did not answer in time, or dropped the connection."""

    retryable = True


class WaitTimeoutError(FactoryError, TimeoutError):
    """:meth:`FactoryClient.wait` reached its deadline before the run ended (the run goes on)."""

    retryable = True


class FactoryClient:
    """``timeout``: seconds for connecting and for each answer. ``idle_timeout``: an event
    stream silent for this long is taken for dead and reopened (the server sends a
    keep-alive every 15 s). ``transport``: an httpx transport to use instead of the network."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        *,
        idle_timeout: float = 45.0,
        reconnect_delay: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.reconnect_delay = reconnect_delay
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> FactoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text[:500]}
            raise ApiError(response.status_code, problem if isinstance(problem, dict) else {"detail": str(problem)})
        if response.status_code == 204:  # No Content (a DELETE)
            return None
        return response.json()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiUnreachableError(f"cannot reach the Factory API at {self.http.base_url}: {exc}") from None
        return self._check(response)

    # -- runs --------------------------------------------------------------------------------------

    def submit(self, workflow: str | Path | dict[str, Any], inputs: dict[str, Any] | None = None) -> str:
        """Submit a workflow (a YAML file, or its mapping); returns the run id."""
        if not isinstance(workflow, dict):
            # plain JSON data within the default bounds, or WorkflowValidationError (factory.limits)
            workflow = read_workflow_file(workflow, limits=DocumentLimits())
        body = {"workflow": workflow, "inputs": inputs or {}}
        return str(self._request("POST", "/v1/workflows", json=body)["run_id"])

    def submit_and_wait(
        self,
        workflow: str | Path | dict[str, Any],
        inputs: dict[str, Any] | None = None,
        wait: float = 60.0,
        *,
        cancel_on_disconnect: bool = False,
    ) -> dict[str, Any]:
        """Submit a workflow and wait for its end in the same request, up to ``wait`` seconds (the
        API allows 300). The answer has ``run_id`` and ``status``; if the run ended in time, its
        ``outputs`` (by step) and ``error``; else it goes on (follow it with :meth:`wait`). With
        ``cancel_on_disconnect``, the run is cancelled if this request is cut before it ends."""
        if not isinstance(workflow, dict):
            workflow = read_workflow_file(workflow, limits=DocumentLimits())
        body = {"workflow": workflow, "inputs": inputs or {}}
        params = {"wait": wait, "cancel_on_disconnect": cancel_on_disconnect}
        return dict(self._request("POST", "/v1/workflows", json=body, params=params, timeout=wait + self.timeout))

    def get_run(self, run_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/runs/{_seg(run_id)}"))

    def list_runs(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return dict(self._request("GET", "/v1/runs", params=params))

    def run_summaries(
        self,
        status: str | None = None,
        workflow: str | None = None,
        text: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """Runs as a list shows them (steps done / total), newest first: ``runs`` and ``next_cursor``."""
        params: dict[str, Any] = {"limit": limit}
        for name, value in (("status", status), ("workflow", workflow), ("q", text), ("cursor", cursor)):
            if value:
                params[name] = value
        return dict(self._request("GET", "/v1/run-summaries", params=params))

    def whoami(self) -> dict[str, Any]:
        """This key: ``id``, ``name``, ``scopes``, ``can_submit``, ``can_admin``."""
        return dict(self._request("GET", "/v1/whoami"))

    def run_graph(self, run_id: str) -> dict[str, Any]:
        """The run's DAG: ``nodes`` (status, attempts, for_each items), ``edges``, ``order``."""
        return dict(self._request("GET", f"/v1/runs/{_seg(run_id)}/graph"))

    def system(self, window: float = 900, buckets: int = 60) -> dict[str, Any]:
        """Steps/s, latency p50/p99, failures and retries over time; runs by status; queues; Ray nodes."""
        return dict(self._request("GET", "/v1/system", params={"window": window, "buckets": buckets}))

    def attempts(self, run_id: str, step: str | None = None) -> list[dict[str, Any]]:
        """The run's finished attempts (of ``step`` only, if given): logs and errors."""
        params: dict[str, Any] = {"limit": 1000}
        if step is not None:
            params["step"] = step
        return list(self._request("GET", f"/v1/runs/{_seg(run_id)}/attempts", params=params))

    def validate(self, workflow: str | Path | dict[str, Any], inputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a submission of this workflow would meet, without running it: ``valid``,
        ``problems`` (each naming its step and field), ``refused`` (this key may not run it)."""
        body = {"workflow": self._workflow_data(workflow), "inputs": inputs or {}}
        return dict(self._request("POST", "/v1/validate", json=body))

    def cancel(self, run_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/runs/{_seg(run_id)}/cancel"))

    def resume(self, run_id: str, budget: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume a run; ``budget`` (e.g. ``{"max_attempts": 50}``) replaces limits it had."""
        body = {"budget": budget} if budget else None
        return dict(self._request("POST", f"/v1/runs/{_seg(run_id)}/resume", json=body))

    def approve(self, run_id: str, step_id: str, approved: bool = True, comment: str = "") -> dict[str, Any]:
        """Decide at an approval gate that waits; returns the decision, the run's status and
        ``after_event_id`` (follow the run from there)."""
        body = {"approved": approved, "comment": comment}
        return dict(self._request("POST", f"/v1/runs/{_seg(run_id)}/steps/{_seg(step_id)}/approval", json=body))

    def events(
        self, run_id: str | None, after: int = 0, follow: bool = True, *, stop: threading.Event | None = None
    ) -> Iterator[dict[str, Any]]:
        """The run's events (Server-Sent Events) after event ``after``; every run's with
        ``run_id=None``. With ``follow``, until the run ends (for every run: until the caller
        stops, or ``stop`` is set): a stream that drops, or stays silent past ``idle_timeout``,
        is reopened with ``Last-Event-ID``, and no event is yielded twice."""
        return self._events(run_id, after, follow, stop or threading.Event())

    def _events(self, run_id: str | None, after: int, follow: bool, stop: threading.Event) -> Iterator[dict[str, Any]]:
        last = after
        delay = self.reconnect_delay
        path = f"/v1/runs/{_seg(run_id)}/events" if run_id is not None else "/v1/events"
        while not stop.is_set():
            headers = {"Last-Event-ID": str(last)} if last > after else {}
            got, final = 0, False
            try:
                with self.http.stream(
                    "GET",
                    path,
                    params={"after": last, "follow": follow},
                    headers=headers,
                    timeout=httpx.Timeout(self.timeout, read=self.idle_timeout),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._check(response)
                    for event_id, event in _server_sent_events(response.iter_lines()):
                        if stop.is_set():
                            return
                        if event_id <= last:
                            continue  # already yielded (a server that ignored Last-Event-ID)
                        last, delay = event_id, self.reconnect_delay
                        got, final = got + 1, event.get("type") in FINAL_EVENTS
                        yield event
                        if stop.is_set():
                            return
                # the server ended the stream: a page of a stream that does not follow (ask for
                # the next until one is empty); a followed run's stream at the run's end; or a
                # followed stream's lifetime, however quiet (reconnect from the last id)
                if not follow:
                    if got == 0:
                        return
                    continue
                if run_id is not None and (final or (got == 0 and self._run_has_ended(run_id))):
                    return
                continue
            except httpx.TransportError:
                if not follow:
                    raise
            except ApiError as exc:
                if not (follow and exc.retryable):
                    raise
            if stop.wait(delay):
                return
            delay = min(delay * 2, MAX_RECONNECT_DELAY)

    def _run_has_ended(self, run_id: str) -> bool:
        try:
            return str(self.get_run(run_id).get("status")) in FINAL
        except ApiUnreachableError:
            return False

    def wait(
        self,
        run_id: str,
        timeout: float | None = None,
        *,
        after: int = 0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follow the run's events (after event ``after``) until it ends, or until it is parked
        at approval gates (status ``waiting``); returns the run with its steps. ``on_event``
        hears each event as it comes.

        With ``timeout`` (seconds), raise :class:`WaitTimeoutError` (a ``TimeoutError``) at the
        deadline, whatever the server does meanwhile: the events are followed by a helper thread,
        so neither an idle stream nor a server that stops answering keeps the caller waiting
        longer. The helper stops at its next event or timeout (``idle_timeout`` at most)."""
        if timeout is None:
            return self._follow_to_end(run_id, threading.Event(), after, on_event)
        outcome: queue.Queue[tuple[dict[str, Any] | None, BaseException | None]] = queue.Queue(maxsize=1)
        stop = threading.Event()

        def follow() -> None:
            try:
                outcome.put((self._follow_to_end(run_id, stop, after, on_event), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                outcome.put((None, exc))

        threading.Thread(target=follow, name=f"factory-wait-{run_id}", daemon=True).start()
        try:
            run, error = outcome.get(timeout=timeout)
        except queue.Empty:
            stop.set()
            raise WaitTimeoutError(
                f"run {run_id} did not finish within {timeout:g}s; it goes on: wait again, or `factory cancel {run_id}`"
            ) from None
        if error is not None:
            raise error
        assert run is not None
        return run

    def _follow_to_end(
        self,
        run_id: str,
        stop: threading.Event,
        after: int = 0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        last = after
        while True:
            for event in self._events(run_id, last, True, stop):
                last = max(last, int(event["id"]))
                if on_event is not None:
                    on_event(event)
                if event["type"] in FINAL_EVENTS or event["type"] == "run.waiting":
                    run = self._get_run_retrying(run_id, stop)
                    if run["status"] in FINAL or run["status"] == PARKED:  # else it was resumed since: follow on
                        return run
            if stop.is_set():
                raise WaitTimeoutError(f"stopped waiting for run {run_id}")
            run = self._get_run_retrying(run_id, stop)
            if run["status"] in FINAL or run["status"] == PARKED:
                return run
            stop.wait(self.reconnect_delay)  # the stream ended before the run (a proxy closed it): follow on

    def _get_run_retrying(self, run_id: str, stop: threading.Event) -> dict[str, Any]:
        delay = self.reconnect_delay
        while True:
            try:
                return self.get_run(run_id)
            except (ApiError, ApiUnreachableError) as exc:
                if not exc.retryable or stop.wait(delay):
                    raise
                delay = min(delay * 2, MAX_RECONNECT_DELAY)

    # -- registered workflows and keys ----------------------------------------------------------------

    def register_workflow(
        self,
        workflow: str | Path | dict[str, Any],
        name: str | None = None,
        secrets: list[str] | None = None,
        base_dir: str | None = None,
    ) -> dict[str, Any]:
        """Register a workflow (admin key): its steps' modules must be importable on the cluster
        (or under ``base_dir`` there). Returns the registered version."""
        data = self._workflow_data(workflow)
        name = name or str(data.get("name") or "")
        body = {"workflow": data, "secrets": secrets or [], "base_dir": base_dir}
        return dict(self._request("PUT", f"/v1/workflows/{_seg(name)}", json=body))

    def list_workflows(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/workflows"))

    def start(self, name: str, inputs: dict[str, Any] | None = None, version: int | None = None) -> str:
        """Start a run of a registered workflow; returns the run id."""
        body = {"inputs": inputs or {}, "version": version}
        return str(self._request("POST", f"/v1/workflows/{_seg(name)}/runs", json=body)["run_id"])

    def start_and_wait(
        self,
        name: str,
        inputs: dict[str, Any] | None = None,
        wait: float = 60.0,
        *,
        version: int | None = None,
        cancel_on_disconnect: bool = False,
    ) -> dict[str, Any]:
        """:meth:`start`, waiting for the run's end as :meth:`submit_and_wait` does."""
        body = {"inputs": inputs or {}, "version": version}
        params = {"wait": wait, "cancel_on_disconnect": cancel_on_disconnect}
        path = f"/v1/workflows/{_seg(name)}/runs"
        return dict(self._request("POST", path, json=body, params=params, timeout=wait + self.timeout))

    def add_schedule(
        self,
        workflow: str | Path | dict[str, Any],
        name: str | None = None,
        secrets: list[str] | None = None,
        base_dir: str | None = None,
    ) -> dict[str, Any]:
        """Register a workflow with a ``schedule:`` and schedule it (admin key); returns the schedule."""
        body = {"workflow": self._workflow_data(workflow), "name": name, "secrets": secrets or [], "base_dir": base_dir}
        return dict(self._request("POST", "/v1/schedules", json=body))

    def list_schedules(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/schedules"))

    def schedule_action(self, name: str, action: str) -> dict[str, Any] | None:
        """pause, resume (the schedule after) or remove (None)."""
        if action == "remove":
            self._request("DELETE", f"/v1/schedules/{_seg(name)}")
            return None
        return dict(self._request("POST", f"/v1/schedules/{_seg(name)}/{_seg(action)}"))

    def schedule_ticks(self, name: str, limit: int = 50) -> list[dict[str, Any]]:
        return list(self._request("GET", f"/v1/schedules/{_seg(name)}/ticks", params={"limit": limit}))

    def create_key(
        self,
        scopes: list[str],
        name: str = "",
        expires_in: float | None = None,
        secrets: list[str] | None = None,
    ) -> dict[str, Any]:
        """A new API key (admin key); the answer's ``key`` is shown once."""
        body = {"scopes": scopes, "name": name, "expires_in": expires_in, "secrets": secrets or []}
        return dict(self._request("POST", "/v1/keys", json=body))

    def list_keys(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/keys"))

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/keys/{_seg(key_id)}/revoke"))

    @staticmethod
    def _workflow_data(workflow: str | Path | dict[str, Any]) -> dict[str, Any]:
        if isinstance(workflow, dict):
            return workflow
        data = read_workflow_file(workflow, limits=DocumentLimits())  # or WorkflowValidationError
        if not isinstance(data, dict):
            raise FactoryError(f"{workflow} is not a workflow: a mapping with name, inputs and steps")
        return data

    # -- routing and agents --------------------------------------------------------------------------

    def route(
        self, text: str, capabilities: list[str] | None = None, resources: dict[str, float] | None = None
    ) -> dict[str, Any]:
        body = {"text": text, "capabilities": capabilities or [], "resources": resources or {}}
        return dict(self._request("POST", "/v1/route", json=body))

    def route_feedback(self, text: str, agent: str, decision_id: str | None = None) -> dict[str, Any]:
        """Correct a routing decision: ``text`` should have gone to ``agent`` (submit scope).
        Every router replica learns it within about a second; it is kept across restarts."""
        body = {"text": text, "agent": agent, "decision_id": decision_id}
        return dict(self._request("POST", "/v1/route/feedback", json=body))

    def route_corrections(self, after: int = 0, limit: int = 200) -> list[dict[str, Any]]:
        """Stored routing corrections with an id above ``after``, oldest first."""
        return list(self._request("GET", "/v1/route/corrections", params={"after": after, "limit": limit}))

    def agents(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/agents"))

    def health(self) -> dict[str, Any]:
        return dict(self._request("GET", "/healthz"))


def _server_sent_events(lines: Iterator[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(id, event) for each event of a text/event-stream; a comment (a keep-alive) gives
    (KEEP_ALIVE, {}), so that a reader can check whether to stop while a stream is quiet."""
    data: list[str] = []
    event_id: str | None = None
    for line in lines:
        if line.startswith(":"):
            yield KEEP_ALIVE, {}
        elif line == "":
            if data:
                event = json.loads("\n".join(data))
                yield int(event_id if event_id is not None else event["id"]), event
            data, event_id = [], None
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("id:"):
            event_id = line[3:].strip()
