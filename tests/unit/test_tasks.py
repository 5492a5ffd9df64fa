"""dispy._tasks.spawn: background tasks are kept until they end, failures logged at once."""

from __future__ import annotations

import asyncio
import gc
import logging

from dispy import _tasks


def test_a_spawned_task_is_kept_and_its_failure_logged(caplog):
    async def main():
        gate = asyncio.Event()

        async def fails():
            await gate.wait()
            raise KeyError("boom")

        task = _tasks.spawn(fails(), "doing something")
        task_id = id(task)
        del task
        gc.collect()  # nothing else refers to it: spawn keeps it
        assert any(id(t) == task_id for t in _tasks._running)
        gate.set()
        for _ in range(5):
            await asyncio.sleep(0)  # let it run and end (loop turns, not a wait for time)
        assert not any(id(t) == task_id for t in _tasks._running)

    with caplog.at_level(logging.ERROR, logger="dispy"):
        asyncio.run(main())
    (record,) = [r for r in caplog.records if "doing something failed" in r.getMessage()]
    assert "KeyError" in record.getMessage() and record.exc_info is not None
