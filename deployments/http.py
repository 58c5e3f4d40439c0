"""What both HTTP applications share: problem+json errors, body limits, API-key auth
with an in-replica cache, and a per-key rate limit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from factory.auth import Scope, check_key, require_scope
from factory.errors import (
    AuthenticationError,
    CircuitOpenError,
    FactoryError,
    NoEligibleAgentError,
    NotFoundError,
    PermissionDeniedError,
    PoolSaturated,
    RunStateError,
    ScheduleConflictError,
    WorkflowValidationError,
)
from factory.settings import Settings
from factory.store import ApiKeyRecord, Store

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Invalid input",
    429: "Too many requests",
    500: "Internal error",
    503: "Unavailable",
}


class ApiProblem(Exception):
    """An HTTP error with a problem+json body."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    status: int, detail: str, instance: str = "", headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    title = _TITLES.get(status, "Error")
    body = {
        "type": f"/problems/{title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def factory_error_status(exc: FactoryError) -> tuple[int, dict[str, str], dict[str, Any]]:
    """HTTP status, headers and extra body fields for a library error."""
    if isinstance(exc, AuthenticationError):
        return 401, {"WWW-Authenticate": 'Bearer realm="factory"'}, {}
    if isinstance(exc, PermissionDeniedError):
        return 403, {}, ({"errors": exc.problems} if exc.problems else {})
    if isinstance(exc, NotFoundError):
        return 404, {}, {}
    if isinstance(exc, WorkflowValidationError):
        return 422, {}, {"errors": exc.problems}
    if isinstance(exc, NoEligibleAgentError):
        return 422, {}, {"filtered_out": exc.filtered_out}
    if isinstance(exc, RunStateError | ScheduleConflictError):
        return 409, {}, {}
    if isinstance(exc, CircuitOpenError):
        return 503, {"Retry-After": str(max(1, round(exc.retry_after)))}, {}
    if isinstance(exc, PoolSaturated):
        return 503, {"Retry-After": "1"}, {}
    return 400, {}, {}


def install_error_handlers(app: FastAPI, max_body: Callable[[], int]) -> None:
    """Every error becomes problem+json; bodies over ``max_body()`` bytes are refused."""

    @app.exception_handler(ApiProblem)
    async def _api_problem(request: Request, exc: ApiProblem) -> Response:
        return problem_response(exc.status, exc.detail, request.url.path, exc.headers, **exc.extra)

    @app.exception_handler(FactoryError)
    async def _factory_error(request: Request, exc: FactoryError) -> Response:
        status, headers, extra = factory_error_status(exc)
        return problem_response(status, str(exc), request.url.path, headers, **extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"field": ".".join(str(p) for p in err.get("loc", ())), "message": err.get("msg", "")}
            for err in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "the request is not valid"
        return problem_response(422, detail, request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no endpoint at {request.url.path}; the API is described at /openapi.json"
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; see /openapi.json"
        return problem_response(exc.status_code, detail, request.url.path, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return problem_response(500, "an unexpected error occurred; it has been logged", request.url.path)

    app.add_middleware(BodyLimit, max_body=max_body)


class BodyLimit:
    """Pure ASGI middleware: refuse bodies over ``max_body()`` bytes with 413, whether
    announced by Content-Length or sent chunked (counted as they stream in)."""

    def __init__(self, app: Any, max_body: Callable[[], int]) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body()
        path = scope.get("path", "")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await problem_response(400, "Content-Length is not a number", path)(scope, receive, send)
                    return
                if length > limit:
                    response = problem_response(413, f"the body is {length} bytes; the limit is {limit} bytes", path)
                    await response(scope, receive, send)
                    return
        received = 0

        async def counted_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiProblem(413, f"the body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counted_receive, send)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per API key: ``rate`` requests per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def check(self, key_id: str) -> float:
        """0 if the request may go now, else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                bucket = self._buckets[key_id] = _Bucket(float(self.burst), now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return 0.0
            return (1 - bucket.tokens) / self.rate


OPEN_MODE_KEY = ApiKeyRecord(id="open", name="open local mode", key_hash="", scopes=["admin"], created_at=0)


LAST_USED_EVERY_SECONDS = 60.0  # a key's last-used time is written at most this often per replica


class Authorizer:
    """Checks bearer keys against the store and applies the rate limit. Each request reads
    its key (revocation and expiry act on the next request) unless ``api_key_cache_seconds``
    lets a replica trust a verified key for a while. In open mode (127.0.0.1 only) every
    request is admin."""

    def __init__(self, store: Store, settings: Settings, open_mode: bool) -> None:
        self.store = store
        self.open_mode = open_mode
        self.ttl = settings.api_key_cache_seconds
        self.limiter = RateLimiter(settings.api_rate_limit, settings.api_rate_burst)
        self._cache: dict[str, tuple[float, ApiKeyRecord | None]] = {}
        self._touched: dict[str, float] = {}

    def _lookup(self, digest: str) -> ApiKeyRecord | None:
        now = time.monotonic()
        if self.ttl > 0:
            cached = self._cache.get(digest)
            if cached is not None and now - cached[0] < self.ttl:
                return cached[1]
        record = self.store.find_api_key(digest)
        if self.ttl > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, record)
        return record

    def _touch(self, record: ApiKeyRecord) -> None:
        now = time.time()
        if now - self._touched.get(record.id, 0.0) < LAST_USED_EVERY_SECONDS:
            return
        self._touched[record.id] = now
        try:
            self.store.touch_api_key(record.id, now)
        except Exception:
            log.warning("could not record the last use of key %s", record.id, exc_info=True)

    def authorize(self, request: Request, scope: Scope) -> ApiKeyRecord:
        if self.open_mode:
            return OPEN_MODE_KEY
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        record = check_key(key.strip() if scheme.lower() == "bearer" else None, self._lookup)
        require_scope(record, scope)
        self._touch(record)
        wait = self.limiter.check(record.id)
        if wait > 0:
            raise ApiProblem(
                429,
                f"API key {record.id} sent more than {self.limiter.rate:g} requests per second; retry in {wait:.2f}s",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
        return record
