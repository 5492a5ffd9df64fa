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

import pytest

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
        nodes=[
            dispy.NodeAllocate(used.ip_addr, port=used.port),
            NoCpu(unused.ip_addr, port=unused.port),
        ],
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


# -- DispyJob: id, finish; a program's output -----------------------------------------------------


def test_job_id_is_a_unique_increasing_number_unless_set(node):
    with dispy.JobCluster(jobs.double, nodes=[node.address], secret=node.secret) as cluster:
        js = [cluster.submit(i) for i in range(5)]
        ids = [j.id for j in js]
        assert all(isinstance(i, int) for i in ids) and ids == sorted(set(ids))
        named = cluster.submit_job_id("mine", 1)
        assert named.id == "mine"
        js[0].id = "set later"  # the program's own, as dispy's examples do
        assert [j(timeout=30) for j in js] == [0, 2, 4, 6, 8] and js[0].id == "set later"


def test_job_finish_is_an_event_set_at_the_end(node):
    with dispy.JobCluster(jobs.sleep_for, nodes=[node.address], secret=node.secret) as cluster:
        job = cluster.submit(0.2)
        assert isinstance(job.finish, threading.Event)
        assert job.finish.wait(30) and job.status == DispyJob.Finished and job.result == 0.2


def test_submit_job_id_node(node_factory):
    a, b = node_factory(cpus=1, secret="p"), node_factory(cpus=1, secret="p")
    status, ready = nodes_ready(2)
    with dispy.JobCluster(
        jobs.double, nodes=[a.address, b.address], secret="p", cluster_status=status
    ) as cluster:
        assert ready.wait(30)
        js = [cluster.submit_job_id_node(f"id{i}", b.address, i) for i in range(3)]
        assert [j(timeout=30) for j in js] == [0, 2, 4]
        assert [j.id for j in js] == ["id0", "id1", "id2"]
        assert {j.ip_addr for j in js} == {b.ip_addr}
        assert cluster.submit_job_id_node("x", "no-such-node", 1) is None


def test_program_output_is_bytes(node, tmp_path):
    """A program computation's job.stdout / job.stderr are its raw bytes, as in dispy
    (dispy programs call job.stdout.decode()); a function's are str."""
    prog = tmp_path / "prog.sh"
    prog.write_bytes(b"#!/bin/sh\nprintf 'caf\\303\\251 %s\\n' \"$1\"\nprintf 'oops\\377' >&2\n")
    prog.chmod(0o755)
    with dispy.JobCluster(str(prog), nodes=[node.address], secret=node.secret) as cluster:
        job = cluster.submit("x")
        assert job(timeout=60) == 0
        assert job.stdout == "café x\n".encode() and job.stderr == b"oops\xff"
        assert job.stdout.decode() == "café x\n"
    with dispy.JobCluster(jobs.echo_print, nodes=[node.address], secret=node.secret) as cluster:
        job = cluster.submit("y")
        job(timeout=60)
        assert isinstance(job.stdout, str)


# -- the client's parameter names of dispy 4.15 ---------------------------------------------------


def test_host_ext_host_and_dispy_port_are_accepted(node):
    with dispy.JobCluster(
        jobs.double,
        nodes=[node.address],
        secret=node.secret,
        host="127.0.0.1",
        ext_host="127.0.0.1",
    ) as cluster:
        assert cluster.submit(2)(timeout=30) == 4
    try:
        dispy.JobCluster(jobs.double, nodes=[node.address], ip_addr="127.0.0.1", host="127.0.0.9")
    except TypeError as exc:
        assert "ip_addr" in str(exc) and "host" in str(exc) and "give one" in str(exc)
    else:
        raise AssertionError("two different values for one option were accepted")


def test_shared_cluster_takes_scheduler_host(node_factory, tmp_path):
    from .test_shared import CLUSTER_SECRET, NODE_SECRET, Scheduler

    n = node_factory(cpus=1, secret=NODE_SECRET)
    sched = Scheduler([n], tmp_path)
    try:
        with dispy.SharedJobCluster(
            jobs.double, scheduler_host="127.0.0.1", scheduler_port=sched.port,
            secret=CLUSTER_SECRET, recover_file=False,
        ) as cluster:  # fmt: skip
            job = cluster.submit(21)
            assert job(timeout=60) == 42
            assert job.ip_addr == n.ip_addr  # the node that ran it, not the scheduler
            # status() shows the scheduler's nodes, as dispy does
            st = cluster.status()
            assert [(nd.ip_addr, nd.port, nd.cpus) for nd in st.nodes] == [(n.ip_addr, n.port, 1)]
            assert st.jobs_pending == 0
    finally:
        sched.stop()


# -- the documented surface: every name a dispy program may use -----------------------------------
#
# From dispy's documentation (its API reference, as the seeds quote it): the
# names below must exist with these parameters.  Their behaviour is tested
# here and in test_api.py / test_loopback.py / test_installed.py.

import inspect  # noqa: E402

from dispy import DispyNodeAvailInfo, NodeAllocate  # noqa: E402

DOCUMENTED = {
    dispy.JobCluster: {
        "__init__": ["computation", "nodes", "depends", "callback", "cluster_status", "ip_addr",
                     "port", "node_port", "ext_ip_addr", "dest_path", "loglevel", "setup",
                     "cleanup", "ping_interval", "pulse_interval", "poll_interval", "reentrant",
                     "secret", "keyfile", "certfile", "recover_file", "job_status", "host",
                     "ext_host", "dispy_port"],
        "submit": [], "submit_node": ["node"], "submit_job_id": ["job_id"],
        "submit_job_id_node": ["job_id", "node"], "cancel": ["job"],
        "discover_nodes": ["nodes"], "allocate_node": ["node"], "deallocate_node": ["node"],
        "close_node": ["node"], "resetup_node": ["node"], "set_node_cpus": ["node", "cpus"],
        "send_file": ["path", "node"], "node_jobs": ["node"], "status": [], "print_status": [],
        "stats": [], "wait": ["timeout"], "close": ["timeout", "terminate"], "shutdown": [],
    },
    dispy.SharedJobCluster: {
        "__init__": ["computation", "nodes", "depends", "callback", "cluster_status", "ip_addr",
                     "port", "scheduler_node", "scheduler_port", "ext_ip_addr", "loglevel",
                     "setup", "cleanup", "dest_path", "poll_interval", "reentrant", "exclusive",
                     "secret", "keyfile", "certfile", "recover_file", "job_status", "host",
                     "client_port", "scheduler_host", "ext_host", "dispy_port"],
    },
    NodeAllocate: {
        "__init__": ["host", "port", "cpus", "depends", "setup_args"],
        "allocate": ["cluster", "ip_addr", "name", "cpus", "avail_info", "platform"],
    },
}  # fmt: skip


def test_documented_methods_and_parameters_exist():
    missing = []
    for cls, methods in DOCUMENTED.items():
        for name, params in methods.items():
            fn = getattr(cls, name, None)
            if fn is None:
                missing.append(f"{cls.__name__}.{name}")
                continue
            have = inspect.signature(fn).parameters
            missing += [f"{cls.__name__}.{name}({p}=)" for p in params if p not in have]
    assert missing == []


def test_poll_interval_is_checked():
    """dispy's poll_interval has nothing to poll here (results are pushed) but a
    wrong value is still refused, before anything starts."""
    for bad in ("10", 0, -1.0, True):
        with pytest.raises(ValueError, match="poll_interval must be None or a positive"):
            dispy.JobCluster(print, nodes=["127.0.0.1"], poll_interval=bad)


def test_documented_constants_and_attributes():
    # dispy's values: programs compare with them, and some print them
    assert (DispyJob.Created, DispyJob.Running, DispyJob.ProvisionalResult, DispyJob.Cancelled,
            DispyJob.Terminated, DispyJob.Abandoned, DispyJob.Finished) == (5, 6, 7, 8, 9, 10, 11)  # fmt: skip
    assert len({DispyNode.Initialized, DispyNode.Closed, DispyNode.AvailInfo}) == 3
    info = DispyNodeAvailInfo(cpu=1.0, memory=2, disk=3, swap=4.0)
    assert (info.cpu, info.memory, info.disk, info.swap) == (1.0, 2, 3, 4.0)
    node = DispyNode("10.0.0.1", 51348)
    for attr in ("ip_addr", "name", "cpus", "avail_cpus", "busy", "jobs_done", "cpu_time",
                 "update_time", "avail_info", "tx", "rx"):  # fmt: skip
        assert hasattr(node, attr), attr
    params = inspect.signature(dispy.recover_jobs).parameters
    assert list(params) == ["recover_file", "timeout", "terminate_pending"]


def test_callbacks_get_what_dispy_gives_and_when(node):
    """``callback(job)``: each provisional result, then the end, once.
    ``cluster_status(status, node, job)``: the node Initialized (job None), then
    for the job Running, ProvisionalResult..., and its end, with its node."""
    calls, status_calls = [], []
    done = threading.Event()

    def callback(job):
        calls.append((job.status, job.result))
        if job.status == DispyJob.Finished:
            done.set()

    def cluster_status(status, n, job):
        status_calls.append((status, n.ip_addr if n is not None else None, job))

    with dispy.JobCluster(
        jobs.provisional_steps, nodes=[node.address], secret=node.secret,
        callback=callback, cluster_status=cluster_status,
    ) as cluster:  # fmt: skip
        job = cluster.submit(2)
        assert job(timeout=30) == ("done", 2) and done.wait(30)
    assert calls == [
        (DispyJob.ProvisionalResult, ("step", 0)),
        (DispyJob.ProvisionalResult, ("step", 1)),
        (DispyJob.Finished, ("done", 2)),
    ]
    assert status_calls[0] == (DispyNode.Initialized, node.ip_addr, None)
    about_job = [(st, ip) for st, ip, j in status_calls if j is job]
    assert about_job[0] == (DispyJob.Running, node.ip_addr)
    assert about_job[-1] == (DispyJob.Finished, node.ip_addr)
    assert [st for st, _ in about_job].count(DispyJob.Finished) == 1


def test_bounded_submit_holds_when_jobs_end_before_the_program_looks(node):
    """dispy's bounded_submit.py, under its lock: submit, set ``job.id``, keep the
    job as pending if its status is Created or Running; its callback, under the
    same lock, pops ``job.id`` from the pending jobs ``if job.id``.  Both ways a
    job can end before the program looks are forced here, each for several jobs:
    its callback has run already (an id never set must test false), or the job
    has ended but its callback waits behind another (the program must not see the
    end before the callback).  Either way exactly the jobs kept are popped."""
    cond = threading.Condition()
    pending: dict = {}
    errors: list = []
    called = threading.Semaphore(0)
    gate = threading.Event()
    gate.set()

    def callback(job):
        if job.status in (DispyJob.Finished, DispyJob.Terminated, DispyJob.Abandoned):
            gate.wait(60)  # the callback thread held up, while later jobs end
            with cond:
                if job.id:
                    if pending.pop(job.id, None) is None:
                        errors.append(f"callback: job {job.id} ended but was not kept")
            called.release()

    def keep(job, i):
        with cond:
            job.id = i
            if job.status in (DispyJob.Created, DispyJob.Running):
                pending[i] = job

    with dispy.JobCluster(
        jobs.double, nodes=[node.address], secret=node.secret, callback=callback
    ) as cluster:
        # 1. each job's callback has run before the program sets its id
        for i in range(1, 6):
            job = cluster.submit(i)
            assert called.acquire(timeout=60)
            assert not job.id, job.id  # a number, but not one the program set
            keep(job, i)
        assert pending == {} and errors == []
        # 2. each job has ended (for the client) while its callback waits behind
        #    the first one's, held up
        gate.clear()
        try:
            first = cluster.submit(0)
            with cluster._end_cond:
                assert cluster._end_cond.wait_for(lambda: first._end._over, 60)
            for i in range(6, 11):
                job = cluster.submit(i)
                with cluster._end_cond:
                    assert cluster._end_cond.wait_for(lambda j=job: j._end._over, 60)
                keep(job, i)
            assert sorted(pending) == list(range(6, 11))
        finally:
            gate.set()
        assert cluster.wait(60)
    assert errors == [] and pending == {}


def test_a_callback_can_wait_for_ends_it_has_yet_to_be_given(node):
    """A job's end is published on the callback thread, so a callback waiting for
    a later job (``job()``, ``finish.wait()``, ``cluster.wait()``) must not wait
    for itself: it sees the ends the client has, published or not."""
    got = {}
    ready = threading.Event()
    later = []

    def callback(job):
        if job.id == "first":
            ready.wait(60)
            got["result"] = later[0](timeout=20)
            got["finish"] = later[0].finish.wait(20)
            got["wait"] = cluster.wait(20)
            got["status"] = later[0].status

    with dispy.JobCluster(
        jobs.sleep_for, nodes=[node.address], secret=node.secret, callback=callback
    ) as cluster:
        first = cluster.submit_job_id("first", 0)
        later.append(cluster.submit(0.3))  # ends while the first's callback runs
        ready.set()
        assert first(timeout=60) == 0 and later[0](timeout=60) == 0.3
    assert got == {"result": 0.3, "finish": True, "wait": True, "status": DispyJob.Finished}


def test_waiting_for_a_job_holding_the_lock_its_callback_takes(node):
    """A thread that waits for a job (``job()``, ``cluster.wait()``) gets its end
    though the callback that gets it first waits for a lock that thread holds."""
    lock = threading.Lock()
    seen = []

    def callback(job):
        with lock:
            seen.append((job.id, job.status))

    with dispy.JobCluster(
        jobs.sleep_for, nodes=[node.address], secret=node.secret, callback=callback
    ) as cluster:
        with lock:  # a's callback waits for it; b's and c's ends wait behind
            a, b, c = (
                cluster.submit_job_id(name, t) for name, t in (("a", 0), ("b", 0.1), ("c", 0.2))
            )
            assert b(timeout=20) == 0.1 and b.status == DispyJob.Finished
            assert cluster.wait(20) and c.status == DispyJob.Finished and c.finish.is_set()
    assert seen == [(name, DispyJob.Finished) for name in "abc"]


def test_names_a_job_sees(node):
    """dispy_node_name, dispy_node_ip_addr, dispy_job_path, dispynode_logger (to
    job.stderr).  (Modules such as os without an import: dispy's 6.5, run as
    printed in test_installed.py.)"""
    with dispy.JobCluster(jobs.node_globals, nodes=[node.address], secret=node.secret) as c:
        job = c.submit("x")
        name, ip, in_job_path = job(timeout=30)
    assert name and ip == node.ip_addr and in_job_path
    assert "logged x" in job.stderr
