"""SQLite helpers shared by the node's result store and the client's recover file.

Both files follow one design:

* Callers never wait for the disk.  Writes are *operations* queued in memory
  (``_BatchWriter.submit``); one thread per file, the writer, takes
  everything queued at once and commits it in ONE transaction.  Thousands of
  small writes thus cost one commit, and an asyncio event loop that queues
  them never blocks on I/O.
* A queued write may be cancelled while the writer has not taken it yet (a
  result acknowledged before it was written is never written).
* ``flush()`` waits until everything queued before the call is committed.
* Reads open their own short-lived connection: in WAL mode readers and the
  writer do not block each other.
* A failed commit (disk full, file removed...) is logged, kept in memory and
  retried with a growing pause; until a commit succeeds again, ``check()``
  raises the owner's error class with the cause, and ``flush()`` retries at
  once and raises it if that fails too.

Files are created with mode 0600 before SQLite opens them; SQLite gives its
``-wal`` and ``-shm`` files the same mode as the database file.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack

from ..errors import DispyError

#: First 16 bytes of every SQLite 3 database file.
SQLITE_MAGIC = b"SQLite format 3\x00"
#: Offsets (in the 100-byte database header) of the fields checked here.
_APP_ID_OFFSET = 68

#: Page size of new files: a good compromise between many tiny rows and
#: blobs of hundreds of MB (measured: 16 KiB commits tiny rows as fast as
#: 4 KiB and writes large blobs ~30% faster).
PAGE_SIZE = 16384
#: The WAL is truncated to this size after a checkpoint (a large result
#: would otherwise leave a WAL file as large as itself behind).
JOURNAL_SIZE_LIMIT = 64 << 20
#: Seconds a connection waits for a lock held by another connection.
BUSY_TIMEOUT_S = 30.0

#: Pauses (seconds) between retries of a failed commit: doubles up to the max.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0

#: A queued operation that was cancelled before the writer took it.
_CANCELLED = None


class StorageError(DispyError):
    """A dispy SQLite file (result store, recover file) cannot be used or written."""


# -- files ----------------------------------------------------------------------------
def db_files(path: str) -> tuple[str, str, str]:
    """The database file and the two files SQLite keeps next to it in WAL mode."""
    return path, path + "-wal", path + "-shm"


def remove_db_files(path: str) -> None:
    """Delete the database at ``path`` and its ``-wal``/``-shm`` files; missing ones are fine."""
    for name in db_files(path):
        try:
            os.remove(name)
        except FileNotFoundError:
            pass


def read_header(path: str) -> tuple[bool, int | None]:
    """``(is_sqlite, application_id)`` of the file at ``path``.

    ``(False, None)`` for an empty file or one that is not an SQLite 3
    database.  The header is read directly, not through SQLite, so a foreign
    file is never opened as a database.  Files made here are initialised in
    rollback-journal mode before switching to WAL, so their header (with the
    application id) is always in the main file.
    """
    with open(path, "rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return False, None
    return True, int.from_bytes(head[_APP_ID_OFFSET : _APP_ID_OFFSET + 4], "big")


def create_private_file(path: str, *, exclusive: bool) -> bool:
    """Make sure ``path`` exists with mode 0600; True if this call created it.

    With ``exclusive`` the file must not exist (``FileExistsError``).  An
    existing file's mode is set to 0600 too.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else 0)
    existed = os.path.lexists(path)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(
                exc.errno, f"{path} is a symlink; remove it (it is not followed)"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(
                errno.EPERM,
                f"{path} is not a file of this user's own (owner {st.st_uid}); remove it",
            )
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return not existed


def connect(path: str, *, writer: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit ``BEGIN``/``COMMIT``).

    The writer's connection may be handed to the writer thread
    (``check_same_thread=False``; only one thread uses it at a time).
    Readers are ``query_only``.
    """
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=not writer
    )
    if not writer:
        conn.execute("PRAGMA query_only = ON")
    return conn


def init_schema(
    conn: sqlite3.Connection, *, app_id: int, version: int, statements: Sequence[str]
) -> None:
    """Set up a new, empty database: page size, ids, tables, then WAL mode.

    The tables and ``application_id`` are committed in rollback-journal mode
    first, so the main file's header identifies the file from then on.
    """
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"PRAGMA application_id = {app_id}")
        for sql in statements:
            conn.execute(sql)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def open_checked(
    path: str,
    *,
    app_id: int,
    version: int,
    statements: Sequence[str],
    tables: Iterable[str],
    what: str,
    program: str,
    hint: str,
    error_cls: type[StorageError],
) -> sqlite3.Connection:
    """The writer's connection (WAL) to the database of kind ``what`` at ``path``:
    made (mode 0600, ``statements``) if missing or empty, else checked to be one of
    ours (``app_id``), of this ``version``, with ``tables``, readable.  Anything
    else raises ``error_cls`` naming the file, what is wrong and ``hint``."""
    try:
        create_private_file(path, exclusive=False)
        is_sqlite, found_id = read_header(path)
        empty = os.path.getsize(path) == 0
    except OSError as exc:
        raise error_cls(f"cannot open {what} {path}: {exc}; {hint}") from exc
    if not empty and not is_sqlite:
        raise error_cls(f"{what} {path} is damaged (not an SQLite database); {hint}")
    if is_sqlite and found_id != app_id:
        raise error_cls(f"{path} is an SQLite database but not a {what}; {hint}")
    conn = connect(path, writer=True)
    try:
        if empty:
            init_schema(conn, app_id=app_id, version=version, statements=statements)
        set_wal(conn)
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > version:
            raise error_cls(
                f"{what} {path} was written by a newer {program} (layout {found}; this "
                f"one reads {version}): use that version, or {hint}"
            )
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
        if found != version or not set(tables) <= names:
            raise error_cls(
                f"{what} {path} is damaged (layout {found}, tables {sorted(names)}); {hint}"
            )
        for table in tables:  # readable through and through (not just its header)
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    except error_cls:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise error_cls(f"{what} {path} is damaged or unreadable ({exc}); {hint}") from exc
    return conn


def set_wal(conn: sqlite3.Connection) -> None:
    """WAL journal with ``synchronous=NORMAL`` (see the owners' notes on durability)."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot switch to WAL journal mode (got {mode!r})")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")


def read_transaction(path: str, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """Run ``fn(conn)`` in one read transaction of a new connection (a consistent snapshot)."""
    conn = connect(path, writer=False)
    try:
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")
    finally:
        conn.close()


# -- the writer -----------------------------------------------------------------------
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


class _BatchWriter:
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
        pause = RETRY_FIRST_S
        retry: list = []  # a batch whose commit failed
        try:
            while True:
                with self._cond:
                    if retry:  # pause before retrying, unless closing, flushed or run()
                        self._cond.wait_for(
                            lambda: self._stopping or self._retry_now or self._calls, pause
                        )
                        pause = min(pause * 2, RETRY_MAX_S)
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
                            pause = RETRY_FIRST_S
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


def pack(value: Any, what: str) -> bytes:
    """``value`` as msgpack for a row; ``TypeError`` naming ``what`` if it cannot be."""
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(
            f"{what} cannot be stored ({exc}): use only dicts, lists, str, bytes, "
            "int, float, bool and None"
        ) from exc


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
