"""The client's recover file: what a new process needs to collect a crashed cluster's results.

A ``JobCluster`` records its computation (``meta``: id, name, derived key,
node addresses...) and every submitted job that has not finished (its
pickled id and arguments, and the node it was sent to, in one blob).  After the client
crashes, ``dispy.recover_jobs(recover_file)`` opens the file in a new
process, contacts the nodes and collects the results they kept.

Writes never block the caller: ``add_jobs``, ``jobs_done`` and
``set_meta`` queue them, and one writer thread commits everything queued in
one transaction (``dispy.runtime.batch_writer.BatchWriter``).  A job finished
before its row was written is never written.  ``flush()`` waits for the commits.

Durability: SQLite in WAL mode with ``synchronous=NORMAL``: committed writes
survive the client process being killed; a power loss may lose the last
transactions.  The file holds a key derived from the cluster's secret (never
the secret itself: that is the caller's duty), so it is created with mode
0600 before SQLite opens it, and ``open`` refuses a file that group or
others may read or write.

Layout (``PRAGMA application_id`` = ``APP_ID``, ``PRAGMA user_version`` =
``SCHEMA_VERSION``): ``meta(key, value)`` with msgpack'ed values and
``jobs(uid, blob, node)``; ``node`` is no longer written (the node travels
in the blob) and stays for the files written before.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterable
from typing import Any

from .runtime import sqlite as _sqlite
from .runtime.batch_writer import BatchWriter
from .runtime.sqlite import StorageError

logger = logging.getLogger("dispy")

#: ``PRAGMA application_id`` of a recover file ("dsRF").
APP_ID = 0x64735246
#: ``PRAGMA user_version`` of the layout written by this module.
SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE jobs (uid INTEGER PRIMARY KEY, blob BLOB NOT NULL, node TEXT)",
)

#: Seconds a job waits in memory before it is written: one that ends sooner is never written.
WRITE_DELAY = 0.1

# kinds of queued operations (the first item of each operation tuple)
_ADD, _DONE, _META = "add", "done", "meta"


class RecoverFileError(StorageError):
    """A recover file cannot be created, opened, read or written; the message says what to do."""


def _resolve(uid: int, blob) -> tuple | None:
    """A row to insert; a callable blob is made here, in the writer thread."""
    if callable(blob):
        try:
            blob = blob()
        except Exception:
            logger.exception("recover file: the record of job %s could not be made", uid)
            return None
    return (uid, blob)


def _is_recover_file(path: str) -> bool:
    is_sqlite, app_id = _sqlite.read_header(path)
    return is_sqlite and app_id == APP_ID


class RecoverFile:
    """An open recover file.  Make one with ``create`` or ``open``, end with ``close``.

    ``add_jobs``, ``job_sent``, ``jobs_done`` and ``set_meta`` never block;
    ``unfinished``, ``flush`` and ``close`` do.  All methods are thread safe.
    """

    def __init__(self, path: str, conn: sqlite3.Connection, meta: dict) -> None:
        """Internal: use ``RecoverFile.create`` or ``RecoverFile.open``."""
        self.path = path
        self._meta = meta
        self._writer = BatchWriter(
            conn,
            self._apply,
            name="dispy-recover-writer",
            what=f"recover file {path}",
            logger=logger,
            error_cls=RecoverFileError,
            delay=WRITE_DELAY,
        )

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, meta: dict) -> RecoverFile:
        """A new recover file at ``path`` holding ``meta`` (committed before this returns).

        ``meta``: a msgpack-able dict (bytes values are kept as bytes).  An
        existing file at ``path`` is replaced only if it is a recover file.
        """
        path = os.fspath(path)
        if not isinstance(meta, dict):
            raise TypeError(f"recover file meta must be a dict, not {type(meta).__name__}")
        packed = [(str(k), _sqlite.pack(v, f"meta[{k!r}]")) for k, v in meta.items()]
        try:
            if os.path.lexists(path):
                if not os.path.isfile(path) or os.path.islink(path):
                    raise RecoverFileError(
                        f"{path} exists and is not a regular file: not replacing it; "
                        "pass recover_file= another path"
                    )
                if not _is_recover_file(path):
                    raise RecoverFileError(
                        f"{path} exists and is not a dispy recover file: not replacing it; "
                        "pass recover_file= another path, or remove that file"
                    )
                _sqlite.remove_db_files(path)
            _sqlite.create_private_file(path, exclusive=True)
        except FileExistsError as exc:
            raise RecoverFileError(
                f"recover file {path} was created by another program meanwhile: "
                "pass recover_file= a path that no other cluster uses"
            ) from exc
        except OSError as exc:
            raise RecoverFileError(
                f"cannot create recover file {path}: {exc}; pass recover_file= a path "
                "in a folder that exists and that you may write to"
            ) from exc
        conn = _sqlite.connect(path, writer=True)
        try:
            _sqlite.init_schema(conn, app_id=APP_ID, version=SCHEMA_VERSION, statements=_SCHEMA)
            _sqlite.set_wal(conn)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", packed)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise RecoverFileError(f"cannot create recover file {path}: {exc}") from exc
        return cls(path, conn, {k: meta[k] for k in meta})

    @classmethod
    def open(cls, path: str) -> RecoverFile:
        """The existing recover file at ``path`` (after a crash: committed writes are all there).

        Refuses (``RecoverFileError``) a missing file, one that is not a
        recover file, and one that group or others may read or write.
        """
        path = os.fspath(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise RecoverFileError(
                f"no recover file at {path}: pass recover_file= the path the cluster used"
            ) from None
        except OSError as exc:
            raise RecoverFileError(f"cannot open recover file {path}: {exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise RecoverFileError(
                f"{path} is not a regular file, so not a recover file: pass recover_file= "
                "the path the cluster used"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise RecoverFileError(
                f"recover file {path} has mode {mode:04o}: other users may read or change it, "
                "and it holds the cluster's key.  If you trust its content, run "
                f"'chmod 600 {path}' and try again"
            )
        if st.st_uid != os.getuid():
            raise RecoverFileError(
                f"recover file {path} belongs to user id {st.st_uid}, not to you "
                f"({os.getuid()}): recover as that user, or, if you trust its content, "
                f"'chown' it to yourself and try again"
            )
        try:
            ok = _is_recover_file(path)
        except OSError as exc:
            raise RecoverFileError(f"cannot read recover file {path}: {exc}") from exc
        if not ok:
            raise RecoverFileError(
                f"{path} is not a dispy recover file: pass recover_file= the path the cluster used"
            )
        conn = _sqlite.connect(path, writer=True)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise RecoverFileError(
                    f"recover file {path} has layout {version}, this dispy reads "
                    f"{SCHEMA_VERSION}: recover with the dispy version that made it"
                )
            _sqlite.set_wal(conn)
            meta = {k: _sqlite.unpack(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        except RecoverFileError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise RecoverFileError(
                f"recover file {path} is damaged or unreadable ({exc}): its jobs cannot be "
                "recovered from it"
            ) from exc
        return cls(path, conn, meta)

    # -- meta -----------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        """A copy of the meta dict (with the ``set_meta`` changes, written or queued)."""
        return dict(self._meta)

    def set_meta(self, key: str, value: Any) -> None:
        """Set ``meta[key]`` (e.g. the node list); written in the background."""
        packed = _sqlite.pack(value, f"meta[{key!r}]")
        self._writer.submit((_META, str(key), packed))
        self._meta[str(key)] = value

    # -- jobs (non-blocking writes) -------------------------------------------------------
    def add_jobs(self, rows: Iterable[tuple[int, bytes]]) -> None:
        """Queue new jobs as ``(uid, blob)``; the blob (bytes-like) is referenced until written.

        ``blob`` may also be a function returning it, called in the writer
        thread only if the job is still to be written then.

        Raises ``RecoverFileError`` if the file is closed or its last commit
        failed (disk full...): the jobs are then not queued.
        """
        items = []
        for uid, blob in rows:
            if not isinstance(blob, bytes | bytearray | memoryview) and not callable(blob):
                try:
                    memoryview(blob)
                except TypeError:
                    raise TypeError(
                        f"job {uid}: the blob to record must be bytes-like, "
                        f"not {type(blob).__name__}"
                    ) from None
            items.append(((_ADD, int(uid), blob), int(uid)))
        self._writer.submit_many(items, check=True)

    def jobs_done(self, uids: Iterable[int]) -> None:
        """Queue deleting finished jobs; jobs still queued are never written."""
        missed = self._writer.cancel([int(u) for u in uids])
        if missed:  # those may be written already
            self._writer.submit((_DONE, missed))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued before this call is committed; False on timeout.

        Raises ``RecoverFileError`` if the writer cannot commit (disk full...).
        """
        return self._writer.flush(timeout)

    # -- reads (blocking) -----------------------------------------------------------------
    def unfinished(self) -> list[tuple[int, bytes]]:
        """Committed jobs not done, as ``(uid, blob)`` by uid."""
        try:
            return _sqlite.read_transaction(
                self.path,
                lambda conn: conn.execute("SELECT uid, blob FROM jobs ORDER BY uid").fetchall(),
            )
        except sqlite3.Error as exc:
            raise RecoverFileError(f"cannot read recover file {self.path}: {exc}") from exc

    @property
    def stats(self) -> dict[str, int]:
        """Writer counters: commits, ops (written), cancelled, failed_commits, queued."""
        return self._writer.stats

    def close(self, remove: bool = False) -> None:
        """Commit what is queued, stop the writer, close; with ``remove`` delete the file.

        Idempotent.  ``remove=True`` is for a cluster that ended normally:
        nothing is left to recover.
        """
        self._writer.close()
        if remove:
            _sqlite.remove_db_files(self.path)

    def __enter__(self) -> RecoverFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the writer thread ----------------------------------------------------------------
    def _apply(self, conn: sqlite3.Connection, ops: list) -> None:
        """Execute a batch in order, each run of same-kind operations with ``executemany``."""
        start = 0
        for i in range(1, len(ops) + 1):
            if i == len(ops) or ops[i][0] != ops[start][0]:
                kind, run = ops[start][0], ops[start:i]
                if kind == _ADD:
                    conn.executemany(
                        "INSERT OR REPLACE INTO jobs (uid, blob, node) VALUES (?, ?, NULL)",
                        [row for row in (_resolve(uid, blob) for _k, uid, blob in run) if row],
                    )
                elif kind == _DONE:
                    conn.executemany(
                        "DELETE FROM jobs WHERE uid = ?", [(u,) for op in run for u in op[1]]
                    )
                elif kind == _META:
                    conn.executemany(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        [op[1:] for op in run],
                    )
                else:  # pragma: no cover - a bug in this module
                    raise AssertionError(f"unknown recover file operation {kind!r}")
                start = i
