"""The cluster's callback thread: the user's ``callback`` (dispy's ``job_status``)
and ``cluster_status`` run there, in the order the loop thread reported, never on
the event loop (a slow callback must not stall the cluster).

A job's end is published here (its status, ``job()``, ``wait()``), just before
the callbacks are called with it: a program that reads a job's status right
after submitting it, as dispy's ``bounded_submit.py`` does, never sees an end
its callback has not been given yet."""

from __future__ import annotations

import copy
import logging
import queue
import threading

from ._job import SEES_ENDS

logger = logging.getLogger("dispy")


class Callbacks:
    """Reports from the loop thread, run on a thread of their own."""

    def __init__(self, name: str, callback, cluster_status, publish) -> None:
        self.callback = callback
        self.publish = publish  # publish(job): the job's end, to every thread
        self.cluster_status = cluster_status
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name=f"dispy-callbacks-{name}", daemon=True
        )
        self._thread.start()

    # -- called on the loop thread -------------------------------------------------------
    def job_ended(self, job, node) -> None:
        self._queue.put(("end", job, node, job.status))

    def provisional(self, job, node) -> None:
        # a snapshot: by the time the callback runs, the job may have ended
        self._queue.put(("job", copy.copy(job), node, job.status))

    def status_changed(self, job, node) -> None:
        if self.cluster_status is not None:
            self._queue.put(("status", job, node, job.status))

    def node_status(self, status: int, node) -> None:
        if self.cluster_status is not None:
            self._queue.put(("node", None, node, status))

    # -- the thread ------------------------------------------------------------------------
    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _run(self) -> None:
        me = threading.get_ident()
        SEES_ENDS.add(me)
        try:
            self._serve()
        finally:
            SEES_ENDS.discard(me)

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            what, job, node, status = item
            if what == "end":
                self.publish(job)
            try:
                if what in ("end", "job") and self.callback is not None:
                    self.callback(job)
                if self.cluster_status is not None:
                    self.cluster_status(status, node, job)
            except Exception:
                logger.exception("callback raised an exception (ignored)")

    def close(self) -> None:
        """Run what is queued, then stop (not waited for from a callback itself)."""
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()
