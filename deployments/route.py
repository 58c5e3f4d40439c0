"""``POST /v1/route``: the routing hot path, as its own Serve application.

Its replicas build the router once and keep it warm, and keep a view of the agent
pools' load that a background thread refreshes every second from the agent
manager: a request makes no remote call (API keys are checked against an
in-replica cache). Autoscaling settings are in deployments/serve.yaml.
"""

import logging
import threading
import time
from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments.http import ApiProblem, Authorizer, install_error_handlers
from factory import __version__
from factory.agents_view import live_pools
from factory.api import store_for
from factory.auth import Scope
from factory.catalog import Catalog, load_catalog
from factory.pools.placement import ClusterView
from factory.routing import AgentHealth, RouteDecision, Router, RouteRequest, fallback_for, make_scorer
from factory.routing.corrections import MAX_CORRECTION_CHARS, CorrectionSync
from factory.settings import Settings
from factory.store import RouteCorrection

log = logging.getLogger(__name__)
REFRESH_SECONDS = 1.0
# How often a replica reads the corrections other replicas stored: a correction reaches every
# replica within this (plus a store read).
CORRECTIONS_SYNC_SECONDS = 0.5


class RouteFeedback(BaseModel):
    """A correction: the request's text should have gone to ``agent``."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_CORRECTION_CHARS, description="The routed request's text.")
    agent: str = Field(min_length=1, max_length=200, description="The agent that should have taken it.")
    decision_id: str | None = Field(default=None, max_length=64, description="The decision being corrected.")


class CorrectionView(BaseModel):
    id: int
    text: str
    agent: str
    decision_id: str | None
    who: str
    created_at: float


route_app = FastAPI(
    title="The Factory routing API",
    version=__version__,
    description="Which agent should take a task, and why. 'Authorization: Bearer <key>' with the read scope.",
)


class _ExactPrefix:
    """Serve mounts this app at /v1/route: let POST /v1/route reach the "/" endpoint
    instead of being redirected to /v1/route/."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        root = scope.get("root_path", "")
        if scope["type"] == "http" and root and scope["path"] == root:
            scope = {**scope, "path": root + "/", "raw_path": (root + "/").encode()}
        await self.app(scope, receive, send)


route_app.add_middleware(_ExactPrefix)
LIMITS = {"max_body": Settings.model_fields["api_max_body_bytes"].default}
install_error_handlers(route_app, lambda: int(LIMITS["max_body"]))


def health_from_pools(
    pools: dict[str, Any], catalog: Catalog | None = None, cluster: ClusterView | None = None
) -> dict[str, AgentHealth]:
    """The router's view of each agent: the manager's pools, and whether the cluster can place a replica."""
    health = {
        name: AgentHealth(
            healthy=info.health != "down",
            breaker_open=info.breaker == "open",
            in_flight=info.in_flight,
            capacity=max(1, info.replicas * info.max_concurrency),
        )
        for name, info in pools.items()
    }
    if catalog is not None and cluster is not None:
        for agent in catalog.agents:
            reason = cluster.unplaceable_agent(agent)
            if reason:
                health[agent.name] = AgentHealth(unplaceable=reason)
    return health


@serve.deployment(
    name="Router",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
)
@serve.ingress(route_app)
class RouteAPI:
    def __init__(self, settings: dict[str, Any], open_mode: bool = False) -> None:
        self.settings = Settings.model_validate(settings)
        LIMITS["max_body"] = self.settings.api_max_body_bytes
        self.store = store_for(self.settings)
        self.auth = Authorizer(self.store, self.settings, open_mode)
        catalog = load_catalog(self.settings.agents_file) if self.settings.agents_file else Catalog()
        self.catalog = catalog
        self.cluster = ClusterView()
        self.router = Router(
            catalog,
            scorer=make_scorer(self.settings.router_scorer, catalog, self.settings),
            fallback=fallback_for(catalog, self.settings),
        )
        self._corrections = CorrectionSync()
        self._corrections_lock = threading.Lock()
        self._sync_corrections()  # every correction stored so far: they survive restarts
        if catalog.agents:  # warm the scorer (tokeniser, model) before the first request
            self.router.route(RouteRequest(text="warm up the router"))
        self.health: dict[str, AgentHealth] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._refresh_loop, name="pool-load", daemon=True).start()
        threading.Thread(target=self._corrections_loop, name="corrections", daemon=True).start()

    def _sync_corrections(self) -> None:
        """Learn the corrections stored since the last look (by this replica or another)."""
        with self._corrections_lock:
            self._corrections.pull(self.router, self.store)

    def _corrections_loop(self) -> None:
        while not self._stop.wait(CORRECTIONS_SYNC_SECONDS):
            try:
                self._sync_corrections()
            except Exception as exc:  # noqa: BLE001 - the store may be restarting: next turn
                log.debug("cannot read routing corrections: %s", exc)

    def _refresh_loop(self) -> None:
        pools: dict[str, Any] = {}
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                pools = live_pools()
            except Exception as exc:  # noqa: BLE001 - a stale view is better than none
                log.debug("cannot refresh pool load: %s", exc)
            try:
                self.health = health_from_pools(pools, self.catalog, self.cluster)
            except Exception as exc:  # noqa: BLE001 - the placement view is refreshed on the next turn
                log.debug("cannot read the cluster's nodes: %s", exc)

    @route_app.post("/", response_model=RouteDecision, summary="Choose the agent for a task")
    async def route(self, request: Request, body: RouteRequest) -> Response:
        """Hard filters (capabilities, health, open breakers), then the fit of the text to each
        agent's description and examples, then load. The decision explains itself."""
        # async and without a thread hop: the decision is a millisecond of CPU, and the key
        # check is a dictionary lookup except once per key and cache period
        self.auth.authorize(request, Scope.READ)
        decision = self.router.route(body, self.health)
        return Response(decision.model_dump_json(), media_type="application/json")

    @route_app.post(
        "/feedback", status_code=201, response_model=CorrectionView, summary="Correct a decision (submit scope)"
    )
    def feedback(self, request: Request, body: RouteFeedback) -> CorrectionView:
        """The text becomes a labelled example of ``agent`` for every router replica (within
        about a second) and stays one across restarts. Who sent it is the key, recorded."""
        key = self.auth.authorize(request, Scope.SUBMIT)
        if body.agent not in {a.name for a in self.catalog.agents}:
            raise ApiProblem(422, f"no agent {body.agent!r} in the catalogue; GET /v1/agents lists them")
        stored = self.store.add_route_correction(
            RouteCorrection(
                text=body.text,
                agent=body.agent,
                decision_id=body.decision_id,
                who=f"key:{key.id}",
                created_at=time.time(),
            )
        )
        self._sync_corrections()  # this replica at once
        return CorrectionView(**stored.model_dump())

    @route_app.get("/corrections", response_model=list[CorrectionView], summary="Stored corrections, newest last")
    def corrections(self, request: Request, after: int = 0, limit: int = 200) -> list[CorrectionView]:
        self.auth.authorize(request, Scope.READ)
        if not (0 <= after <= 2**53 and 1 <= limit <= 1000):
            raise ApiProblem(422, "after must be 0 to 2**53 and limit 1 to 1000")
        return [CorrectionView(**c.model_dump()) for c in self.store.route_corrections(after, limit)]

    def __del__(self) -> None:
        self._stop.set()
