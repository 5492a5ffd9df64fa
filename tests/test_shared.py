"""dispyscheduler and SharedJobCluster on loopback: several client programs on
the same nodes, the sharing policies, exclusive clusters, secrets."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import dispy
from dispy import DispyJob
from dispy._recover_file import RecoverFile

from . import jobs
from .installed import program

NODE_SECRET = "shared-node-secret"
CLUSTER_SECRET = "shared-cluster-secret"


class Scheduler:
    """A dispyscheduler on 127.0.0.1 (free port) in front of ``nodes``."""

    def __init__(self, nodes, tmp_path, *args):
        env = dict(os.environ, DISPY_SECRET=NODE_SECRET)
        self.proc = subprocess.Popen(
            [*program("dispyscheduler"), "--daemon", "-i", "127.0.0.1", "-p", "0",
             "--cluster_secret", CLUSTER_SECRET, "--dest_path", str(tmp_path / "sched"),
             *[a for n in nodes for a in ("-n", n.address)], *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.log: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        line = self.proc.stdout.readline()
        assert line.startswith("dispyscheduler ready"), line
        self.port = int(line.split("addr=")[1].split()[0].rsplit(":", 1)[1])
        # clients that come before the nodes are up start on fewer nodes: wait for them
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum("ready with" in ln for ln in self.log) >= len(nodes), timeout=30
            )
        assert ok or not nodes, "\n".join(self.log)

    def _read_log(self):
        for line in self.proc.stderr:
            with self._cond:
                self.log.append(line)
                self._cond.notify_all()

    def cluster(self, computation, **kw):
        kw.setdefault("secret", CLUSTER_SECRET)
        kw.setdefault("recover_file", False)
        return dispy.SharedJobCluster(
            computation, scheduler_node="127.0.0.1", scheduler_port=self.port, **kw
        )

    def kill(self):
        """kill -9, by PID."""
        self.proc.kill()
        self.proc.wait(30)
        self._reader.join(10)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def stop(self):
        if self.proc.returncode is not None:
            return
        self.proc.terminate()
        self.proc.wait(30)
        self._reader.join(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def two_nodes(node_factory):
    return [node_factory(cpus=1, secret=NODE_SECRET) for _ in range(2)]


@pytest.fixture
def scheduler_factory(two_nodes, tmp_path):
    started = []

    def make(*args, nodes=None):
        s = Scheduler(nodes or two_nodes, tmp_path, *args)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def test_shared_cluster_runs_jobs_on_the_schedulers_nodes(scheduler_factory, two_nodes):
    sched = scheduler_factory()
    with sched.cluster(jobs.node_globals) as cluster:
        js = [cluster.submit(i) for i in range(12)]
        assert all(j() is not None for j in js), [j.exception for j in js]
        assert {j.status for j in js} == {DispyJob.Finished}
        # a job's ip_addr is the node that ran it (127.0.0.2, .3), not the scheduler's
        assert {j.ip_addr for j in js} <= {n.ip_addr for n in two_nodes}
        nodes = cluster.status()[0]  # the scheduler's nodes, as dispy shows them
        assert sorted((n.ip_addr, n.cpus) for n in nodes) == sorted(
            (n.ip_addr, 1) for n in two_nodes
        )


CLIENT = r"""
import json, sys
import dispy
def compute(x, k):
    import time
    time.sleep(0.02)
    return (k, x * x)
port, secret, k, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cluster = dispy.SharedJobCluster(compute, scheduler_node="127.0.0.1", scheduler_port=port,
                                 secret=secret, recover_file=False)
jobs = [cluster.submit(i, k) for i in range(n)]
out = [j() for j in jobs]
cluster.close()
print(json.dumps({"ok": out == [[k, i * i] for i in range(n)] or out == [(k, i * i) for i in range(n)],
                  "status": sorted({j.status for j in jobs}), "bad": [j.exception for j in jobs if j.exception][:3]}))
"""


@pytest.mark.parametrize("clients", [2, 8])
def test_concurrent_client_programs_share_two_nodes(scheduler_factory, clients):
    sched = scheduler_factory()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(sched.port), CLUSTER_SECRET, str(k), "15"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for k in range(clients)
    ]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        res = json.loads(out.strip().splitlines()[-1])
        assert res["ok"] and res["status"] == [DispyJob.Finished], res


def _finish_spread(sched, order: str, b_first: bool = False) -> int:
    """Two equal clusters, 12 jobs of 0.1 s each (all at the scheduler at once) on 2 CPUs; jobs submitted
    ``interleaved`` (A0 B0 A1 B1 ...) or ``block`` (all of A, then all of B).
    Returns how many of B's jobs ended before A's last one did (ends as the
    nodes report them): an order, not a duration, so a busy machine does not
    change it."""
    a = sched.cluster(jobs.sleep_for)
    b = None
    try:
        assert a.submit(0)() == 0  # A is the older cluster at the scheduler (early policy)
        b = sched.cluster(jobs.sleep_for)
        assert b.submit(0)() == 0  # both set up on both nodes
        ja, jb = [], []
        if order == "interleaved":
            for _ in range(12):
                ja.append(a.submit(0.1))
                jb.append(b.submit(0.1))
        else:
            first, second = (b, a) if b_first else (a, b)
            j1 = [first.submit(0.1) for _ in range(12)]
            # jobs of two clients sent within the same millisecond reach the scheduler in
            # no defined order: let the first's be there (one ran) before the second's
            assert j1[0]() == 0.1
            j2 = [second.submit(0.1) for _ in range(12)]
            ja, jb = (j2, j1) if b_first else (j1, j2)
        for j in ja + jb:
            assert j() == 0.1
        a_done = max(j.end_time for j in ja)
        return sum(j.end_time < a_done for j in jb)
    finally:
        a.close()
        if b is not None:
            b.close()


# Of B's 12 jobs, how many end before A's last: first come, first served gives
# none (one at most, where the two nodes' last jobs overlap); taking turns
# gives about half; serving the older cluster first, though B's jobs came
# first, gives only those already on the nodes when A's came (FIFO: all 12).


def test_first_submitted_policy(scheduler_factory):
    sched = scheduler_factory()
    assert _finish_spread(sched, "block") <= 1  # B came after all of A


def test_fair_policy_takes_turns(scheduler_factory):
    sched = scheduler_factory("--fair_cluster_scheduler")
    assert _finish_spread(sched, "block") >= 5  # all of A came first, yet B is served too


def test_early_policy_serves_the_older_cluster_first(scheduler_factory):
    sched = scheduler_factory("--early_cluster_scheduler")
    assert _finish_spread(sched, "block", b_first=True) <= 6  # A (created first) ends first


def test_exclusive_cluster_takes_nodes_another_cluster_is_set_up_on(scheduler_factory):
    sched = scheduler_factory()
    y = sched.cluster(jobs.sleep_for)
    x = None
    try:
        assert y.submit(0)() == 0  # y is set up on both nodes
        long_y = y.submit(3.0)  # running on one node when x comes (long: x sets up meanwhile)
        assert _wait_for(lambda: long_y.status == DispyJob.Running, 30)
        x = sched.cluster(jobs.sleep_for, exclusive=True)
        jx = [x.submit(0.2) for _ in range(4)]
        assert jx[0](timeout=60) == 0.2  # x has the nodes now
        later_y = y.submit(0)
        for j in jx:
            assert j(timeout=60) == 0.2, (j.status, j.exception)
        assert long_y() == 3.0
        # while y's long job ran, x had only the other node: the jobs of x that
        # started before it ended ran one at a time (start and end times are the
        # nodes' own, on one clock here)
        before = sorted((j for j in jx if j.start_time < long_y.end_time),
                        key=lambda j: j.start_time)  # fmt: skip
        assert len(before) >= 2
        for j1, j2 in zip(before, before[1:], strict=False):
            assert j2.start_time >= j1.end_time, (j1.start_time, j1.end_time, j2.start_time)
        assert later_y.status in (DispyJob.Created, DispyJob.Running)  # no node for y now
        x.close()
        assert later_y(timeout=60) == 0
    finally:
        if x is not None:
            x.close()
        y.close()


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)  # polling a condition, with a deadline
    return cond()


def test_exclusive_cluster_has_nodes_to_itself(scheduler_factory):
    sched = scheduler_factory()
    x = sched.cluster(jobs.sleep_for, exclusive=True)
    y = sched.cluster(jobs.sleep_for)
    try:
        assert x.submit(0)() == 0
        jy = y.submit(0)
        jx = [x.submit(0.2) for _ in range(4)]
        for j in jx:
            assert j() == 0.2
        assert jy.status in (DispyJob.Created, DispyJob.Running)  # waits: no node for it
        x.close()
        assert jy(timeout=60) == 0 and jy.status == DispyJob.Finished
        assert jy.start_time >= max(j.end_time for j in jx)  # y waited for x to leave
    finally:
        x.close()
        y.close()


def test_wrong_cluster_secret_is_refused_clearly(scheduler_factory):
    sched = scheduler_factory()
    cluster = sched.cluster(jobs.double, secret=NODE_SECRET)  # the nodes' secret, not the cluster's
    try:
        job = cluster.submit(1)
        assert job(timeout=60) is None
        assert job.status == DispyJob.Abandoned
        assert "authentication with dispyscheduler" in job.exception
        assert "--cluster_secret" in job.exception
    finally:
        cluster.close()


def test_scheduler_with_wrong_node_secret_runs_nothing_and_says_why(node_factory, tmp_path):
    node = node_factory(cpus=1, secret="not-the-scheduler-secret")
    sched = Scheduler([], tmp_path, "-n", node.address)
    try:
        # the scheduler's log names the node and the option to fix
        with sched._cond:
            said = sched._cond.wait_for(
                lambda: any(
                    node.ip_addr in ln and "--node_secret must be the nodes' secret" in ln
                    for ln in sched.log
                ),
                timeout=30,
            )
        assert said, "".join(sched.log)
        with sched.cluster(jobs.double) as cluster:
            job = cluster.submit(1)
            # the node never ran it: no result, and the job is still waiting for a node
            assert job(timeout=3) is None and job.status in (DispyJob.Created, DispyJob.Running)
            assert job.exception is None and job.end_time is None
            cluster.close(terminate=True)
    finally:
        sched.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("reentrant", [False, True])
def test_scheduler_killed_and_restarted_loses_no_job(two_nodes, tmp_path, reentrant):
    """kill -9 of dispyscheduler mid-run, then a restart on the same port and
    folder: the client reconnects and every job ends once, Finished, having run
    once (jobs queued at the scheduler, running on nodes, and ended while it was
    down alike)."""
    port = str(_free_port())
    runs = tmp_path / "runs"
    runs.mkdir()
    sched = Scheduler(two_nodes, tmp_path, "-p", port, "--pulse_interval", "0.5")
    ended: dict[int, int] = {}
    lock = threading.Lock()

    def count(job):
        if job.status in (DispyJob.Finished, DispyJob.Terminated, DispyJob.Abandoned,
                          DispyJob.Cancelled):  # fmt: skip
            with lock:
                ended[job.id] = ended.get(job.id, 0) + 1

    cluster = sched.cluster(jobs.logged_sleep, reentrant=reentrant, callback=count)
    try:
        js = []
        for i in range(16):
            job = cluster.submit(str(runs), i, 0.4)
            job.id = i
            js.append(job)
        assert js[0](timeout=60) == 0  # running on both nodes now, the rest queued
        sched.kill()
        # the nodes go on meanwhile: jobs end (results kept on the nodes) and start
        assert _wait_for(lambda: (runs / "3").exists(), 30)
        sched = Scheduler(two_nodes, tmp_path, "-p", port, "--pulse_interval", "0.5")
        for job in js:
            assert job(timeout=90) == job.id, (job.id, job.status, job.exception)
            assert job.status == DispyJob.Finished
        assert _wait_for(lambda: len(ended) == 16, 10), ended
        assert set(ended.values()) == {1}, ended
        for i in range(16):  # every job ran once: none lost, none run twice
            assert len((runs / str(i)).read_text().splitlines()) == 1, i
        assert "restored 1 computation(s)" in "".join(sched.log)
    finally:
        cluster.close()
        sched.stop()


# A SharedJobCluster program killed by the test once its four jobs run.
CRASHING_CLIENT = r"""
import os, sys, time
import dispy

def compute(x, marks, seconds):
    import os, time
    open(os.path.join(marks, f"started-{x}"), "w").close()
    time.sleep(seconds)
    print("output of", x)
    return x * 10

port, secret, path, marks, last = sys.argv[1:6]
cluster = dispy.SharedJobCluster(compute, scheduler_node="127.0.0.1", scheduler_port=int(port),
                                 secret=secret, recover_file=path)
for i, (name, seconds) in enumerate([("a", 1.0), ("b", 1.0), ("c", 0.3), ("d", float(last))]):
    job = cluster.submit(i, marks, seconds)
    job.id = name
print("submitted", flush=True)
time.sleep(600)  # killed by the test long before this ends
"""

RECOVER = r"""
import json, sys
import dispy
jobs = dispy.recover_jobs(sys.argv[1], timeout=60)
print(json.dumps([[j.id, j.status, j.result, j.stdout, j.exception]
                  for j in sorted(jobs, key=lambda j: j.id)]))
"""


def _recover(path) -> list:
    proc = subprocess.run(
        [sys.executable, "-c", RECOVER, path], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _crash_client(sched, tmp_path, last: float) -> str:
    path, marks = str(tmp_path / "shared.recover"), tmp_path / "marks"
    marks.mkdir()
    client = subprocess.Popen(
        [sys.executable, "-c", CRASHING_CLIENT, str(sched.port), CLUSTER_SECRET, path,
         str(marks), str(last)],
        stdout=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert client.stdout.readline().strip() == "submitted"
        assert _wait_for(lambda: len(os.listdir(marks)) >= 2, 60)  # a and b run (1 s)

        def recorded() -> bool:
            with RecoverFile.open(path) as rf:
                return len(rf.unfinished()) == 4

        assert _wait_for(recorded, 30)
    finally:
        client.kill()  # SIGKILL, by PID: no close
        client.wait(30)
        client.stdout.close()
    return path


def test_recover_jobs_through_the_scheduler(scheduler_factory, tmp_path):
    sched = scheduler_factory()
    path = _crash_client(sched, tmp_path, last=0.5)
    out = _recover(path)  # the jobs end while no client exists; the scheduler kept them
    assert [(j[0], j[1], j[2]) for j in out] == [
        ("a", DispyJob.Finished, 0), ("b", DispyJob.Finished, 10),
        ("c", DispyJob.Finished, 20), ("d", DispyJob.Finished, 30),
    ]  # fmt: skip
    assert all(j[3].startswith("output of") for j in out)
    assert _recover(path) == []


def test_zombie_results_survive_a_scheduler_restart_for_recover_jobs(two_nodes, tmp_path):
    port = str(_free_port())
    args = ("-p", port, "--zombie_interval", "0.05")  # minutes: 3 s (a, b, c take 1.3 s)
    sched = Scheduler(two_nodes, tmp_path, *args)
    try:
        path = _crash_client(sched, tmp_path, last=60)
        with sched._cond:  # the client is a zombie: its computation is closed on the nodes
            assert sched._cond.wait_for(
                lambda: any("kept for recover_jobs" in ln for ln in sched.log), 30
            ), "".join(sched.log)
        sched.kill()
        sched = Scheduler(two_nodes, tmp_path, *args)
        assert "restored" in "".join(sched.log)
        out = _recover(path)
        assert [(j[0], j[1], j[2]) for j in out[:3]] == [
            ("a", DispyJob.Finished, 0), ("b", DispyJob.Finished, 10),
            ("c", DispyJob.Finished, 20),
        ]  # fmt: skip
        assert out[3][:3] == ["d", DispyJob.Terminated, None]
        assert "zombie_interval" in out[3][4]
        assert _recover(path) == []
    finally:
        sched.stop()


def test_shared_cluster_job_api(scheduler_factory, two_nodes, tmp_path, monkeypatch):
    """JobCluster's job API through the scheduler: depends and setup, provisional
    results to the callback, files a job sends back, cancel (queued and running),
    wait, submit_node to one of the scheduler's nodes (or an unknown one)."""
    sched = scheduler_factory()
    dep = tmp_path / "dep.txt"
    dep.write_text("from the client")
    seen = []

    def cb(job):
        seen.append((job.status, job.result))

    with sched.cluster(jobs.provisional_steps, callback=cb) as cluster:
        assert cluster.submit(2)(timeout=60) == ("done", 2)
        assert cluster.wait(timeout=30)
    assert [r for st, r in seen if st == DispyJob.ProvisionalResult] == [("step", 0), ("step", 1)]

    with sched.cluster(jobs.read_file, depends=[str(dep)]) as cluster:
        assert cluster.submit("dep.txt")(timeout=60) == "from the client"

    with sched.cluster(jobs.read_setup_global, setup=functools.partial(jobs.setup_global, 7)) as c:
        assert c.submit(1)(timeout=60) == (7, 1)

    monkeypatch.chdir(tmp_path)
    with sched.cluster(jobs.send_back) as cluster:
        job = cluster.submit("back.txt", "from the node")
        assert job(timeout=60) == 0, (job.exception, job.stderr)
    assert (tmp_path / "back.txt").read_text() == "from the node"

    with sched.cluster(jobs.sleep_for) as cluster:
        js = [cluster.submit(30) for _ in range(32)]  # beyond what the nodes take
        # one runs on each node once both are set up (Running is the nodes' word: which
        # two depends on when each node was ready)
        assert _wait_for(lambda: sum(j.status == DispyJob.Running for j in js) == 2, 30)
        running = [j for j in js if j.status == DispyJob.Running]
        queued = [j for j in js if j not in running]
        for j in queued + running:
            assert cluster.cancel(j) == 0
        for j in queued + running:
            j(timeout=60)
            assert j.status in (DispyJob.Cancelled, DispyJob.Terminated), (j.status, j.exception)
        assert cluster.wait(timeout=30)

    with sched.cluster(jobs.where) as cluster:
        assert cluster.submit(0)(timeout=60) is not None  # set up on both nodes
        for node in two_nodes:
            pinned = [cluster.submit_node(node.address, i) for i in range(3)]
            for j in pinned:  # the job's folder is in that node's folder
                assert j(timeout=60).startswith(node._dir), (j.status, j.exception, node._dir)
        bad = cluster.submit_node("10.255.255.1:9", 1)
        assert bad(timeout=60) is None and bad.status == DispyJob.Abandoned
        assert "submit_node" in bad.exception and "10.255.255.1:9" in bad.exception


def test_a_shared_job_waiting_behind_another_clients_reads_created(node_factory, tmp_path):
    """One 1-CPU node, two clients through the scheduler: while A's long job runs
    there, B's job waits (Created at B, whose own reckoning alone said Running),
    and it is Running once the node says it started."""
    node = node_factory(cpus=1, secret=NODE_SECRET)
    sched = Scheduler([node], tmp_path)
    try:
        with sched.cluster(jobs.sleep_for) as a, sched.cluster(jobs.sleep_for) as b:
            long = a.submit(1.5)
            assert _wait_for(lambda: long.status == DispyJob.Running, 30)
            waiting = b.submit(0.01)
            assert not _wait_for(lambda: waiting.status != DispyJob.Created, 0.5)
            assert long.status == DispyJob.Running  # (so B's job did wait all that time)
            assert waiting(timeout=30) == 0.01 and long(timeout=30) == 1.5
            assert waiting.start_time >= long.end_time - 0.001  # the node's clock, both
    finally:
        sched.stop()
