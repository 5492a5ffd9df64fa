"""Fault tests: kill -9 of a node mid-job; a cancelled running job.

Each test says what it kills and what must survive: every submitted job
reaches exactly one end, and the cluster goes on with the nodes left.
"""

from __future__ import annotations

import os
import signal
import threading

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
        js = [cluster.submit(1.0) for _ in range(6)]
        assert js[0](timeout=30) == 1.0  # both nodes are set up and busy
        # the jobs sent ahead to a, not started there (a's running one may just end
        # before the kill): they cannot end on a
        on_a = [j for j in js if j.ip_addr == a.ip_addr and j.status == DispyJob.Created]
        _kill(a)
        for job in js:
            assert job(timeout=60) == 1.0
            assert job.status == DispyJob.Finished
        assert on_a, "no job was on the node killed"
        assert {j.ip_addr for j in on_a} == {b.ip_addr}  # they ran again, on b
        assert {j.ip_addr for j in js} <= {a.ip_addr, b.ip_addr}


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


def test_silent_node_is_declared_dead(node_factory):
    # freezes: one of two nodes (SIGSTOP: its connection stays open, it says nothing).
    # survives: the client notices within a few pulses; reentrant jobs run on the other
    # node, the frozen node's other jobs end Abandoned; exactly one end each.
    a = node_factory(cpus=1, secret="z")
    b = node_factory(cpus=1, secret="z")
    closed = threading.Event()

    def status(st, node, job):
        if st == dispy.DispyNode.Closed:
            closed.set()

    with dispy.JobCluster(
        jobs.sleep_for,
        nodes=[a.address, b.address],
        secret="z",
        reentrant=True,
        pulse_interval=0.2,
        cluster_status=status,
    ) as cluster:
        js = [cluster.submit(0.3) for _ in range(6)]
        assert js[0](timeout=30) == 0.3
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            assert closed.wait(30)  # declared dead (5 pulses of 0.2 s)
            for job in js:
                assert job(timeout=60) == 0.3 and job.status == DispyJob.Finished
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)


def test_silent_client_becomes_a_zombie(node_factory):
    # a client that authenticates and then says nothing: the node drops it after
    # --zombie_interval (0.01 min), and serves others.
    import socket

    from dispy.protocol import Connection, Kind, derive_key

    node = node_factory(cpus=1, secret="zz", extra_args=("--zombie_interval", "0.01"))
    with socket.create_connection((node.ip_addr, node.port), timeout=20) as s:
        conn = Connection("client", derive_key("zz"))
        while not conn.authenticated:
            conn.receive(s.recv(65536))
            for buf in conn.take_output():
                s.sendall(buf)
        conn.send(Kind.INFO_REQ, {"pulse": 0.2})
        for buf in conn.take_output():
            s.sendall(buf)
        while s.recv(65536):  # INFO, pulses..., then the node hangs up
            pass
    with dispy.JobCluster(jobs.double, nodes=[node.address], secret="zz") as cluster:
        assert cluster.submit(3)(timeout=30) == 6
