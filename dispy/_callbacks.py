"""The cluster's callback thread: the user's ``callback`` (dispy's ``job_status``)
and ``cluster_status`` run there, in the order the loop thread reported, never on
the event loop (a slow callback must not stall the cluster)."""

from __future__ import annotations

import copy
import logging
import queue
import threading

logger = logging.getLogger("dispy")


class Callbacks:
    """Reports from the loop thread, run on a thread of their own."""

    def __init__(self, name: str, callback, cluster_status) -> None:
        self.callback = callback
        self.cluster_status = cluster_status
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name=f"dispy-callbacks-{name}", daemon=True
        )
        self._thread.start()

    # -- called on the loop thread -------------------------------------------------------
    def job_ended(self, job, node) -> None:
        self._queue.put(("job", job, node, job.status))

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
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            what, job, node, status = item
            try:
                if what == "job" and self.callback is not None:
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
