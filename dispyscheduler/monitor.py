"""The web monitor of ``dispyscheduler --httpd``: dispy's page (``dispy.httpd``)
over a ``SchedulerServer`` instead of a ``JobCluster``.

    monitor = SchedulerMonitor(server)      # on the scheduler's event loop
    ...
    await asyncio.to_thread(monitor.shutdown)

Same page, token, loopback default and headers as ``DispyHTTPServer`` (this is
a subclass of it); what differs:

* the nodes are the scheduler's nodes, with every client computation's jobs
  (a job's id reads ``<computation name>:<client job id>``); the counts are
  over every computation since the scheduler started;
* "cancel" cancels the job through the scheduler, as its client would;
  "deallocate" / "close" a node answer 501: the nodes are shared by every
  client, and no client may take them from the others from here;
* the server's state belongs to its event loop: the HTTP threads never read
  it, they ask the loop (``_on_loop``) and wait at most ``timeout`` seconds.

The counts are the server's tallies (``stats``, ``done_on``, ``failures``),
kept where a job's end goes to its client; "failed" counts the ends other
than Finished, as dispy does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

from dispy.core import jobstate
from dispy.httpd import MAX_EXCEPTION, DispyHTTPServer, _id_text, _num, _status_name

logger = logging.getLogger("dispyscheduler")

#: Seconds an HTTP request waits for the scheduler's event loop.
LOOP_TIMEOUT = 5.0
#: Failed jobs listed (newest first).
FAILURES = 50


class SchedulerMonitor(DispyHTTPServer):
    """Serve dispy's monitor page for ``server`` (a running ``SchedulerServer``).

    Create it on the server's event loop (from a coroutine); ``shutdown()``
    waits for the HTTP threads, which may be waiting for that loop: call it
    from another thread (``asyncio.to_thread``).  The other arguments are
    ``DispyHTTPServer``'s.
    """

    def __init__(
        self,
        server,
        host: str = "127.0.0.1",
        port: int = 8181,
        token: str | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        self.scheduler = server
        self.name = server.name
        self._loop = asyncio.get_running_loop()
        self._started: dict[int, float] = {}  # job uid -> when first seen on a node (loop only)
        # the base class asks its "cluster" for .name and .counts(): this object has both
        super().__init__(self, host=host, port=port, token=token, poll_interval=poll_interval)

    # -- the loop's side -----------------------------------------------------------------
    def _on_loop(self, fn, *args):
        """``fn(*args)`` run on the scheduler's loop; its result (or exception)."""
        try:
            if asyncio.get_running_loop() is self._loop:
                return fn(*args)
        except RuntimeError:  # no loop in this thread: the usual case
            pass
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:
                    fut.set_exception(exc)

        self._loop.call_soon_threadsafe(run)  # RuntimeError once the loop is closed
        try:
            return fut.result(LOOP_TIMEOUT)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(
                f"the scheduler's event loop did not answer in {LOOP_TIMEOUT:g} s"
            ) from None

    def _counts(self) -> dict:
        server = self.scheduler
        pending = sum(
            1
            for comp in list(server.comps.values())
            for job in list(comp.jobs.values())
            if job.status not in jobstate.TERMINAL
        )
        running = 0
        now, seen = time.time(), {}
        for state in list(server.sched.nodes.values()):
            running += len(state.running)
            for uid in state.running:  # sampled each poll_interval: start times for the page
                seen[uid] = self._started.get(uid, now)
        self._started = seen
        stats = server.stats
        return {
            "submitted": stats["submitted"],
            "ended": stats["ended"],
            "failed": stats["failed"],
            "pending": pending,
            "running": running,
            "queued": max(0, pending - running),
        }

    def _collect(self) -> dict:
        server = self.scheduler
        states = server.sched.nodes
        now, mono = time.time(), time.monotonic()
        counts = self._counts()  # first: it updates the start times
        nodes = []
        for key, link in list(server.links.items()):
            state = states.get(key)
            if state is None and not getattr(link, "ready", False):
                continue  # never reached, or lost
            running = list(state.running.values()) if state is not None else []
            ip, port = getattr(link, "ip", "?"), getattr(link, "port", 0)
            heard = getattr(link, "last_heard", None)
            nodes.append(
                {
                    "node": f"{ip}:{port}",
                    "name": getattr(link, "name", ip),
                    "ip_addr": ip,
                    "port": port,
                    "cpus": getattr(link, "cpus", 0),
                    "busy": len(running),
                    "jobs_done": server.done_on.get(key, 0),
                    "cpu_time": None,
                    "update_time": None if heard is None else _num(now - (mono - heard)),
                    "avail_info": None,
                    "ready": bool(getattr(link, "ready", False)),
                    "jobs": [
                        {
                            "uid": job._uid,
                            "id": _job_id(getattr(job, "comp", None), job),
                            "status": _status_name(job.status),
                            "start_time": self._started.get(job._uid),
                        }
                        for job in running
                    ],
                }
            )
        return {
            "name": self.name,
            "counts": counts,
            "nodes": nodes,
            "failures": [_failure(server, *f) for f in reversed(server.failures)],  # newest first
        }

    def _cancel(self, uid: int) -> str | None:
        server = self.scheduler
        for comp in list(server.comps.values()):
            for job in list(getattr(comp, "jobs", {}).values()):
                if job._uid == uid and job.status not in jobstate.TERMINAL:
                    server.cancel(comp, job.cjid)
                    return _job_id(comp, job)
        return None

    # -- DispyHTTPServer's API (from its threads) ----------------------------------------------
    def counts(self) -> dict:
        return self._on_loop(self._counts)

    def snapshot(self) -> dict:
        snap = self._on_loop(self._collect)
        snap.update(time=time.time(), poll_interval=self.poll_interval, history=self.history())
        return snap

    def cancel(self, uid: int) -> tuple[int, dict]:
        try:
            job_id = self._on_loop(self._cancel, uid)
        except (TimeoutError, RuntimeError) as exc:
            return 503, {"ok": False, "error": str(exc)}
        if job_id is None:
            return 404, {"ok": False, "error": f"no running or queued job with uid {uid}"}
        logger.info("monitor: cancelling job %s (uid %s)", job_id, uid)
        return 200, {"ok": True}

    def node_action(self, address: str, action: str) -> tuple[int, dict]:
        return 501, {
            "ok": False,
            "error": f"{action} is not supported by the scheduler monitor: the scheduler's "
            "nodes are shared by all its clients' computations",
        }


def _job_id(comp, job) -> str | None:
    """``<computation name>:<client job id>``."""
    return _id_text(f"{getattr(comp, 'name', '?')}:{getattr(job, 'cjid', '?')}")


def _failure(server, job, comp, entry: dict, when: float) -> dict:
    link = server.links.get(job._node) if job._node is not None else None
    exc = entry.get("x")
    return {
        "uid": job._uid,
        "id": _job_id(comp, job),
        "status": _status_name(entry.get("st")),
        "end_time": when,
        "ip_addr": getattr(link, "ip", None),
        "exception": None if exc is None else str(exc)[:MAX_EXCEPTION],
    }
