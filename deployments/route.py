"""``POST /v1/route``: the routing hot path, as its own Serve application.

Its replicas build the router once and keep it warm, and keep a view of the agent
pools' load that a background thread refreshes every second from the agent
manager: a request makes no remote call (API keys are checked against an
in-replica cache). Autoscaling settings are in deployments/serve.yaml.
"""

import logging
import threading
from typing import Any

from fastapi import FastAPI, Request, Response
from ray import serve

from deployments.http import Authorizer, install_error_handlers
from factory import __version__
from factory.agents_view import live_pools
from factory.api import store_for
from factory.auth import Scope
from factory.catalog import Catalog, load_catalog
from factory.pools.placement import ClusterView
from factory.routing import AgentHealth, RouteDecision, Router, RouteRequest, make_scorer
from factory.settings import Settings

log = logging.getLogger(__name__)
REFRESH_SECONDS = 1.0

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
        self.auth = Authorizer(store_for(self.settings), self.settings, open_mode)
        catalog = load_catalog(self.settings.agents_file) if self.settings.agents_file else Catalog()
        self.catalog = catalog
        self.cluster = ClusterView()
        self.router = Router(catalog, scorer=make_scorer(self.settings.router_scorer, catalog, self.settings))
        if catalog.agents:  # warm the scorer (tokeniser, model) before the first request
            self.router.route(RouteRequest(text="warm up the router"))
        self.health: dict[str, AgentHealth] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._refresh_loop, name="pool-load", daemon=True).start()

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

    def __del__(self) -> None:
        self._stop.set()
