"""Unit tests of the client's recover file (``dispy._recover_file.RecoverFile``).

Every file lives under pytest's ``tmp_path``.  Where a test must know that
the writer thread has not taken a queued write yet, it holds the writer's
lock (``rf._writer._cond``, reentrant) while queueing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest

from dispy._recover_file import APP_ID, RecoverFile, RecoverFileError
from dispy.runtime import sqlite as _sqlite
from dispynode.store import ResultStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAIT_S = 10.0

META = {
    "cid": "6f1c2a",
    "name": "compute",
    "key": bytes(range(32)),  # a derived key: bytes must come back as bytes
    "nodes": [["10.0.0.5", 51348], ["10.0.0.6", 51348]],
    "created": 1_700_000_000.5,
}


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "cluster.recover")


def mode(name: str) -> int:
    return stat.S_IMODE(os.stat(name).st_mode)


# -- creating -----------------------------------------------------------------------------
def test_created_private_with_meta_round_trip(path):
    old = os.umask(0)  # even with a permissive umask
    try:
        rf = RecoverFile.create(path, META)
        try:
            assert mode(path) == 0o600
            rf.add_jobs([(1, b"job")])
            rf.flush(WAIT_S)
            for name in _sqlite.db_files(path):
                assert mode(name) == 0o600, name
            assert rf.meta == META
        finally:
            rf.close()
    finally:
        os.umask(old)
    with RecoverFile.open(path) as rf:
        meta = rf.meta
        assert meta == META
        assert type(meta["key"]) is bytes
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            assert conn.execute("PRAGMA application_id").fetchone()[0] == APP_ID
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


def test_set_meta_is_kept(path):
    with RecoverFile.create(path, META) as rf:
        rf.set_meta("nodes", [["10.0.0.7", 51348]])
        assert rf.meta["nodes"] == [["10.0.0.7", 51348]]
        meta = rf.meta
        meta["name"] = "changed"  # a copy
        assert rf.meta["name"] == "compute"
    with RecoverFile.open(path) as rf:
        assert rf.meta == {**META, "nodes": [["10.0.0.7", 51348]]}


def test_create_replaces_only_a_recover_file(path, tmp_path):
    with RecoverFile.create(path, META) as rf:
        rf.add_jobs([(1, b"old job")])
    with RecoverFile.create(path, {"cid": "new"}) as rf:
        assert rf.meta == {"cid": "new"}
        assert rf.unfinished() == []

    other = str(tmp_path / "notes.txt")
    with open(other, "w") as f:
        f.write("precious\n")
    with pytest.raises(RecoverFileError, match="is not a dispy recover file: not replacing it"):
        RecoverFile.create(other, META)
    with open(other) as f:
        assert f.read() == "precious\n"

    store = str(tmp_path / "results.db")  # an SQLite file, but not a recover file
    ResultStore(store).close()
    with pytest.raises(RecoverFileError, match="not a dispy recover file"):
        RecoverFile.create(store, META)


def test_create_refuses_bad_meta(path):
    with pytest.raises(TypeError, match=r"meta\['f'\] cannot be stored"):
        RecoverFile.create(path, {"f": object()})
    assert not os.path.exists(path)


def test_create_in_a_missing_folder(tmp_path):
    where = str(tmp_path / "no" / "such" / "dir" / "x.recover")
    with pytest.raises(RecoverFileError, match="cannot create recover file"):
        RecoverFile.create(where, META)


# -- opening ------------------------------------------------------------------------------
def test_missing_file_message(path):
    with pytest.raises(RecoverFileError) as err:
        RecoverFile.open(path)
    assert str(err.value) == (
        f"no recover file at {path}: pass recover_file= the path the cluster used"
    )


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o620, 0o660])
def test_group_or_other_access_is_refused(path, bad_mode):
    RecoverFile.create(path, META).close()
    os.chmod(path, bad_mode)
    with pytest.raises(RecoverFileError) as err:
        RecoverFile.open(path)
    msg = str(err.value)
    assert f"chmod 600 {path}" in msg and f"{bad_mode:04o}" in msg
    os.chmod(path, 0o600)  # as the message says
    with RecoverFile.open(path) as rf:
        assert rf.meta == META


def test_not_a_recover_file_is_refused(path, tmp_path):
    with open(path, "wb") as f:
        f.write(b"hello")
    os.chmod(path, 0o600)
    with pytest.raises(RecoverFileError, match="is not a dispy recover file"):
        RecoverFile.open(path)
    with pytest.raises(RecoverFileError, match="not a regular file"):
        RecoverFile.open(str(tmp_path))


# -- jobs ---------------------------------------------------------------------------------
def test_jobs_round_trip(path):
    with RecoverFile.create(path, META) as rf:
        rf.add_jobs([(uid, b"args %d" % uid) for uid in range(1, 6)])
        rf.jobs_done([1, 3])
        rf.add_jobs([(6, bytearray(b"ba")), (7, memoryview(b"mv"))])
        assert rf.flush(WAIT_S)
        expected = [(2, b"args 2"), (4, b"args 4"), (5, b"args 5"), (6, b"ba"), (7, b"mv")]
        assert rf.unfinished() == expected
    with RecoverFile.open(path) as rf:
        assert rf.unfinished() == expected
        rf.jobs_done([2, 4, 5, 6, 7])
        rf.flush(WAIT_S)
        assert rf.unfinished() == []


def test_job_done_before_it_is_written_is_never_written(path):
    with RecoverFile.create(path, META) as rf:
        with rf._writer._cond:  # the writer cannot take a batch until released
            rf.add_jobs([(1, b"a" * 1000), (2, b"b")])
            rf.jobs_done([1])
        assert rf.flush(WAIT_S)
        st = rf.stats
        assert st["cancelled"] == 1 and st["commits"] == 1
        assert rf.unfinished() == [(2, b"b")]


def test_blob_must_be_bytes_like(path):
    with RecoverFile.create(path, META) as rf:
        with pytest.raises(TypeError, match="job 3: the blob to record must be bytes-like"):
            rf.add_jobs([(3, "text")])


def test_unfinished_jobs_survive_kill_9(path):
    code = textwrap.dedent(
        f"""
        import os, signal
        from dispy._recover_file import RecoverFile
        rf = RecoverFile.create({path!r}, {{"cid": "c1", "key": b"k" * 32}})
        rf.add_jobs([(uid, b"job %d" % uid) for uid in range(100)])
        rf.jobs_done(range(0, 100, 2))
        rf.set_meta("nodes", ["n1"])
        assert rf.flush(10)
        print("flushed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == "flushed"
    with RecoverFile.open(path) as rf:
        assert rf.meta == {"cid": "c1", "key": b"k" * 32, "nodes": ["n1"]}
        assert rf.unfinished() == [(uid, b"job %d" % uid) for uid in range(1, 100, 2)]


# -- closing ------------------------------------------------------------------------------
def test_close_remove_and_idempotent(path):
    rf = RecoverFile.create(path, META)
    rf.add_jobs([(1, b"x")])
    rf.close()
    rf.close()
    with pytest.raises(RecoverFileError, match="closed"):
        rf.add_jobs([(2, b"y")])
    rf = RecoverFile.open(path)
    assert rf.unfinished() == [(1, b"x")]  # close committed the queued add
    rf.close(remove=True)
    assert not any(os.path.exists(f) for f in _sqlite.db_files(path))


def test_failing_writes_are_raised_then_retried(path, monkeypatch):
    monkeypatch.setattr(_sqlite, "RETRY_FIRST_S", 0.05)
    with RecoverFile.create(path, META) as rf:
        real_apply = rf._writer._apply
        full = [True]

        def apply(conn, ops):
            if full[0]:
                raise sqlite3.OperationalError("database or disk is full")
            real_apply(conn, ops)

        rf._writer._apply = apply
        rf.add_jobs([(1, b"a")])
        with pytest.raises(RecoverFileError, match=f"cannot write to recover file {path}"):
            rf.flush(WAIT_S)
        with pytest.raises(RecoverFileError, match="disk is full"):
            rf.add_jobs([(2, b"b")])
        full[0] = False
        assert rf.flush(WAIT_S)
        assert rf.unfinished() == [(1, b"a")]
