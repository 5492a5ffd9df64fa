"""The writer thread of dispy's SQLite files: callers queue writes, it commits them in batches.

The node's result store, the client's recover file and the scheduler's state
each own one ``BatchWriter``: their callers (often an asyncio event loop) must
never wait for the disk, and thousands of small writes should cost one commit,
not thousands.  The design it keeps (cancelling, ``flush``, retrying a failed
commit) is described in ``dispy.runtime.sqlite``, which holds the rest of the
files' plumbing (opening, checking, reading).
"""

from __future__ import annotations

import concurrent.futures
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from typing import Any

from . import sqlite as _sqlite
from .sqlite import StorageError

#: A queued operation that was cancelled before the writer took it.
_CANCELLED = None

#: Errors of a write's data, not of the disk: retrying cannot help (``_salvage``).
NEVER_WRITABLE = (
    OverflowError,
    TypeError,
    ValueError,
    sqlite3.InterfaceError,
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
)


class BatchWriter:
    """One SQLite connection and the thread that commits queued operations in batches.

    ``apply(conn, ops)`` (given by the owner) executes a batch of operations,
    in order, inside the transaction the writer opened; cancelled operations
    are already left out.  Operations are opaque here.

    Thread safety: every public method may be called from any thread.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        apply: Callable[[sqlite3.Connection, list], None],
        *,
        name: str,
        what: str,
        logger: logging.Logger,
        error_cls: type[StorageError],
        delay: float = 0.0,
    ) -> None:
        self._conn = conn
        # seconds the writer lets operations gather before taking them: what is
        # cancelled meanwhile (a result acknowledged, a job ended) is never written
        self._delay = delay
        self._hurry = False  # flush() or close() wants the queue now
        self._apply = apply
        self._what = what
        self._log = logger
        self._error_cls = error_cls
        self._cond = threading.Condition()
        self._ops: list = []  # queued, not yet taken by the writer (slots may be _CANCELLED)
        self._keyed: dict[Any, int] = {}  # key -> index in _ops, for cancel
        self._calls: list[
            tuple[Callable[[sqlite3.Connection], Any], concurrent.futures.Future]
        ] = []
        self._submitted = 0  # operations submitted so far
        self._committed = 0  # of which committed (a prefix: batches commit in order)
        self._error: BaseException | None = None  # latest failed commit, until one succeeds
        self._stopping = False
        self._closed = False
        self._retry_now = False  # flush() asks the writer to retry a failed commit now
        self._stats = {"commits": 0, "ops": 0, "cancelled": 0, "failed_commits": 0}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- callers' side ------------------------------------------------------------------
    def submit(
        self, op: Any, *, key: Any = None, cancel: Iterable = (), check: bool = False
    ) -> None:
        """Queue ``op``; first cancel the queued operations submitted with a key in ``cancel``.

        An operation submitted with ``key`` can be cancelled until the writer
        takes it (a later submit with the same key makes that one the
        cancellable one).  Raises the owner's error class once closed, and
        with ``check`` while commits fail (see ``check()``): ``op`` is then
        not queued.
        """
        with self._cond:
            self._refuse_if_closed()
            if check:
                self._raise_if_failed()
            for k in cancel:
                i = self._keyed.pop(k, None)
                if i is not None:
                    self._ops[i] = _CANCELLED
                    self._stats["cancelled"] += 1
            if key is not None:
                self._keyed[key] = len(self._ops)
            self._ops.append(op)
            self._submitted += 1
            if len(self._ops) == 1:
                self._cond.notify_all()

    def cancel(self, keys: Iterable) -> list:
        """Cancel the queued operations submitted with these keys; return the keys that
        had none queued (their earlier operations may be written already)."""
        missed = []
        with self._cond:
            for k in keys:
                i = self._keyed.pop(k, None)
                if i is None:
                    missed.append(k)
                else:
                    self._ops[i] = _CANCELLED
                    self._stats["cancelled"] += 1
        return missed

    def submit_many(self, items: Iterable[tuple[Any, Any]], *, check: bool = False) -> None:
        """Queue several ``(op, key)`` pairs at once (``key`` may be None); see ``submit``."""
        with self._cond:
            self._refuse_if_closed()
            if check:
                self._raise_if_failed()
            was_empty = not self._ops
            for op, key in items:
                if key is not None:
                    self._keyed[key] = len(self._ops)
                self._ops.append(op)
                self._submitted += 1
            if was_empty and self._ops:
                self._cond.notify_all()

    def check(self) -> None:
        """Raise the owner's error class if the last commit failed (and none succeeded since)."""
        with self._cond:
            self._raise_if_failed()

    def flush(self, timeout: float | None = None, hurry: bool = True) -> bool:
        """Wait until everything submitted before this call is committed.

        Returns False if ``timeout`` seconds passed first.  ``hurry``: the writer
        takes the queue now instead of after its write delay (without it, the
        wait lets writes gather as usual).  If commits have been failing, the
        writer retries at once (not after its pause); raises the owner's error
        class if a commit fails during the wait.
        """
        with self._cond:
            target = self._submitted
            failures = self._stats["failed_commits"]
            if hurry:
                self._hurry = True
            self._cond.notify_all()
            if self._error is not None:
                self._retry_now = True
                self._cond.notify_all()
            self._cond.wait_for(
                lambda: (
                    self._committed >= target
                    or self._stats["failed_commits"] != failures
                    or self._closed
                ),
                timeout,
            )
            if self._committed >= target:
                return True
            if self._stats["failed_commits"] != failures:
                self._raise_if_failed()
            if self._closed:
                raise self._error_cls(f"{self._what} was closed before all writes were committed")
            return False

    def run(self, fn: Callable[[sqlite3.Connection], Any], timeout: float | None = None) -> Any:
        """Run ``fn(conn)`` in the writer thread, in its own transaction, and return its result.

        Everything submitted before is committed first (if it can be).
        Exceptions of ``fn`` are raised here; ``TimeoutError`` after
        ``timeout`` seconds (``fn`` may still run later).
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._refuse_if_closed()
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut.result(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Commit what is queued (one last try if commits fail), stop the thread, close.

        Idempotent.  Returns False if writes were lost (logged) or the thread
        did not stop within ``timeout``.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            return not self._thread.is_alive() and self._committed >= self._submitted

    @property
    def stats(self) -> dict[str, int]:
        """Counters: commits, operations written, cancelled, failed commits, queued now."""
        with self._cond:
            return {**self._stats, "queued": self._submitted - self._committed}

    def _refuse_if_closed(self) -> None:
        if self._closed and not self._stopping:
            raise self._error_cls(
                f"the writer thread of {self._what} stopped on an error (see the log "
                "above): close it and open it again"
            )
        if self._stopping:
            raise self._error_cls(f"{self._what} is closed: open it again to write to it")

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            exc = self._error
            raise self._error_cls(
                f"cannot write to {self._what}: {type(exc).__name__}: {exc}. "
                "The unwritten data is kept in memory and retried; fix the cause "
                "(disk full? file or folder removed or read-only?)"
            ) from exc

    # -- the writer thread --------------------------------------------------------------
    def _run(self) -> None:
        pause = _sqlite.RETRY_FIRST_S
        retry: list = []  # a batch whose commit failed
        try:
            while True:
                with self._cond:
                    if retry:  # pause before retrying, unless closing, flushed or run()
                        self._cond.wait_for(
                            lambda: self._stopping or self._retry_now or self._calls, pause
                        )
                        pause = min(pause * 2, _sqlite.RETRY_MAX_S)
                    else:
                        self._cond.wait_for(lambda: self._ops or self._calls or self._stopping)
                        if self._delay and self._ops:
                            self._cond.wait_for(
                                lambda: self._stopping or self._calls or self._hurry, self._delay
                            )
                    self._hurry = False
                    batch = retry + self._ops
                    self._ops = []
                    self._keyed = {}
                    calls, self._calls = self._calls, []
                    target = self._submitted
                    stopping = self._stopping
                    self._retry_now = False
                retry = []
                ops = [op for op in batch if op is not _CANCELLED]
                if batch:
                    failure = self._commit(ops)
                    if isinstance(failure, NEVER_WRITABLE):
                        failure, ops = self._salvage(ops)
                    with self._cond:
                        if failure is None:
                            self._committed = target
                            self._stats["commits"] += 1
                            self._stats["ops"] += len(ops)
                            if self._error is not None:
                                self._log.warning("%s: writing works again", self._what)
                            self._error = None
                            pause = _sqlite.RETRY_FIRST_S
                        else:
                            self._stats["failed_commits"] += 1
                            if self._error is None or str(self._error) != str(failure):
                                self._log.error(
                                    "%s: commit of %d writes failed (%s: %s); retrying",
                                    self._what,
                                    len(ops),
                                    type(failure).__name__,
                                    failure,
                                )
                            self._error = failure
                            retry = ops
                        self._cond.notify_all()
                # drop the references now: a batch may hold hundreds of MB of results
                batch = ops = None
                for fn, fut in calls:
                    self._call(fn, fut)
                calls = None
                if stopping:
                    if retry:
                        self._log.error(
                            "%s: closed with %d writes that could not be committed: they are lost",
                            self._what,
                            len(retry),
                        )
                    return
        except BaseException:  # a bug here: say so, and refuse writes from now on
            self._log.exception("%s: the writer thread failed; nothing more is written", self._what)
            raise
        finally:
            with self._cond:
                self._closed = True
                calls, self._calls = self._calls, []
                self._cond.notify_all()
            for _fn, fut in calls:
                fut.set_exception(self._error_cls(f"{self._what} is closed"))
            try:
                self._conn.close()
            except sqlite3.Error:
                pass

    def _salvage(self, ops: list) -> tuple[BaseException | None, list]:
        """A batch failed on its data, not on the disk (a job id SQLite cannot store,
        say): retrying it would fail for ever, and every later write with it.  Commit
        its writes one by one and drop, logged, those that can never be written.
        Returns (a failure of the disk, if one came, and the writes from there on)."""
        for i, op in enumerate(ops):
            failure = self._commit([op])
            if failure is None:
                continue
            if not isinstance(failure, NEVER_WRITABLE):
                return failure, ops[i:]
            self._log.error(
                "%s: a write that can never succeed was dropped (%s: %s)",
                self._what, type(failure).__name__, failure,
            )  # fmt: skip
            with self._cond:
                self._stats["dropped"] = self._stats.get("dropped", 0) + 1
        return None, []

    def _commit(self, ops: list) -> BaseException | None:
        """Apply ``ops`` in one transaction; the exception if it failed (rolled back)."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._apply(conn, ops)
            conn.execute("COMMIT")
            return None
        except Exception as exc:  # noqa: BLE001 - reported through check()/flush() and the log
            self._rollback()
            return exc

    def _call(
        self, fn: Callable[[sqlite3.Connection], Any], fut: concurrent.futures.Future
    ) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._rollback()
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            self._log.error("%s: rollback failed: %s", self._what, exc)
