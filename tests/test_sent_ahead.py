"""Jobs a node sends ahead to a busy job process (short jobs, one computation):
each starts as the one before ends, with no round trip to the daemon.  A job
waiting there has not started: it reads Created, a cancel drops it unrun, and
if its process dies first it runs elsewhere.  Real daemons and processes."""

from __future__ import annotations

import time

import pytest

import dispy
from dispy import DispyJob

from . import jobs

WAIT = 30


def _warm(cluster, folder) -> None:
    """Tiny jobs first: the node then knows this computation's jobs are short."""
    for i in range(30):
        cluster.submit(folder, f"warm{i}")
    assert cluster.wait(timeout=WAIT)


def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"not within {WAIT} s: {what}"
        time.sleep(0.01)


def test_a_job_sent_ahead_reads_created_until_it_starts_and_a_cancel_drops_it(
    node_factory, tmp_path
):
    node = node_factory(cpus=1)
    folder = str(tmp_path)
    with dispy.JobCluster(jobs.mark, nodes=[node.address], secret=node.secret) as cluster:
        _warm(cluster, folder)
        first = cluster.submit(folder, "first", 1.5)
        ahead = cluster.submit(folder, "ahead")
        after = cluster.submit(folder, "after", 0.01)
        _until(lambda: (tmp_path / "first").exists(), "the first job started")
        _until(lambda: first.status == DispyJob.Running, "the node said the first job started")
        assert ahead.status == after.status == DispyJob.Created  # waiting, not running
        assert cluster.cancel(ahead) == 0
        assert ahead(timeout=WAIT) is None and ahead.status == DispyJob.Cancelled
        assert first.status == DispyJob.Running  # (still: its end is seconds away)
        pid = first(timeout=WAIT)
        assert after(timeout=WAIT) == pid  # the same process: it was not stopped
        assert after.start_time >= first.end_time - 0.001  # (the node's clock, both)
        assert ahead.result is None and not (tmp_path / "ahead").exists()  # never ran


def test_jobs_sent_ahead_of_a_process_that_dies_run_on_its_replacement(node_factory, tmp_path):
    node = node_factory(cpus=1)
    folder = str(tmp_path)
    with dispy.JobCluster(jobs.mark, nodes=[node.address], secret=node.secret) as cluster:
        _warm(cluster, folder)
        dies = cluster.submit(folder, "dies", 0.5, True)
        rest = [cluster.submit(folder, f"rest{i}") for i in range(3)]
        assert dies(timeout=WAIT) is None
        assert dies.status == DispyJob.Terminated
        pids = {job(timeout=WAIT) for job in rest}
        assert [job.status for job in rest] == [DispyJob.Finished] * 3
        assert int((tmp_path / "dies").read_text()) not in pids


def test_a_job_sent_ahead_has_its_time_limit_from_its_start(node_factory, tmp_path):
    node = node_factory(cpus=1)
    folder = str(tmp_path)
    with dispy.JobCluster(jobs.mark, nodes=[node.address], secret=node.secret) as cluster:
        _warm(cluster, folder)
        first = cluster.submit(folder, "first", 1.0)
        # from its send, its limit would end 0.2 s into its run; from its start, after it
        limited = cluster.submit(folder, "limited", 0.6, dispy_job_timeout=1.2)
        first(timeout=WAIT)
        limited(timeout=WAIT)
        assert limited.status == DispyJob.Finished, limited.exception



@pytest.mark.parametrize("ahead", [False, True], ids=["submitted-after", "sent-ahead"])
def test_a_process_being_stopped_takes_no_new_job(node_factory, tmp_path, ahead):
    """A cancel stops a job's process (SIGTERM, SIGKILL 3 s later); a job that ends
    meanwhile (here it outlives the SIGTERM) must not leave its process to the
    next job, which the SIGKILL would end, whether that job came after or was
    sent ahead to the process: the next job runs in another process."""
    node = node_factory(cpus=1)
    folder = str(tmp_path)
    with dispy.JobCluster(
        jobs.outlives_sigterm, nodes=[node.address], secret=node.secret
    ) as cluster:
        if ahead:  # short jobs: the next one is sent to the stopped job's process
            for i in range(30):
                cluster.submit(folder, f"warm{i}", False)
            assert cluster.wait(timeout=WAIT)
        stopped = cluster.submit(folder, "stopped")
        _until(lambda: (tmp_path / "stopped").exists(), "the job blocked SIGTERM")
        _until(lambda: stopped.status == DispyJob.Running, "the node said the job started")
        if ahead:
            nxt = cluster.submit(folder, "next", False)
        cluster.cancel(stopped)
        if not ahead:
            assert stopped.finish.wait(WAIT)
            nxt = cluster.submit(folder, "next", False)
        assert nxt(timeout=WAIT) is not None, nxt.exception
        assert nxt.status == DispyJob.Finished
        assert int((tmp_path / "next").read_text()) != int((tmp_path / "stopped").read_text())
