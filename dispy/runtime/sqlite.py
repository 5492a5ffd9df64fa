"""SQLite helpers shared by the node's result store and the client's recover file.

Both files follow one design:

* Callers never wait for the disk.  Writes are *operations* queued in memory
  (``BatchWriter.submit``); one thread per file, the writer, takes
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

The writer (``BatchWriter``) is in ``dispy.runtime.batch_writer``; this module
holds the rest: making, opening and checking the files, reading, packing rows.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
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
#: (``BatchWriter`` reads them here each time, so a test may shorten them.)
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0


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
