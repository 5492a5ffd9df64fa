"""The scheduler's durable state: what a ``kill -9`` and restart must not lose.

``scheduler.db`` (SQLite, WAL, mode 0600) in the scheduler's ``dest_path``:

* ``comps(cid, updated, meta)``: each client computation as the scheduler got
  it (name, spec, setup arguments, options, its files' names and modes,
  ``cluster.put`` data).  The files themselves are in ``dest_path/<cid>``.
* ``jobs(cid, jid, segs, opts)``: each job a client submitted, until the client
  acknowledged its result (``jid`` is the client's job id, which is also the
  job's id on the node: nothing needs mapping after a restart).
* ``results(cid, jid, created, entry, segs)``: results of computations whose
  client vanished (zombies), kept for ``recover_jobs`` until they expire.
* ``meta(key, value)``: the nodes the scheduler used (reconnected at restart).

Writes are queued and committed in batches by a writer thread
(``dispy.runtime.batch_writer.BatchWriter``) after ``WRITE_DELAY``: a job
acknowledged within it is never written.  A job lost that way (the scheduler
killed less than ``WRITE_DELAY`` after it came) is still known to its client,
which sends it again when it resumes; jobs running on nodes are found again by
asking the nodes (RESUME), and their results wait on the nodes' disks.
Computations are committed before the client is told they are set up.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time

from dispy.runtime import sqlite as _sqlite
from dispy.runtime.batch_writer import BatchWriter
from dispy.runtime.sqlite import StorageError

logger = logging.getLogger("dispyscheduler")

#: ``PRAGMA application_id`` of a scheduler state file ("dsSS").
APP_ID = 0x64735353
SCHEMA_VERSION = 1
WRITE_DELAY = 0.1
#: Results of zombie computations (and the computations) are kept this long.
DEFAULT_RETENTION_S = 7 * 86400.0

_SCHEMA = (
    "CREATE TABLE comps (cid TEXT PRIMARY KEY, updated REAL NOT NULL, meta BLOB NOT NULL)"
    " WITHOUT ROWID",
    "CREATE TABLE jobs (cid TEXT NOT NULL, jid INTEGER NOT NULL, segs BLOB NOT NULL,"
    " opts BLOB, PRIMARY KEY (cid, jid)) WITHOUT ROWID",
    "CREATE TABLE results (cid TEXT NOT NULL, jid INTEGER NOT NULL, created REAL NOT NULL,"
    " entry BLOB NOT NULL, segs BLOB NOT NULL, PRIMARY KEY (cid, jid)) WITHOUT ROWID",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",
)
_TABLES = {"comps", "jobs", "results", "meta"}


class StateError(StorageError):
    """The scheduler's state file cannot be used; the message says what to do."""


def _hint(path: str) -> str:
    return (
        f"remove {path} or start dispyscheduler with --clean (the computations and jobs "
        "it holds are then forgotten)"
    )


class SchedulerState:
    """Computations, jobs and zombie results on disk.  Writes never block; reads do."""

    def __init__(self, path: str, *, retention: float = DEFAULT_RETENTION_S) -> None:
        self.path = os.fspath(path)
        self.retention = retention
        conn = self._open(self.path)
        self._writer = BatchWriter(
            conn,
            self._apply,
            name="dispyscheduler-state-writer",
            what=f"scheduler state {self.path}",
            logger=logger,
            error_cls=StateError,
            delay=WRITE_DELAY,
        )

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        return _sqlite.open_checked(
            path, app_id=APP_ID, version=SCHEMA_VERSION, statements=_SCHEMA, tables=_TABLES,
            what="dispyscheduler state file", program="dispyscheduler", hint=_hint(path),
            error_cls=StateError,
        )  # fmt: skip

    # -- writes (queued) ------------------------------------------------------------------
    def save_comp(self, cid: str, meta: dict) -> None:
        self._writer.submit(("comp", cid, time.time(), _sqlite.pack(meta, f"computation {cid}")))

    def drop_comp(self, cid: str) -> None:
        """Forget a computation, its jobs and its kept results."""
        self._writer.submit(("drop", cid))

    def put_jobs(self, cid: str, jobs: list) -> None:
        """``jobs``: (jid, segments, options) of newly submitted jobs."""
        self._writer.submit_many(
            (("job", cid, jid, _sqlite.pack([bytes(s) for s in segs], "job arguments"),
              _sqlite.pack(opts, "job options") if opts else None), (cid, jid))
            for jid, segs, opts in jobs
        )  # fmt: skip

    def drop_jobs(self, cid: str, jids) -> list:
        """The client has these jobs' results: forget them (never written if still
        queued).  Returns the ids of those that may be on disk (deleted by a queued write)."""
        missed = [j for _, j in self._writer.cancel([(cid, j) for j in jids])]
        if missed:
            self._writer.submit(("unjob", cid, missed))
        return missed

    def put_result(self, cid: str, jid: int, entry: dict, segs) -> None:
        self._writer.submit(
            ("result", cid, jid, time.time(), _sqlite.pack(entry, "result entry"),
             _sqlite.pack([bytes(s) for s in segs], "result"))
        )  # fmt: skip

    def drop_results(self, cid: str, jids) -> None:
        self._writer.submit(("unresult", cid, list(jids)))

    def set_meta(self, key: str, value) -> None:
        self._writer.submit(("meta", key, _sqlite.pack(value, key)))

    def flush(self, timeout: float | None = None, hurry: bool = True) -> bool:
        return self._writer.flush(timeout, hurry)

    def close(self) -> None:
        self._writer.close(30)

    def _apply(self, conn: sqlite3.Connection, ops: list) -> None:
        for op in ops:
            kind = op[0]
            if kind == "job":
                conn.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?)", op[1:])
            elif kind == "unjob":
                conn.executemany(
                    "DELETE FROM jobs WHERE cid = ? AND jid = ?", [(op[1], j) for j in op[2]]
                )
            elif kind == "comp":
                conn.execute("INSERT OR REPLACE INTO comps VALUES (?, ?, ?)", op[1:])
            elif kind == "drop":
                for table in ("comps", "jobs", "results"):
                    conn.execute(f"DELETE FROM {table} WHERE cid = ?", (op[1],))
            elif kind == "result":
                conn.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", op[1:])
            elif kind == "unresult":
                conn.executemany(
                    "DELETE FROM results WHERE cid = ? AND jid = ?", [(op[1], j) for j in op[2]]
                )
            elif kind == "meta":
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", op[1:])

    # -- reads (blocking) -----------------------------------------------------------------
    def load(self) -> tuple[dict, dict, dict, dict]:
        """Everything committed: ``(comps, jobs, results, meta)``; expired entries are dropped.

        ``comps``: cid -> (updated, meta); ``jobs``: cid -> [(jid, segs, opts)];
        ``results``: cid -> {jid: (entry, segs)}; ``meta``: key -> value.
        """
        self.flush()
        cutoff = time.time() - self.retention

        def read(conn):
            comps = {
                cid: (updated, _sqlite.unpack(meta))
                for cid, updated, meta in conn.execute("SELECT cid, updated, meta FROM comps")
            }
            jobs: dict = {}
            for cid, jid, segs, opts in conn.execute(
                "SELECT cid, jid, segs, opts FROM jobs ORDER BY cid, jid"
            ):
                jobs.setdefault(cid, []).append(
                    (jid, _sqlite.unpack(segs), _sqlite.unpack(opts) if opts else None)
                )
            results: dict = {}
            for cid, jid, created, entry, segs in conn.execute(
                "SELECT cid, jid, created, entry, segs FROM results"
            ):
                if created >= cutoff:
                    results.setdefault(cid, {})[jid] = (_sqlite.unpack(entry), _sqlite.unpack(segs))
            meta = {k: _sqlite.unpack(v) for k, v in conn.execute("SELECT key, value FROM meta")}
            return comps, jobs, results, meta

        comps, jobs, results, meta = _sqlite.read_transaction(self.path, read)
        for cid, (updated, _meta) in list(comps.items()):
            if updated < cutoff:
                logger.info("computation %s: kept since %s, expired", cid, time.ctime(updated))
                del comps[cid]
                jobs.pop(cid, None)
                results.pop(cid, None)
                self.drop_comp(cid)
        return comps, jobs, results, meta
