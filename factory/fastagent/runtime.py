"""fast-agent's event loop and Core, private to this process (shared by the llm scorer and fast-agent agents).

fast-agent keeps state bound to the loop that started it (its logger, event bus and MCP
connections), and turns configuration errors into ``SystemExit``. So everything fast-agent
does in a process runs on one private loop in a daemon thread, started on first use, and
every coroutine sent to it has its ``SystemExit`` turned into an ordinary exception: a
Ray actor or a Serve replica that calls fast-agent never stops because of it.

One Core (fast-agent's "app": settings, server registry, context) is opened per distinct
settings key and kept for the life of the process: the llm scorer uses one without MCP
servers, a fast-agent agent's replica one with the servers its catalogue entry names.
fast-agent is optional (the ``fast-agent`` extra) and imported only here, lazily.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class FastAgentExit(Exception):
    """fast-agent raised ``SystemExit`` (how it reports some configuration errors)."""

    def __init__(self, code: object) -> None:
        self.code = code
        super().__init__(f"fast-agent stopped with a configuration error (exit code {code})")


class FastAgentRuntime:
    """The private loop and the Cores of this process; ``get()`` returns the process's one."""

    _lock = threading.Lock()
    _current: FastAgentRuntime | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="factory-fast-agent", daemon=True)
        self.thread.start()
        self._cores: dict[str, Any] = {}
        self._core_lock = asyncio.Lock()

    @classmethod
    def get(cls) -> FastAgentRuntime:
        with cls._lock:
            if cls._current is None or cls._current.pid != os.getpid():  # a forked child has no loop thread
                cls._current = cls()
            return cls._current

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the private loop (``SystemExit`` inside becomes :class:`FastAgentExit`)."""
        return asyncio.run_coroutine_threadsafe(no_exit(coro), self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float, on_timeout: Callable[[], Exception]) -> T:
        """Run ``coro`` on the private loop and wait for it from a plain thread, at most ``timeout`` seconds."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise on_timeout() from None

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` run on the private loop, from another event loop (cancelling this cancels it)."""
        return await asyncio.wrap_future(self.submit(coro))

    async def context(self, key: str = "", settings: Callable[[], Any] | None = None) -> Any:
        """fast-agent's context for ``key``, opened once: settings from code only (no fast-agent.yaml),
        nothing recorded to disk, no console output. ``settings()`` builds the Settings the first time."""
        async with self._core_lock:
            core = self._cores.get(key)
            if core is None:
                from fast_agent import Core
                from fast_agent.config import apply_isolation

                config = settings() if settings is not None else quiet_settings()
                apply_isolation(config)
                core = Core(name=f"factory-{key or 'default'}", settings=config)
                await core.initialize()
                self._cores[key] = core
            return core.context


def quiet_settings(**fields: Any) -> Any:
    """fast-agent Settings for running inside the Factory: no logs to the console, no session files."""
    from fast_agent.config import LoggerSettings, Settings

    logger = LoggerSettings(type="none", progress_display=False, show_chat=False, show_tools=False)
    return Settings(logger=logger, session_history=False, **fields)


async def no_exit[R](coro: Coroutine[Any, Any, R]) -> R:
    """``coro``, with fast-agent's ``SystemExit`` turned into :class:`FastAgentExit` (a SystemExit
    would stop the private loop's thread, or the Ray actor that called it)."""
    try:
        return await coro
    except SystemExit as exc:
        raise FastAgentExit(exc.code) from None
