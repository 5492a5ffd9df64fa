"""The node's durable result store: computed results stay on disk until the client acks them.

The node (an asyncio program) calls ``put`` and ``ack`` on its event loop:
they only queue the write.  The store's writer thread
(``dispy.runtime.batch_writer.BatchWriter``) commits everything
queued in one transaction, so ~10,000 tiny results a second cost a few
commits, not 10,000.  A result acknowledged before the writer took it is
never written.

Reads (``pending``, ``pending_cids``) block: run them in a
worker thread (``asyncio.to_thread``).  Each opens its own connection and
reads one consistent snapshot of what is *committed*: call ``flush()``
first for the puts and acks queued so far to show.

Durability: SQLite in WAL mode with ``synchronous=NORMAL``.  A commit is in
the operating system's hands when ``flush()`` returns, so the results
survive the node process being killed (``kill -9``, a crash, the OOM
killer): that is what the store promises and what its tests check.  The WAL
is not fsync'ed at each commit, so a power loss or an operating-system
crash may lose the last transactions (never the file's integrity).
``synchronous=FULL`` would fsync every commit, at a large cost in job
throughput, for a failure that also loses the jobs the node was running.

Layout (schema version ``SCHEMA_VERSION`` in ``PRAGMA user_version``;
``PRAGMA application_id`` = ``APP_ID`` marks the file as a result store):

* ``results(cid, jid, created, info, nsegs)``: ``info`` is the msgpack'ed
  dict given to ``put``.
* ``chunks(cid, jid, seg, part, data)``: the payload segments, each one row
  (or several ``CHUNK_BYTES`` parts, for segments beyond SQLite's blob
  limit).  Segments are bound as blobs straight from the caller's buffers:
  no concatenation, and a one-part segment reads back as one ``bytes``
  without slicing.

  A segment of more than ``FILE_ABOVE`` bytes is not a blob: it is written
  once (``writev`` from the caller's buffers, no copy in this process) to a
  file of its own in ``<store>.files/``, and its row (``part`` -1) holds the
  file's name.  SQLite copied a bound blob into its own memory (a 1 GiB
  result cost the node 1.5 GiB) and wrote it 2-3x slower.  The file is
  written before the commit that names it; files no row names (a crash
  between the two) are removed when the store is opened.  ``pending`` maps
  such a segment (no copy).

Stores written before 2026-12 also hold an unused ``computations`` table;
it is left alone.

Copies: ``put`` keeps references to the caller's buffers (the caller must
not modify them until the result is flushed or acked; the node does not).
The writer thread binds them to SQLite directly; only a non-contiguous
buffer is copied (``tobytes``), in the writer thread.  SQLite itself copies
a bound blob once into its pages.  The file mode is 0600 (also of the
``-wal``/``-shm`` files, which SQLite creates with the database's mode).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import pickle
import shutil
import sqlite3
import time
from collections.abc import Iterable, Sequence

from dispy.runtime import sqlite as _sqlite
from dispy.runtime.batch_writer import BatchWriter
from dispy.runtime.sqlite import StorageError

__all__ = ["ResultStore", "StoreError"]

logger = logging.getLogger("dispynode")

#: ``PRAGMA application_id`` of a result store ("dsRS").
APP_ID = 0x64735253
#: ``PRAGMA user_version`` of the layout written by this module.
SCHEMA_VERSION = 1
#: Default retention of unacked results: 7 days.
DEFAULT_RETENTION_S = 7 * 86400.0

_SCHEMA = (
    """CREATE TABLE results (
        cid TEXT NOT NULL, jid INTEGER NOT NULL, created REAL NOT NULL,
        info BLOB NOT NULL, nsegs INTEGER NOT NULL,
        PRIMARY KEY (cid, jid)) WITHOUT ROWID""",
    """CREATE TABLE chunks (
        cid TEXT NOT NULL, jid INTEGER NOT NULL, seg INTEGER NOT NULL, part INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (cid, jid, seg, part))""",
)

# kinds of queued operations (the first item of each operation tuple)
_PUT, _ACK = "put", "ack"

#: Segments larger than this go to files of their own, not into SQLite.
FILE_ABOVE = 8 << 20
#: ``chunks.part`` of a segment kept in a file (``data`` is the file's name).
IN_FILE = -1

#: Seconds a result waits in memory before it is written: most are acknowledged
#: by a connected client within a millisecond, and then never touch the disk.
#: A result not acknowledged by then is on disk within WRITE_DELAY + a commit.
WRITE_DELAY = 0.1


class StoreError(StorageError):
    """The result store cannot be opened, read or written; the message says what to do."""


def _clean_hint(path: str) -> str:
    return (
        f"remove it or start dispynode with --clean (its unacknowledged results are then "
        f"lost; a new store is made at {path})"
    )


def _text(value) -> str:
    return value if isinstance(value, str) else bytes(value).decode()


def _byte_view(seg: memoryview) -> memoryview:
    """``seg`` as a flat view of bytes, without copying unless it is not contiguous.

    A contiguous buffer (C or Fortran order) gives its memory as laid out; a
    non-contiguous one is copied in C order.
    """
    try:
        return pickle.PickleBuffer(seg).raw()
    except BufferError:
        return memoryview(seg.tobytes())


class ResultStore:
    """Results kept on disk until acknowledged.

    ``put`` and ``ack`` never block (call them from the event loop); the other methods block.  All
    methods are thread safe.  Use as a context manager or call ``close()``.
    """

    #: Largest blob per ``chunks`` row; longer segments are split in parts
    #: (SQLite's limit is 1,000,000,000 bytes per blob).
    CHUNK_BYTES = 256 << 20

    def __init__(self, path: str, *, retention: float = DEFAULT_RETENTION_S) -> None:
        """Open the store at ``path`` (created if missing; its folder must exist).

        ``retention``: seconds after which ``expire()`` deletes an unacked
        result (counted from its ``put``).  Raises ``StoreError`` if the file is not
        a result store, is damaged, or cannot be created or read.
        """
        if not retention > 0:
            raise ValueError(f"retention must be a positive number of seconds, not {retention!r}")
        self.path = os.fspath(path)
        self.retention = float(retention)
        self.files = self.path + ".files"
        conn = self._open(self.path)
        try:
            os.makedirs(self.files, mode=0o700, exist_ok=True)
            rows = conn.execute(
                "SELECT cid, jid, data FROM chunks WHERE part = ?", (IN_FILE,)
            ).fetchall()
            named = {_text(d) for _c, _j, d in rows}
            #: results with segments in files (only the writer thread uses it after this)
            self._filed = {(c, j) for c, j, _d in rows}
            for name in set(os.listdir(self.files)) - named:  # written, never committed
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.files, name))
        except (OSError, sqlite3.Error) as exc:
            conn.close()
            raise StoreError(
                f"cannot use the folder {self.files} of result store {self.path}: {exc}"
            ) from exc
        self._writer = BatchWriter(
            conn,
            self._apply,
            name="dispynode-store-writer",
            what=f"result store {self.path}",
            logger=logger,
            error_cls=StoreError,
            delay=WRITE_DELAY,
        )

    # -- opening --------------------------------------------------------------------------
    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        """The writer's connection to a checked (or new) store at ``path``."""
        return _sqlite.open_checked(
            path, app_id=APP_ID, version=SCHEMA_VERSION, statements=_SCHEMA,
            tables=("results", "chunks"), what="dispynode result store",
            program="dispynode", hint=_clean_hint(path), error_cls=StoreError,
        )  # fmt: skip

    # -- writes (non-blocking) ------------------------------------------------------------
    def put(self, cid: str, jid: int, info: dict, segs: Sequence) -> None:
        """Queue the result of job ``jid`` of computation ``cid`` to be written.

        ``info``: a dict msgpack can carry (packed now: a ``TypeError`` says
        what cannot be).  ``segs``: the payload as bytes-like segments
        (``bytes``, ``memoryview``, numpy arrays...); they are referenced,
        not copied, until written, so they must not be modified meanwhile.
        A later put of the same ``(cid, jid)`` replaces the result.

        Raises ``StoreError`` if the store is closed or its last commit
        failed (disk full...): the result is then *not* queued.
        """
        packed = _sqlite.pack(info, f"result info of job {jid} of computation {cid}")
        try:
            views = [memoryview(s) for s in segs]
        except TypeError as exc:
            raise TypeError(
                f"result segments of job {jid} of computation {cid} must be bytes-like "
                f"objects (bytes, bytearray, memoryview, numpy arrays): {exc}"
            ) from exc
        self._writer.submit(
            (_PUT, cid, jid, time.time(), packed, views), key=(cid, jid), check=True
        )

    def ack(self, cid: str, jids: Iterable[int]) -> None:
        """Queue the deletion of results the client received; results still queued are never written."""
        missed = self._writer.cancel([(cid, j) for j in jids])
        if missed:  # those may be on disk already
            self._writer.submit((_ACK, cid, [j for _, j in missed]))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued before this call is committed; False on timeout.

        Raises ``StoreError`` if the writer cannot commit (disk full...).
        """
        return self._writer.flush(timeout)

    # -- reads (blocking) -----------------------------------------------------------------
    def pending(self, cid: str) -> list[tuple[int, dict, list[bytes]]]:
        """Committed, unacked results of computation ``cid`` as ``(jid, info, segs)``, by jid.

        A segment is ``bytes``, or for one kept in a file a read-only
        ``memoryview`` of the file mapped."""

        def read(conn: sqlite3.Connection) -> list[tuple[int, dict, list[bytes]]]:
            rows = conn.execute(
                "SELECT jid, info, nsegs FROM results WHERE cid = ? ORDER BY jid", (cid,)
            ).fetchall()
            parts: dict[int, list[list[bytes]]] = {}
            for jid, _seg, part, data in conn.execute(
                "SELECT jid, seg, part, data FROM chunks WHERE cid = ? ORDER BY jid, seg, part",
                (cid,),
            ):
                segs = parts.setdefault(jid, [])
                if part == IN_FILE:
                    data = self._map(_text(data))
                    if data is None:
                        continue  # (counted missing below)
                if part in (0, IN_FILE):
                    segs.append([data])
                else:
                    segs[-1].append(data)
            out = []
            for jid, info, nsegs in rows:
                segs = [p[0] if len(p) == 1 else b"".join(p) for p in parts.pop(jid, [])]
                if len(segs) != nsegs:
                    logger.error(
                        "result store %s: job %s of computation %s has %d of its %d segments; "
                        "skipped",
                        self.path,
                        jid,
                        cid,
                        len(segs),
                        nsegs,
                    )
                    continue
                out.append((jid, _sqlite.unpack(info), segs))
            return out

        return self._read(read)

    def _map(self, name: str):
        """A file segment, mapped read-only (a view; no copy), or None if it is gone."""
        try:
            with open(os.path.join(self.files, name), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    return b""
                return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ))
        except OSError as exc:
            logger.error("result store %s: segment file %s: %s", self.path, name, exc)
            return None

    def pending_cids(self) -> dict[str, int]:
        """Number of committed, unacked results per computation id."""
        return self._read(
            lambda conn: dict(conn.execute("SELECT cid, count(*) FROM results GROUP BY cid"))
        )

    def _read(self, fn):
        try:
            return _sqlite.read_transaction(self.path, fn)
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot read result store {self.path} ({exc}); if it is damaged, "
                f"{_clean_hint(self.path)}"
            ) from exc

    # -- maintenance ----------------------------------------------------------------------
    def expire(self, now: float | None = None) -> int:
        """Delete results put more than ``retention`` s
        before ``now`` (default: the current time); return how many were deleted.

        Runs in the writer thread after what is queued; blocks until done.
        """
        cutoff = (time.time() if now is None else now) - self.retention

        def delete(conn: sqlite3.Connection) -> int:
            self._unlink_files(
                conn.execute(
                    "SELECT data FROM chunks WHERE part = ? AND (cid, jid) IN "
                    "(SELECT cid, jid FROM results WHERE created < ?)",
                    (IN_FILE, cutoff),
                )
            )
            conn.execute(
                "DELETE FROM chunks WHERE (cid, jid) IN "
                "(SELECT cid, jid FROM results WHERE created < ?)",
                (cutoff,),
            )
            return conn.execute("DELETE FROM results WHERE created < ?", (cutoff,)).rowcount

        try:
            count = self._writer.run(delete)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot expire old results in {self.path}: {exc}") from exc
        if count:
            logger.info("result store %s: expired %d results", self.path, count)
        return count

    @property
    def stats(self) -> dict[str, int]:
        """Writer counters: commits, ops (written), cancelled (puts acked before written),
        failed_commits, queued."""
        return self._writer.stats

    def close(self) -> None:
        """Commit what is queued, stop the writer thread and close the file; idempotent.

        Writes that cannot be committed (disk full) are logged as lost.
        """
        self._writer.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def remove(path: str) -> None:
        """Delete the store at ``path`` and its ``-wal``/``-shm`` files (``dispynode --clean``).

        The store must not be open.
        """
        _sqlite.remove_db_files(os.fspath(path))
        shutil.rmtree(os.fspath(path) + ".files", ignore_errors=True)

    # -- the writer thread ----------------------------------------------------------------
    def _apply(self, conn: sqlite3.Connection, ops: list) -> None:
        """Execute a batch in order, each run of same-kind operations with ``executemany``."""
        start = 0
        for i in range(1, len(ops) + 1):
            if i == len(ops) or ops[i][0] != ops[start][0]:
                self._apply_run(conn, ops[start][0], ops[start:i])
                start = i

    def _apply_run(self, conn: sqlite3.Connection, kind: str, ops: list) -> None:
        if kind == _PUT:
            # a later put of a key in the same run replaces an earlier one (a job id
            # sent twice in one JOBS frame made two puts: UNIQUE failed on chunks)
            ops = list({(op[1], op[2]): op for op in ops}.values())
            # a put replaces: drop the parts of an earlier result with the same key
            self._unlink_keys(conn, [(op[1], op[2]) for op in ops])
            conn.executemany(
                "DELETE FROM chunks WHERE cid = ? AND jid = ?", [(op[1], op[2]) for op in ops]
            )
            conn.executemany(
                "INSERT OR REPLACE INTO results (cid, jid, created, info, nsegs) "
                "VALUES (?, ?, ?, ?, ?)",
                [(cid, jid, created, info, len(segs)) for _k, cid, jid, created, info, segs in ops],
            )
            conn.executemany(
                "INSERT INTO chunks (cid, jid, seg, part, data) VALUES (?, ?, ?, ?, ?)",
                self._chunk_rows(ops),
            )
        elif kind == _ACK:
            keys = [(cid, jid) for _k, cid, jids in ops for jid in jids]
            self._unlink_keys(conn, keys)
            conn.executemany("DELETE FROM results WHERE cid = ? AND jid = ?", keys)
            conn.executemany("DELETE FROM chunks WHERE cid = ? AND jid = ?", keys)
        else:  # pragma: no cover - a bug in this module
            raise AssertionError(f"unknown store operation {kind!r}")

    def _write_file(self, cid: str, jid: int, seg: int, data: memoryview) -> str:
        """Write one segment to its file (replaced whole); return the file's name."""
        key = f"{cid}\0{jid}\0{seg}".encode(errors="surrogatepass")
        name = hashlib.blake2b(key, digest_size=16).hexdigest()
        path = os.path.join(self.files, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done : done + (1 << 30)])
        finally:
            os.close(fd)
        return name

    def _unlink_files(self, rows) -> None:
        for (name,) in rows:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.files, _text(name)))

    def _unlink_keys(self, conn: sqlite3.Connection, keys: list) -> None:
        """Remove the segment files of the results ``keys`` (cid, jid)."""
        for key in keys:
            if key not in self._filed:
                continue
            self._filed.discard(key)
            cid, jid = key
            self._unlink_files(
                conn.execute(
                    "SELECT data FROM chunks WHERE cid = ? AND jid = ? AND part = ?",
                    (cid, jid, IN_FILE),
                )
            )

    def _chunk_rows(self, ops: list):
        """Rows of ``chunks`` for a run of puts; segments are sliced (no copy) into parts."""
        step = self.CHUNK_BYTES
        for _k, cid, jid, _created, _info, segs in ops:
            for s, seg in enumerate(segs):
                data = _byte_view(seg)
                n = len(data)
                if n > FILE_ABOVE:
                    name = self._write_file(cid, jid, s, data)
                    self._filed.add((cid, jid))
                    yield cid, jid, s, IN_FILE, name
                elif n <= step:
                    yield cid, jid, s, 0, data
                else:
                    for p, off in enumerate(range(0, n, step)):
                        yield cid, jid, s, p, data[off : off + step]
