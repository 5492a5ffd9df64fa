"""Recovery on loopback: a client killed with -9 while its jobs run, then
``dispy.recover_jobs()`` from a fresh process; late results never end a job
twice.  Partitions and node restarts: tests/test_recovery_netns.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

import dispy
from dispy import DispyJob
from dispy._recover_file import RecoverFile

from . import jobs

# A client that submits four jobs (ids 'a'..'d') and is then killed by the test.
CLIENT = r"""
import os, sys, time
import dispy

def compute(x, marks, seconds):
    import os, time
    open(os.path.join(marks, f"started-{x}"), "w").close()
    time.sleep(seconds)
    print("output of", x)
    return x * 10

addr, secret, path, marks = sys.argv[1:5]
cluster = dispy.JobCluster(compute, nodes=[addr], secret=secret, recover_file=path)
for i, (name, seconds) in enumerate([("a", 1.0), ("b", 1.0), ("c", 2.5), ("d", 2.5)]):
    job = cluster.submit(i, marks, seconds)
    job.id = name
print("submitted", flush=True)
time.sleep(600)  # killed by the test long before this ends
"""

RECOVER = r"""
import json, sys
import dispy
timeout = float(sys.argv[2]) if len(sys.argv) > 2 else None
terminate = len(sys.argv) > 3
jobs = dispy.recover_jobs(sys.argv[1], timeout=timeout, terminate_pending=terminate)
print(json.dumps([
    {"id": j.id, "status": j.status, "result": j.result, "stdout": j.stdout,
     "exception": j.exception}
    for j in sorted(jobs, key=lambda j: j.id)
]))
"""


def _wait_for(cond, timeout: float, what: str) -> None:
    """Poll a condition that another process makes true (files on disk), with a deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _recover(path, *args) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", RECOVER, path, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _crashed_client(node, tmp_path) -> tuple[str, str]:
    path, marks = str(tmp_path / "cluster.recover"), tmp_path / "marks"
    marks.mkdir()
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, node.address, node.secret, path, str(marks)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert client.stdout.readline().strip() == "submitted"
        _wait_for(lambda: len(os.listdir(marks)) == 4, 60, "all four jobs to start")

        def recorded() -> bool:
            with RecoverFile.open(path) as rf:
                return len(rf.unfinished()) == 4

        _wait_for(recorded, 30, "the recover file to hold the four jobs")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        client.kill()  # SIGKILL: no cleanup, no close
        client.wait(30)
        client.stdout.close()
    return path, str(marks)


def test_recover_jobs_after_client_killed(node_factory, tmp_path):
    node = node_factory(cpus=4, secret="recover-me")
    path, _ = _crashed_client(node, tmp_path)
    # 'a' and 'b' end while no client exists, 'c' and 'd' a little later
    out = _recover(path)
    assert [(j["id"], j["status"], j["result"]) for j in out] == [
        ("a", DispyJob.Finished, 0),
        ("b", DispyJob.Finished, 10),
        ("c", DispyJob.Finished, 20),
        ("d", DispyJob.Finished, 30),
    ]
    assert all(j["stdout"].startswith("output of") for j in out)
    with open(path, "rb") as f:
        assert b"recover-me" not in f.read()  # the secret itself is never stored
    assert _recover(path) == []  # a second run returns nothing twice
    # the computation was closed on the node: the node serves a new cluster as before
    with dispy.JobCluster(
        jobs.double, nodes=[node.address], secret=node.secret, recover_file=False
    ) as cluster:
        assert cluster.submit(4)() == 8


def test_recover_jobs_timeout_and_terminate(node_factory, tmp_path):
    node = node_factory(cpus=4, secret="recover-t")
    path, _ = _crashed_client(node, tmp_path)
    out = _recover(path, "0.1", "terminate")
    by_id = {j["id"]: j for j in out}
    assert set(by_id) == {"a", "b", "c", "d"}
    for name in "cd":  # still running after 0.1 s: cancelled there
        assert by_id[name]["status"] in (DispyJob.Cancelled, DispyJob.Terminated)
    assert _recover(path) == []


def test_recover_file_is_removed_by_a_normal_close(node, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cluster = dispy.JobCluster(jobs.double, nodes=[node.address], secret=node.secret)
    try:
        assert cluster.submit(1)() == 2
        assert os.path.exists(cluster.recover_file)
        assert os.path.dirname(cluster.recover_file) == str(tmp_path)
    finally:
        cluster.close()
    assert not os.path.exists(cluster.recover_file)


def test_recover_jobs_without_a_file_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(dispy.DispyError, match="no recover file"):
        dispy.recover_jobs()
    with pytest.raises(dispy.DispyError, match="recover_file="):
        dispy.recover_jobs(str(tmp_path / "missing"))


def test_late_result_from_dead_node_ends_job_once():
    """Scheduler rule behind 'exactly once': a result for a job already ended is
    refused; one for a job requeued but not yet run again ends it (and unqueues it)."""
    from dispy.core import jobstate
    from dispy.core.scheduler import Scheduler

    class J:
        def __init__(self, uid):
            self._uid, self._pinned, self._node, self.status = uid, None, None, jobstate.Created

    s = Scheduler(reentrant=True)
    s.add_node("a", 1)
    s.add_node("b", 1)
    j = J(1)
    s.submit(j)
    s.assign()
    assert j.status == jobstate.Running
    lost = s.remove_node(j._node)  # its node declared dead: requeued
    assert lost == [(j, jobstate.Created)] and list(s.pending) == [j]
    assert s.ended(j, jobstate.FINISH)  # the late result arrives first
    assert j.status == jobstate.Finished and not s.pending
    assert not s.ended(j, jobstate.FINISH)  # and never a second end
    assert not s.ended(j, jobstate.FAIL)
