"""Unit tests of the node's durable result store (``dispynode.store.ResultStore``).

Every store lives under pytest's ``tmp_path``.  Where a test must know that
the writer thread has not taken a queued write yet, it holds the writer's
lock (``store._writer._cond``, reentrant) while queueing: the writer cannot
take a batch meanwhile, so the test does not depend on timing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from dispy.runtime import sqlite as _sqlite
from dispynode.store import (
    APP_ID,
    DEFAULT_RETENTION_S,
    FILE_ABOVE,
    SCHEMA_VERSION,
    ResultStore,
    StoreError,
)

MB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAIT_S = 10.0


@pytest.fixture
def store_path(tmp_path) -> str:
    return str(tmp_path / "results.db")


@pytest.fixture
def store(store_path):
    s = ResultStore(store_path)
    yield s
    s.close()


def info(jid: int) -> dict:
    return {"status": 5, "start": 1.5, "end": 2.5 + jid, "host": "n1", "exc": None}


# -- round trips --------------------------------------------------------------------------
def test_put_pending_ack_round_trip(store):
    big = os.urandom(50 * MB)
    arr = np.arange(1000, dtype="f8").reshape(10, 100)
    store.put("c1", 1, info(1), [b"head", big])
    store.put("c1", 2, {"k": b"\x00\xff", 3: [1, 2.5, None, True]}, [arr])
    store.put("c1", 3, info(3), [])
    store.put("c2", 1, info(1), [b"other"])
    assert store.flush(WAIT_S)

    got = store.pending("c1")
    assert [jid for jid, _, _ in got] == [1, 2, 3]
    jid, inf, segs = got[0]
    assert inf == info(1)
    assert [bytes(s) for s in segs] == [b"head", big]
    assert type(segs[0]) is bytes  # a blob; the 50 MB segment is its file, mapped
    assert got[1][1] == {"k": b"\x00\xff", 3: [1, 2.5, None, True]}
    assert np.array_equal(np.frombuffer(got[1][2][0], dtype="f8").reshape(10, 100), arr)
    assert got[2][2] == []
    assert store.pending_cids() == {"c1": 3, "c2": 1}

    store.ack("c1", [1, 3])
    assert store.flush(WAIT_S)
    assert [jid for jid, _, _ in store.pending("c1")] == [2]
    assert store.pending_cids() == {"c1": 1, "c2": 1}
    assert store.pending("nope") == []


def test_numpy_buffers_keep_their_memory_layout(store):
    """C- and Fortran-ordered arrays are stored as laid out; a strided view is copied."""
    a = np.arange(12, dtype="i4").reshape(3, 4)
    f = np.asfortranarray(a)
    strided = a[:, ::2]
    store.put("c", 1, {}, [a, f, memoryview(f), strided, np.float64(2.5)])
    store.flush(WAIT_S)
    ((_, _, segs),) = store.pending("c")
    assert segs[0] == a.tobytes(order="C")
    assert segs[1] == f.tobytes(order="A") == a.tobytes(order="F")
    assert segs[2] == segs[1]
    assert segs[3] == strided.tobytes()
    assert segs[4] == np.float64(2.5).tobytes()


def test_a_later_put_replaces_the_result(store):
    store.CHUNK_BYTES = 1000  # segments above 1000 bytes are split in parts
    long = os.urandom(2500)
    store.put("c", 7, {"v": 1}, [long, b"x" * 1000, b""])
    store.flush(WAIT_S)
    assert store.pending("c") == [(7, {"v": 1}, [long, b"x" * 1000, b""])]
    store.put("c", 7, {"v": 2}, [b"short"])  # fewer segments and parts than before
    store.flush(WAIT_S)
    assert store.pending("c") == [(7, {"v": 2}, [b"short"])]
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        assert conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 1
    conn.close()


def test_reopen_keeps_results(store_path):
    with ResultStore(store_path) as s:
        s.put("c1", 1, info(1), [b"a" * 100])
    with ResultStore(store_path) as s:
        assert s.pending("c1") == [(1, info(1), [b"a" * 100])]
        assert s.pending_cids() == {"c1": 1}


def test_store_with_the_old_computations_table_opens(store_path):
    """Stores written before the unused computations table was dropped still open."""
    with ResultStore(store_path) as s:
        s.put("c1", 1, info(1), [b"a"])
    with contextlib.closing(sqlite3.connect(store_path)) as conn, conn:
        conn.execute(
            "CREATE TABLE computations (cid TEXT PRIMARY KEY, updated REAL NOT NULL, "
            "meta BLOB NOT NULL) WITHOUT ROWID"
        )
    with ResultStore(store_path) as s:
        assert s.pending("c1") == [(1, info(1), [b"a"])]
        assert s.expire(now=time.time() + 10 * DEFAULT_RETENTION_S) == 1


# -- batching and cancelling --------------------------------------------------------------
def test_ack_before_the_writer_takes_the_put_never_writes_it(store):
    payload = os.urandom(50 * MB)
    with store._writer._cond:  # the writer cannot take a batch until released
        store.put("c", 1, info(1), [payload])
        store.put("c", 2, info(2), [b"kept"])
        store.ack("c", [1])
    assert store.flush(WAIT_S)
    assert store.stats["cancelled"] == 1
    assert [jid for jid, _, _ in store.pending("c")] == [2]
    written = sum(os.path.getsize(f) for f in _sqlite.db_files(store.path) if os.path.exists(f))
    assert written < 5 * MB, f"{written} bytes on disk: the acked 50 MB result was written"


def test_ack_after_the_commit_deletes(store):
    store.put("c", 1, info(1), [b"x"])
    store.flush(WAIT_S)
    store.ack("c", [1, 99])  # 99 was never put: ignored
    store.flush(WAIT_S)
    assert store.pending("c") == []
    assert store.stats["cancelled"] == 0


def test_everything_queued_at_once_is_one_commit(store):
    with store._writer._cond:
        for jid in range(1000):
            store.put("c", jid, info(jid), [b"p" * 100])
        store.ack("c", range(0, 1000, 2))
    assert store.flush(WAIT_S)
    st = store.stats
    assert st["commits"] == 1
    assert st["cancelled"] == 500
    assert st["queued"] == 0
    assert store.pending_cids() == {"c": 500}


def test_10000_tiny_puts_then_flush(store, capsys):
    payload = os.urandom(100)
    t0 = time.perf_counter()
    for jid in range(10_000):
        store.put("c", jid, info(jid), [payload])
    queued = time.perf_counter() - t0
    assert store.flush(WAIT_S)
    total = time.perf_counter() - t0
    st = store.stats
    with capsys.disabled():
        print(
            f"\n10,000 puts: queued in {queued * 1e3:.0f} ms, committed in {total * 1e3:.0f} ms "
            f"({10_000 / total:,.0f}/s) in {st['commits']} commits"
        )
    assert st["commits"] < 1000  # batched: far fewer commits than results
    assert store.pending_cids() == {"c": 10_000}


def test_reads_run_concurrently_with_writes(store):
    """A worker thread reads consistent snapshots while the event-loop side keeps putting."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                for jid, inf, segs in store.pending("c"):
                    assert inf == info(jid) and segs == [jid.to_bytes(4, "big")]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for jid in range(3000):
            store.put("c", jid, info(jid), [jid.to_bytes(4, "big")])
            if jid % 500 == 499:
                store.flush(WAIT_S)
    finally:
        stop.set()
        t.join(WAIT_S)
    assert not errors, errors
    store.flush(WAIT_S)
    assert store.pending_cids() == {"c": 3000}


# -- large segments in files -------------------------------------------------------------
def _files(store_path) -> list[str]:
    return sorted(os.listdir(store_path + ".files"))


def test_large_segments_go_to_files_not_sqlite(store_path):
    big = np.arange(FILE_ABOVE // 8 + 1000, dtype=np.float64)  # just over FILE_ABOVE
    with ResultStore(store_path) as s:
        s.put("c", 1, info(1), [b"head", big, b"tail"])
        s.put("c", 2, info(2), [b"small"])
        assert s.flush(WAIT_S)
        assert len(_files(store_path)) == 1
        with contextlib.closing(sqlite3.connect(store_path)) as conn:
            sizes = conn.execute("SELECT max(length(data)) FROM chunks").fetchone()[0]
        assert sizes < 100  # the big segment is not a blob: its row names its file
        got = s.pending("c")
        assert [(j, i) for j, i, _ in got] == [(1, info(1)), (2, info(2))]
        head, middle, tail = got[0][2]
        assert (bytes(head), bytes(tail)) == (b"head", b"tail")
        assert np.array_equal(np.frombuffer(middle, dtype=np.float64), big)
        # a put of the same job replaces the file's content
        s.put("c", 1, info(1), [big[::-1].copy()])
        assert s.flush(WAIT_S)
        assert len(_files(store_path)) == 1
    with ResultStore(store_path) as s:  # and it survives a reopen
        (seg,) = s.pending("c")[0][2]
        assert np.array_equal(np.frombuffer(seg, dtype=np.float64), big[::-1])
        del seg
        s.ack("c", [1])
        assert s.flush(WAIT_S)
        assert _files(store_path) == [] and s.pending_cids() == {"c": 1}
        s.put("old", 1, {}, [big])
        assert s.flush(WAIT_S) and len(_files(store_path)) == 1
        assert s.expire(time.time() + 10 * DEFAULT_RETENTION_S) == 2
        assert _files(store_path) == []
    ResultStore.remove(store_path)
    assert not os.path.exists(store_path + ".files")


def test_segment_files_no_row_names_are_removed_at_open(store_path):
    with ResultStore(store_path) as s:
        s.put("c", 1, {}, [bytes(FILE_ABOVE + 1)])
    stray = os.path.join(store_path + ".files", "0" * 32)  # a crash before its commit
    with open(stray, "wb") as f:
        f.write(b"x")
    with ResultStore(store_path) as s:
        assert len(_files(store_path)) == 1 and not os.path.exists(stray)
        assert len(s.pending("c")[0][2][0]) == FILE_ABOVE + 1


def test_a_missing_segment_file_skips_that_result(store_path, caplog):
    with ResultStore(store_path) as s:
        s.put("c", 1, {}, [bytes(FILE_ABOVE + 1)])
        s.put("c", 2, {}, [b"ok"])
        assert s.flush(WAIT_S)
        os.unlink(os.path.join(store_path + ".files", _files(store_path)[0]))
        with caplog.at_level(logging.ERROR, logger="dispynode"):
            assert [j for j, _, _ in s.pending("c")] == [2]
        assert "has 0 of its 1 segments" in caplog.text


# -- durability ---------------------------------------------------------------------------
def test_flushed_results_survive_kill_9(store_path):
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        from dispynode.store import ResultStore
        s = ResultStore({store_path!r})
        for jid in range(100):
            s.put("c", jid, {{"jid": jid}}, [b"r" * jid, bytes([jid])])
        s.put("c", 100, {{"jid": 100}}, [b"B" * ({FILE_ABOVE} + 1)])  # in a file
        assert s.flush(10)
        print("flushed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == "flushed"
    assert os.path.exists(store_path + "-wal")  # not closed: the commits are in the WAL
    with ResultStore(store_path) as s:
        got = s.pending("c")
        jid, inf, (big,) = got.pop()
        assert (jid, inf, bytes(big)) == (100, {"jid": 100}, b"B" * (FILE_ABOVE + 1))
        del big
        assert [(jid, inf, segs) for jid, inf, segs in got] == [
            (jid, {"jid": jid}, [b"r" * jid, bytes([jid])]) for jid in range(100)
        ]


# -- expiry -------------------------------------------------------------------------------
def test_expire_deletes_old_results(store_path):
    with ResultStore(store_path, retention=100.0) as s:
        s.put("old", 1, {}, [b"x" * 10])
        s.put("old", 2, {}, [b"y"])
        s.flush(WAIT_S)
        now = time.time()
        assert s.expire(now) == 0
        s.put("new", 1, {}, [b"z"])  # put at now + ~0
        s.flush(WAIT_S)
        with (
            contextlib.closing(sqlite3.connect(store_path)) as conn,
            conn,
        ):  # age the first two rows
            conn.execute("UPDATE results SET created = created - 1000 WHERE cid = 'old'")
        conn.close()
        assert s.expire(now) == 2
        assert s.pending_cids() == {"new": 1}
        assert s.expire(now + 1000) == 1
        assert s.pending_cids() == {}
        with contextlib.closing(sqlite3.connect(store_path)) as conn, conn:
            assert conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
        conn.close()


def test_retention_must_be_positive(store_path):
    with pytest.raises(ValueError, match="retention"):
        ResultStore(store_path, retention=0)


# -- files --------------------------------------------------------------------------------
def test_files_are_private(store_path):
    old = os.umask(0)
    try:
        with ResultStore(store_path) as s:
            s.put("c", 1, {}, [b"x"])
            s.flush(WAIT_S)
            for name in _sqlite.db_files(store_path):
                assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name
    finally:
        os.umask(old)


def test_schema_version_and_application_id(store):
    store.flush(WAIT_S)
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APP_ID
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_remove_deletes_the_files(store_path):
    s = ResultStore(store_path)
    s.put("c", 1, {}, [b"x"])
    s.flush(WAIT_S)
    assert os.path.exists(store_path + "-wal")
    s.close()
    ResultStore.remove(store_path)
    assert not any(os.path.exists(f) for f in _sqlite.db_files(store_path))
    ResultStore.remove(store_path)  # nothing there: fine


@pytest.mark.parametrize(
    "content",
    [b"this is not a database\n" * 50, b"SQLite format 3\x00" + b"\xff" * 4000],
    ids=["text", "garbage-after-header"],
)
def test_corrupt_file_is_refused_with_advice(store_path, content):
    with open(store_path, "wb") as f:
        f.write(content)
    with pytest.raises(StoreError) as err:
        ResultStore(store_path)
    msg = str(err.value)
    assert store_path in msg and "--clean" in msg and "remove it" in msg


def test_other_sqlite_database_is_refused(store_path):
    conn = sqlite3.connect(store_path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a dispynode result store.*--clean"):
        ResultStore(store_path)


def test_newer_layout_is_refused(store_path):
    ResultStore(store_path).close()
    conn = sqlite3.connect(store_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer dispynode.*--clean"):
        ResultStore(store_path)


def test_stale_wal_of_an_empty_file_is_not_replayed(store_path):
    """SQLite drops the WAL of a 0-byte database file: a new store starts empty."""
    with ResultStore(store_path) as s:
        s.put("c", 1, {}, [b"old"])
        s.flush(WAIT_S)
        # a copy of the WAL while the store is open: what a crash leaves
        with open(store_path + "-wal", "rb") as f:
            wal = f.read()
    open(store_path, "wb").close()  # the database emptied (not by us), its WAL left
    with open(store_path + "-wal", "wb") as f:
        f.write(wal)
    with ResultStore(store_path) as s:
        assert s.pending_cids() == {}


# -- misuse and failures ------------------------------------------------------------------
def test_bad_arguments_say_what_is_wrong(store):
    with pytest.raises(TypeError, match="result info of job 1 of computation c cannot be stored"):
        store.put("c", 1, {"f": object()}, [])
    with pytest.raises(TypeError, match="must be bytes-like"):
        store.put("c", 1, {}, ["text"])
    store.flush(WAIT_S)
    assert store.pending_cids() == {}


def test_closed_store_refuses_writes_and_close_is_idempotent(store_path):
    s = ResultStore(store_path)
    s.put("c", 1, {}, [b"x"])
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.put("c", 2, {}, [b"y"])
    with pytest.raises(StoreError, match="closed"):
        s.ack("c", [1])
    with ResultStore(store_path) as s2:  # close committed the queued put
        assert s2.pending_cids() == {"c": 1}


def test_writer_failure_is_logged_raised_and_retried(store_path, monkeypatch, caplog):
    monkeypatch.setattr(_sqlite, "RETRY_FIRST_S", 0.05)
    s = ResultStore(store_path)
    try:
        real_apply = s._writer._apply
        broken = threading.Event()
        broken.set()

        def apply(conn, ops):
            if broken.is_set():
                raise sqlite3.OperationalError("database or disk is full")
            real_apply(conn, ops)

        s._writer._apply = apply
        caplog.set_level(logging.ERROR, logger="dispynode")
        s.put("c", 1, info(1), [b"first"])
        with pytest.raises(StoreError) as err:
            s.flush(WAIT_S)
        assert "disk is full" in str(err.value) and store_path in str(err.value)
        assert any("disk is full" in r.getMessage() for r in caplog.records)
        with pytest.raises(StoreError, match="disk is full"):
            s.put("c", 2, info(2), [b"refused"])  # not queued
        broken.clear()  # space freed: the kept write goes through
        assert s.flush(WAIT_S)
        s.put("c", 3, info(3), [b"third"])
        assert s.flush(WAIT_S)
        assert [(j, segs) for j, _, segs in s.pending("c")] == [(1, [b"first"]), (3, [b"third"])]
        assert s.stats["failed_commits"] >= 1
    finally:
        s.close()


def test_expire_runs_after_queued_writes(store):
    """expire() runs in the writer thread after what was queued before it."""
    store.put("c", 1, {}, [b"x"])  # not flushed
    assert store.expire(time.time() + store.retention + 10) == 1
    assert store.pending_cids() == {}


class _Boom(BaseException):
    """Not an Exception: escapes the writer's commit handling, like a bug would."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_writer_thread_is_reported(store, caplog):
    def apply(conn, ops):
        raise _Boom("bug")

    store._writer._apply = apply
    caplog.set_level(logging.ERROR, logger="dispynode")
    store.put("c", 1, {}, [b"x"])
    with pytest.raises(StoreError, match="closed before all writes were committed"):
        store.flush(WAIT_S)
    assert any("writer thread failed" in r.getMessage() for r in caplog.records)
    with pytest.raises(StoreError, match="writer thread .* stopped on an error"):
        store.put("c", 2, {}, [b"y"])


# -- writes that can never succeed (found by fuzzing, #18) --------------------------------
def test_two_puts_of_one_job_in_one_batch_keep_the_last(store_path):
    """A job id sent twice in one JOBS frame made two puts in one batch: the chunks'
    UNIQUE constraint failed and the store retried that batch for ever."""
    with ResultStore(store_path) as s:
        s._writer._delay = 10.0  # both puts in one batch
        s.put("c", 1, info(1), [b"first"])
        s.put("c", 1, info(1), [b"second"])
        assert s.flush(WAIT_S)
        assert s.pending("c") == [(1, info(1), [b"second"])]


def test_a_write_sqlite_cannot_store_is_dropped_not_retried_for_ever(store_path, caplog):
    """A job id of 2**63 cannot be stored: its write is dropped (logged) and the
    writes around it, before and after, are kept (they were retried for ever)."""
    with ResultStore(store_path) as s, caplog.at_level(logging.ERROR):
        s.put("c", 1, info(1), [b"ok"])
        s.put("c", 1 << 63, info(2), [b"too big"])
        assert s.flush(WAIT_S)
        s.put("c", 3, info(3), [b"later"])
        assert s.flush(WAIT_S)
        assert [jid for jid, _, _ in s.pending("c")] == [1, 3]
        assert s._writer.stats["dropped"] == 1
    assert any("can never succeed" in r.getMessage() for r in caplog.records)
