"""fast-agent inside the Factory: the bridge that runs fast-agent agents in pool replicas.

See :mod:`factory.fastagent.agent` (the ``FastAgent`` adapter a catalogue entry names) and
:mod:`factory.fastagent.runtime` (fast-agent's private event loop in a process).
"""

from factory.fastagent.agent import FastAgent, FastAgentConfig, FastAgentTask

__all__ = ["FastAgent", "FastAgentConfig", "FastAgentTask"]
