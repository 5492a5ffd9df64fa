"""dispy's documented API, as behaviour: what a program written for dispy sees.

Each test states one thing dispy's documentation (../shared/seeds, dispy's
API reference they quote) promises and checks it on real daemons (loopback
nodes here; the documented programs themselves run in test_installed.py).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import dispy
from dispy import DispyJob, DispyNode

from . import jobs
from .test_api import nodes_ready


def _watching_status(events):
    """A cluster_status callback recording (status, job) in ``events``, and a
    condition to wait on."""
    cond = threading.Condition()

    def status_cb(status, node, job):
        with cond:
            events.append((status, job))
            cond.notify_all()

    return status_cb, cond


# -- status() and DispyNode ------------------------------------------------------------------


def test_status_is_a_cluster_status_namedtuple(node):
    status, ready = nodes_ready(1)
    with dispy.JobCluster(
        jobs.double, nodes=[node.address], secret=node.secret, cluster_status=status
    ) as cluster:
        assert ready.wait(30)
        st = cluster.status()
        assert isinstance(st, dispy.ClusterStatus)
        nodes, pending = st  # dispy programs unpack it
        assert st.nodes is nodes and st.jobs_pending == pending == 0
        (n,) = st.nodes
        assert isinstance(n, DispyNode)
        assert (n.ip_addr, n.cpus, n.avail_cpus, n.busy, n.jobs_done) == (node.ip_addr, 2, 2, 0, 0)
        for attr in ("name", "cpu_time", "update_time", "avail_info", "tx", "rx"):
            assert hasattr(n, attr), attr
        assert cluster.submit(3)(timeout=30) == 6
        assert cluster.status().nodes[0].jobs_done == 1


def test_logger_carries_the_level_names():
    assert dispy.logger.DEBUG == logging.DEBUG and dispy.logger.CRITICAL == logging.CRITICAL
    assert isinstance(dispy.logger, logging.Logger)


# -- when a job is Running ----------------------------------------------------------------------


def test_a_job_waiting_on_its_node_reads_created_until_a_cpu_is_free(node_factory):
    """On a 1-CPU node with a long job running, the next job (sent ahead to the
    node) is Created, not Running; it becomes Running once the first ends."""
    n = node_factory(cpus=1, secret="r")
    events: list = []
    status_cb, cond = _watching_status(events)
    with dispy.JobCluster(
        jobs.sleep_for, nodes=[n.address], secret="r", cluster_status=status_cb
    ) as cluster:
        first = cluster.submit(1.0)
        second = cluster.submit(0.1)
        with cond:
            assert cond.wait_for(lambda: (DispyJob.Running, first) in events, 30)
        assert second.status == DispyJob.Created
        assert cluster.status().nodes[0].busy == 1
        assert second(timeout=30) == 0.1
        order = [(st, j) for st, j in events if j in (first, second)]
        # the second was reported Running only after the first ended
        assert order.index((DispyJob.Running, second)) > order.index((DispyJob.Finished, first))
        assert second.start_time >= first.end_time  # the node's own times


def test_cancel_of_a_job_not_started_ends_it_at_once_and_it_never_runs(node_factory, tmp_path):
    n = node_factory(cpus=1, secret="c")
    marker = tmp_path / "ran"
    with dispy.JobCluster(jobs.pid_then_sleep, nodes=[n.address], secret="c") as cluster:
        blocker = cluster.submit(str(tmp_path / "blocker"), 1.0)
        waiting = cluster.submit(str(marker), 0)
        assert _poll(lambda: blocker.status == DispyJob.Running)
        assert waiting.status == DispyJob.Created
        assert cluster.cancel(waiting) == 0
        assert waiting(timeout=5) is None
        assert waiting.status == DispyJob.Cancelled
        assert "before it started" in waiting.exception
        assert blocker(timeout=30) == 1.0 or blocker.status == DispyJob.Finished
        after = cluster.submit(str(tmp_path / "after"), 0)  # the node ran on, in order
        assert after(timeout=30) is not None
    assert not marker.exists(), "the cancelled job ran"


def _poll(cond, timeout=30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)  # polling a job's status, with a deadline
    return cond()


# -- NodeAllocate and set_node_cpus limit what runs ------------------------------------------


class OneCpu(dispy.NodeAllocate):
    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        return 1


class NoCpu(dispy.NodeAllocate):
    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
        return 0


def _overlaps(js) -> int:
    """How many pairs of ``js`` ran at the same time (the node's start and end times)."""
    spans = sorted((j.start_time, j.end_time) for j in js)
    return sum(1 for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1])


def test_allocate_returning_one_cpu_runs_one_job_at_a_time(node_factory):
    n = node_factory(cpus=2, secret="a")
    with dispy.JobCluster(
        jobs.sleep_for, nodes=[OneCpu(n.ip_addr, port=n.port)], secret="a"
    ) as cluster:
        js = [cluster.submit(0.3) for _ in range(4)]
        assert [j(timeout=60) for j in js] == [0.3] * 4
        assert cluster.status().nodes[0].cpus == 1
    assert _overlaps(js) == 0


def test_unlimited_node_runs_its_cpus_at_once(node_factory):
    """The same check can see overlap: without the allocation, 2 CPUs run 2 at once."""
    n = node_factory(cpus=2, secret="a")
    with dispy.JobCluster(jobs.sleep_for, nodes=[n.address], secret="a") as cluster:
        js = [cluster.submit(0.3) for _ in range(4)]
        assert [j(timeout=60) for j in js] == [0.3] * 4
    assert _overlaps(js) >= 1


def test_set_node_cpus_limits_what_runs(node_factory):
    n = node_factory(cpus=2, secret="s")
    status, ready = nodes_ready(1)
    with dispy.JobCluster(
        jobs.sleep_for, nodes=[n.address], secret="s", cluster_status=status
    ) as cluster:
        assert ready.wait(30)
        assert cluster.set_node_cpus(n.address, 1) == 1
        js = [cluster.submit(0.3) for _ in range(4)]
        assert [j(timeout=60) for j in js] == [0.3] * 4
    assert _overlaps(js) == 0


def test_allocate_returning_zero_leaves_the_node_out(node_factory):
    used, unused = node_factory(cpus=1, secret="z"), node_factory(cpus=1, secret="z")
    with dispy.JobCluster(
        jobs.double,
        nodes=[dispy.NodeAllocate(used.ip_addr, port=used.port), NoCpu(unused.ip_addr, port=unused.port)],
        secret="z",
    ) as cluster:
        js = [cluster.submit(i) for i in range(6)]
        assert [j(timeout=60) for j in js] == [2 * i for i in range(6)]
        assert {j.ip_addr for j in js} == {used.ip_addr}
        assert [nd.ip_addr for nd in cluster.status().nodes] == [used.ip_addr]


# -- a failed job's traceback names the user's file ----------------------------------------------

PROGRAM = """
def compute(n):
    x = n + 1
    raise ValueError('boom %s' % x)

if __name__ == '__main__':
    import os, dispy
    cluster = dispy.JobCluster(compute, nodes=[os.environ['NODE']], secret=os.environ['SECRET'])
    job = cluster.submit(1)
    job()
    print(job.status)
    print(job.exception)
    cluster.close()
"""


def test_traceback_of_a_failed_job_names_the_programs_file(node, tmp_path):
    prog = tmp_path / "my_program.py"
    prog.write_text(PROGRAM)
    env = dict(os.environ, NODE=node.address, SECRET=node.secret)
    proc = subprocess.run(
        [sys.executable, str(prog)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == str(DispyJob.Terminated)
    assert f'File "{prog}", line 4, in compute' in proc.stdout, proc.stdout
    assert "<dynamic-code>" not in proc.stdout
    assert "ValueError: boom 2" in proc.stdout
