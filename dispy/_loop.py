"""The client's event loop: one daemon thread per process, shared by all clusters.

The public API (``JobCluster``) is plain blocking Python; everything that
touches the network runs here.  ``run(coro)`` submits a coroutine from any
other thread and returns a ``concurrent.futures.Future``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def main() -> None:
                from ._job import SEES_ENDS  # the loop makes jobs' ends: it sees them

                me = threading.get_ident()
                SEES_ENDS.add(me)
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                try:
                    loop.run_forever()
                finally:
                    SEES_ENDS.discard(me)

            threading.Thread(target=main, name="dispy-loop", daemon=True).start()
            started.wait()
            _loop = loop
        return _loop


def run(coro) -> concurrent.futures.Future:
    return asyncio.run_coroutine_threadsafe(coro, get_loop())
