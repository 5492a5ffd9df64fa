"""A cluster's jobs' ends: counted, and published to the program's threads.

The event loop ends a job (``JobCluster._job_ended``).  Its end is *published*
(its ``status`` turns final for every thread, ``job()`` and ``finish`` return,
its Future resolves, the counts move) at once, or, if the cluster has
callbacks, on the callback thread just before they are called with it: so a
program that reads a job's status right after submitting it, as dispy's
``bounded_submit.py`` does, never sees an end its callback has not been given.
A thread that waits for jobs (``job()``, ``finish.wait()``, ``wait()``)
publishes what it waited for itself and never waits for the callbacks, which
may be waiting for a lock it holds.
"""

from __future__ import annotations

import collections
import threading
import time

from ._job import resolve_future
from ._report import PROGRESS_REFRESH
from .core import jobstate


class Ends:
    """The counts of one cluster's jobs, and the publication of their ends."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.open = 0  # jobs not ended for the client (published or not)
        self.unpublished: dict = {}  # ended, waiting for the callbacks (uid -> job)
        self.n_submitted = self.n_ended = self.n_failed = 0
        #: the last jobs that did not finish (Terminated, Cancelled, Abandoned), newest last
        self.recent_failures: collections.deque = collections.deque(maxlen=50)
        self.callbacks = None  # the cluster's Callbacks, if it has any

    @property
    def unfinished(self) -> int:
        """Jobs whose end is not published yet (not ended, or waiting for the callbacks)."""
        return self.open + len(self.unpublished)

    def added(self) -> None:
        with self.cond:
            self.open += 1
            self.n_submitted += 1

    def counts(self) -> dict:
        with self.cond:
            return {
                "submitted": self.n_submitted,
                "ended": self.n_ended,
                "failed": self.n_failed,
                "pending": self.unfinished,
            }

    # -- waiting (any thread) ---------------------------------------------------------------
    def wait(self, timeout: float | None, bar=None) -> bool:
        """Until every job has ended for the client (``bar``: a progress line to
        draw meanwhile); then the ends still queued for the callbacks are
        published here (a callback thread sees them anyway)."""
        if bar is None:
            with self.cond:
                done = self.cond.wait_for(lambda: self.open == 0, timeout)
        else:
            done = self._wait_drawing(timeout, bar)
        if done and self.callbacks is not None and not self.callbacks.on_thread():
            with self.cond:
                waiting = list(self.unpublished.values())
            for job in waiting:
                self.publish(job)
        return done

    def _wait_drawing(self, timeout: float | None, bar) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.open:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                step = PROGRESS_REFRESH if left is None else min(left, PROGRESS_REFRESH)
                if self.cond.wait(step) and not self.open:
                    break  # the final line follows
                self.cond.release()
                try:
                    bar.draw()
                finally:
                    self.cond.acquire()
            done = self.open == 0
        bar.draw(final=True)
        return done

    # -- the loop thread -------------------------------------------------------------------
    def ended(self, job, node) -> None:
        """The client's end of ``job``: published now or, with callbacks, on their
        thread just before they are called with it, unless a thread waiting for
        it publishes it first."""
        if self.callbacks is None:
            self.publish(job)
            return
        end = job._end
        with self.cond:
            self.open -= 1
            self.unpublished[job._uid] = job
            if self.open == 0:
                self.cond.notify_all()
        with end._cond:
            end._waiting = job  # for a thread that waits for it: see JobEnd.wait
            end._over = True
            end._cond.notify_all()
        self.callbacks.job_ended(job, node)

    # -- publication (the loop, the callback thread, or a waiter) -------------------------------
    def publish(self, job) -> None:
        """``job``'s end, to every thread (once): counted, then ``job()``."""
        with self.cond:
            if self.callbacks is None:
                self.open -= 1
            elif self.unpublished.pop(job._uid, None) is None:
                return  # published already, by a thread that waited for it
            self.n_ended += 1
            if job._status != jobstate.Finished:
                self.n_failed += 1
                self.recent_failures.append(job)
            if self.unfinished == 0:
                self.cond.notify_all()
            # under the lock: a thread that found it published already returns
            # only once it is
            fut = job._ended()
        if fut is not None:
            resolve_future(job, fut)
