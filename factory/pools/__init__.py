"""Agent pools: replicas as Ray actors, caller-side dispatch, the agent manager, the engine's dispatcher.

- :mod:`factory.pools.replica`: a replica is a Ray actor wrapping one Agent.
- :mod:`factory.pools.client`: ``PoolClient`` (power of two choices on the caller's
  in-flight counts, a bounded queue, a circuit breaker, failover when a replica dies).
- :mod:`factory.pools.manager`: the named, detached ``AgentManager`` actor.
- :mod:`factory.pools.connection`: ``Pools``, a process's connection to the manager.
- :mod:`factory.pools.dispatcher`: ``PoolDispatcher``, the engine's AgentDispatcher.
"""

from factory.pools.client import PoolClient
from factory.pools.connection import Pools
from factory.pools.dispatcher import PoolDispatcher
from factory.pools.manager import DEFAULT_MANAGER_NAME, NAMESPACE, get_manager, stop_manager
from factory.pools.models import AgentInfo, ClientPoolStats, ManagerConfig, PoolSnapshot, ReplicaHealth

__all__ = [
    "DEFAULT_MANAGER_NAME",
    "NAMESPACE",
    "AgentInfo",
    "ClientPoolStats",
    "ManagerConfig",
    "PoolClient",
    "PoolDispatcher",
    "PoolSnapshot",
    "Pools",
    "ReplicaHealth",
    "get_manager",
    "stop_manager",
]
