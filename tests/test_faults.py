"""Fault tests: kill -9 of a node mid-job; a cancelled running job.

Each test says what it kills and what must survive: every submitted job
reaches exactly one end, and the cluster goes on with the nodes left.
"""

from __future__ import annotations

import os
import signal

import dispy
from dispy import DispyJob

from . import jobs


def _kill(node: dispy.LocalNode) -> None:
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(30)


def test_killed_node_abandons_non_reentrant_jobs(node_factory):
    # kills: the only node, while its jobs run. survives: every job ends once, as Abandoned.
    node = node_factory(cpus=3, secret="k")
    ended = []
    with dispy.JobCluster(
        jobs.sleep_for, nodes=[node.address], secret="k", callback=ended.append
    ) as cluster:
        js = [cluster.submit(30) for _ in range(2)]
        # the probe runs on the third CPU: both long jobs are running now; kill the node
        assert cluster.submit(0)(timeout=30) == 0
        _kill(node)
        for job in js:
            assert job(timeout=30) is None
            assert job.status == DispyJob.Abandoned
            assert "lost while running" in job.exception
        assert cluster.wait(timeout=30)
        cluster.close(terminate=True)
    assert sorted(id(j) for j in ended if j in js) == sorted(id(j) for j in js)


def test_killed_node_reentrant_jobs_run_elsewhere(node_factory):
    # kills: one of two nodes mid-job. survives: reentrant jobs finish on the other node.
    a = node_factory(cpus=1, secret="r")
    b = node_factory(cpus=1, secret="r")
    with dispy.JobCluster(
        jobs.sleep_for, nodes=[a.address, b.address], secret="r", reentrant=True
    ) as cluster:
        js = [cluster.submit(0.3) for _ in range(6)]
        assert js[0](timeout=30) == 0.3  # both nodes are set up and busy
        _kill(a)
        for job in js:
            assert job(timeout=60) == 0.3
            assert job.status == DispyJob.Finished
        ports = {j.ip_addr for j in js}
        assert ports == {"127.0.0.1"}


def test_cancel_running_job(node):
    # terminates: a running job's process. survives: the node, which runs the next job.
    with dispy.JobCluster(jobs.sleep_for, nodes=[node.address], secret=node.secret) as cluster:
        job = cluster.submit(60)
        probe = cluster.submit(0)
        assert probe(timeout=30) == 0  # the long job is running now
        assert cluster.cancel(job) == 0
        assert job(timeout=30) is None
        assert job.status == DispyJob.Cancelled
        assert cluster.submit(0.01)(timeout=30) == 0.01
