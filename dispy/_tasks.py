"""Background tasks that someone owns.

asyncio keeps a task only weakly: one that nothing else references may be
collected before it ends, and an exception it raises is reported (if ever)
only when it is collected.  ``spawn`` keeps each task until it ends and logs
its failure at once, naming it.
"""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger("dispy")

_running: set[asyncio.Task] = set()


def spawn(coro, what: str, log: logging.Logger | None = None) -> asyncio.Task:
    """Run ``coro`` as a task of the running loop, kept until it ends; a failure is
    logged (on ``log``, else dispy's logger) with ``what`` it was doing."""
    task = asyncio.get_running_loop().create_task(coro, name=what)
    _running.add(task)
    task.add_done_callback(lambda t: _ended(t, log or logger))
    return task


def _ended(task: asyncio.Task, log: logging.Logger) -> None:
    _running.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("%s failed: %s: %s", task.get_name(), type(exc).__name__, exc, exc_info=exc)
