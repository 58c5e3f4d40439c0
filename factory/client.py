"""A Python client of the Factory's HTTP API, used the way a service would use it.

    from factory.client import FactoryClient
    with FactoryClient("http://127.0.0.1:8000", api_key="fk_...") as client:
        run_id = client.submit("examples/sales_stats/workflow.yaml", {"z": 3})
        run = client.wait(run_id)

Errors come back as :class:`ApiError` (a FactoryError) carrying the problem+json body.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from factory.errors import FactoryError

FINAL = {"succeeded", "failed", "cancelled"}


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


class FactoryClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

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
        return response.json()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise FactoryError(f"cannot reach the Factory API at {self.http.base_url}: {exc}") from None
        return self._check(response)

    # -- runs --------------------------------------------------------------------------------------

    def submit(self, workflow: str | Path | dict[str, Any], inputs: dict[str, Any] | None = None) -> str:
        """Submit a workflow (a YAML file, or its mapping); returns the run id."""
        if not isinstance(workflow, dict):
            try:
                workflow = yaml.safe_load(Path(workflow).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise FactoryError(f"cannot read the workflow {workflow}: {exc}") from None
        body = {"workflow": workflow, "inputs": inputs or {}}
        return str(self._request("POST", "/v1/workflows", json=body)["run_id"])

    def get_run(self, run_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/runs/{run_id}"))

    def list_runs(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return dict(self._request("GET", "/v1/runs", params=params))

    def cancel(self, run_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/runs/{run_id}/cancel"))

    def resume(self, run_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/runs/{run_id}/resume"))

    def events(self, run_id: str, after: int = 0, follow: bool = True) -> Iterator[dict[str, Any]]:
        """The run's events (Server-Sent Events), reconnecting with Last-Event-ID if the stream drops."""
        last = after
        while True:
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/runs/{run_id}/events",
                    params={"after": last, "follow": follow},
                    timeout=httpx.Timeout(30.0, read=None),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._check(response)
                    data: list[str] = []
                    for line in response.iter_lines():
                        if line.startswith("data:"):
                            data.append(line[5:].strip())
                        elif line == "" and data:
                            event = json.loads("\n".join(data))
                            data = []
                            last = int(event["id"])
                            yield event
                return
            except httpx.TransportError:
                if not follow:
                    raise
                time.sleep(0.5)

    def wait(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Follow the run's events until it ends; returns the run with its steps."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self.events(run_id):
            if event["type"] in {"run.succeeded", "run.failed", "run.cancelled"}:
                run = self.get_run(run_id)
                if run["status"] in FINAL:  # else it was resumed since: keep following
                    return run
            if deadline is not None and time.monotonic() > deadline:
                raise FactoryError(f"run {run_id} did not finish within {timeout:g}s")
        return self.get_run(run_id)

    # -- routing and agents --------------------------------------------------------------------------

    def route(self, text: str, capabilities: list[str] | None = None) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/route", json={"text": text, "capabilities": capabilities or []}))

    def agents(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/agents"))

    def health(self) -> dict[str, Any]:
        return dict(self._request("GET", "/healthz"))
