"""Chaos: random kill -9 / restart of nodes (and of a dispyscheduler) and link
flaps, in network namespaces, over a fixed set of reentrant jobs; then the
invariant: every submitted job ended exactly once (one callback), finished,
with the right result.

The default run is short (CI); ``DISPY_CHAOS_ROUNDS=N`` runs N rounds and
``DISPY_CHAOS_SEED=S`` replays a run (the seed is printed on failure).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest

from .installed import program
from .netns import read_lines, wait_for_line

pytestmark = pytest.mark.netns

ROUNDS = int(os.environ.get("DISPY_CHAOS_ROUNDS", "6"))
SEED = int(os.environ.get("DISPY_CHAOS_SEED", str(random.randrange(1 << 30))))
ENV = {"DISPY_SECRET": "chaos-secret", "DISPY_NODES": None, "PYTHONUNBUFFERED": "1"}
PULSE = 0.5  # liveness window: 5 pulses = 2.5 s

CLIENT = r"""
import collections, json, sys, threading
import dispy

def compute(x, seconds):
    import time
    time.sleep(seconds)
    return x * x

nodes, njobs, seed = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
pulse = float(sys.argv[4])
ends = collections.Counter()
lock = threading.Lock()

def callback(job):
    if job.status in (dispy.DispyJob.Finished, dispy.DispyJob.Terminated,
                      dispy.DispyJob.Cancelled, dispy.DispyJob.Abandoned):
        with lock:
            ends[job.id] += 1

import random
rnd = random.Random(seed)
cluster = dispy.JobCluster(compute, nodes=nodes, reentrant=True, pulse_interval=pulse,
                           callback=callback, recover_file=False)
jobs = []
for i in range(njobs):
    job = cluster.submit(i, rnd.uniform(0.05, 0.4))
    job.id = i
    jobs.append(job)
print("submitted", flush=True)
cluster.wait()
cluster.close()
print(json.dumps({
    "ends": {str(k): v for k, v in ends.items()},
    "status": {str(j.id): j.status for j in jobs},
    "results": {str(j.id): j.result for j in jobs},
    "exceptions": {str(j.id): j.exception for j in jobs if j.exception},
}), flush=True)
"""


class NodeProc:
    def __init__(self, host):
        self.host = host
        self.proc = None

    def start(self):
        self.proc = self.host.popen(
            [*program("dispynode"), "--daemon", "-c", "1",
             "--dest_path", f"/tmp/dispy-chaos-{self.host.ns}"],
            env=ENV,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for_line(self.proc, r"dispynode ready", timeout=30)

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def test_chaos_every_job_ends_exactly_once(netns):
    rnd = random.Random(SEED)
    hosts = [netns.add_host(f"n{i}") for i in range(3)]
    client = netns.add_host("c")
    nodes = [NodeProc(h) for h in hosts]
    for n in nodes:
        n.start()
    njobs = 40 + 10 * ROUNDS
    proc = client.popen_python(
        CLIENT, json.dumps([h.ip for h in hosts]), str(njobs), str(SEED), str(PULSE),
        env=ENV, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_line(proc, r"submitted", timeout=60)
    actions = []
    for _ in range(ROUNDS):
        victim = rnd.choice(nodes)
        what = rnd.choice(["kill", "flap_short", "flap_long"])
        actions.append((what, victim.host.name))
        # how long the fault lasts is the experiment's parameter, not a wait for a condition
        if what == "kill":
            victim.kill()
            time.sleep(rnd.uniform(0.2, 1.0))
            victim.start()
        elif what == "flap_short":
            victim.host.link_down()
            time.sleep(rnd.uniform(0.2, 1.0))  # within the 2.5 s window
            victim.host.link_up()
        else:
            victim.host.link_down()
            time.sleep(rnd.uniform(3.0, 4.0))  # past the window: declared dead
            victim.host.link_up()
        time.sleep(rnd.uniform(0.2, 0.8))
    what = f"seed {SEED}, rounds {ROUNDS}, actions {actions}"
    try:
        m = wait_for_line(proc, r"^(\{.*\})$", timeout=180)
    except AssertionError as exc:
        raise AssertionError(f"{what}: the client did not finish: {exc}") from None
    out = json.loads(m.group(1))
    assert proc.wait(30) == 0, what
    ends = {int(k): v for k, v in out["ends"].items()}
    assert ends == {i: 1 for i in range(njobs)}, f"{what}: ends {ends}"
    assert all(s == 11 for s in out["status"].values()), f"{what}: {out['exceptions']}"
    assert out["results"] == {str(i): i * i for i in range(njobs)}, what


SHARED_CLIENT = r"""
import collections, json, sys, threading
import dispy

def compute(x, seconds):
    import time
    time.sleep(seconds)
    return x * x

sched, port, njobs, seed, pulse = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
ends = collections.Counter()
lock = threading.Lock()

def callback(job):
    if job.status in (dispy.DispyJob.Finished, dispy.DispyJob.Terminated,
                      dispy.DispyJob.Cancelled, dispy.DispyJob.Abandoned):
        with lock:
            ends[job.id] += 1

import random
rnd = random.Random(seed)
import faulthandler, logging
faulthandler.dump_traceback_later(120, exit=False)  # a hang shows where it is stuck
cluster = dispy.SharedJobCluster(compute, scheduler_node=sched, scheduler_port=port,
                                 reentrant=True, pulse_interval=pulse, callback=callback,
                                 recover_file=False, loglevel=logging.INFO)
jobs = []
for i in range(njobs):
    job = cluster.submit(i, rnd.uniform(0.05, 0.3))
    job.id = i
    jobs.append(job)
print("submitted", flush=True)
cluster.wait()
cluster.close()
print(json.dumps({
    "ends": {str(k): v for k, v in ends.items()},
    "status": {str(j.id): j.status for j in jobs},
    "results": {str(j.id): j.result for j in jobs},
    "exceptions": {str(j.id): j.exception for j in jobs if j.exception},
}), flush=True)
"""


class SchedulerProc:
    def __init__(self, host, nodes):
        self.host, self.nodes, self.proc = host, nodes, None

    def start(self):
        self.proc = self.host.popen(
            [*program("dispyscheduler"), "--daemon", "-i", self.host.ip,
             "-p", "51349", "--pulse_interval", str(PULSE),
             "--dest_path", f"/tmp/dispy-chaos-{self.host.ns}",
             *[a for n in self.nodes for a in ("-n", n.host.ip)]],
            env=ENV, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for_line(self.proc, r"dispyscheduler ready", timeout=30)

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def test_chaos_through_the_scheduler_every_job_ends_exactly_once(netns):
    """Two client programs share three nodes through a dispyscheduler; random kill
    -9 / restart of the scheduler or a node, and link flaps of nodes."""
    rnd = random.Random(SEED + 1)
    hosts = [netns.add_host(f"m{i}") for i in range(3)]
    nodes = [NodeProc(h) for h in hosts]
    for n in nodes:
        n.start()
    sched = SchedulerProc(netns.add_host("s"), nodes)
    subprocess.run(["rm", "-rf", f"/tmp/dispy-chaos-{sched.host.ns}"], check=True)
    sched.start()
    client = netns.add_host("k")
    njobs = 30 + 5 * ROUNDS
    procs = [
        client.popen_python(
            SHARED_CLIENT,
            sched.host.ip,
            "51349",
            str(njobs),
            str(SEED + k),
            str(PULSE),
            env=ENV,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for k in range(2)
    ]
    for p in procs:
        wait_for_line(p, r"submitted", timeout=60)
    actions = []
    for _ in range(ROUNDS):
        what = rnd.choice(["kill_scheduler", "kill_node", "flap_short", "flap_long"])
        victim = sched if what == "kill_scheduler" else rnd.choice(nodes)
        actions.append((what, victim.host.name))
        # how long the fault lasts is the experiment's parameter, not a wait for a condition
        if what in ("kill_scheduler", "kill_node"):
            victim.kill()
            time.sleep(rnd.uniform(0.2, 1.0))
            victim.start()
        elif what == "flap_short":
            victim.host.link_down()
            time.sleep(rnd.uniform(0.2, 1.0))  # within the 2.5 s window
            victim.host.link_up()
        else:
            victim.host.link_down()
            time.sleep(rnd.uniform(3.0, 4.0))  # past the window: declared dead
            victim.host.link_up()
        time.sleep(rnd.uniform(0.2, 0.8))
    what = f"seed {SEED + 1}, rounds {ROUNDS}, actions {actions}"
    try:
        for p in procs:
            m = wait_for_line(p, r"^(\{.*\})$", timeout=240)
            out = json.loads(m.group(1))
            assert p.wait(30) == 0, what
            ends = {int(k): v for k, v in out["ends"].items()}
            assert ends == {i: 1 for i in range(njobs)}, f"{what}: ends {ends}"
            assert all(s == 11 for s in out["status"].values()), f"{what}: {out['exceptions']}"
            assert out["results"] == {str(i): i * i for i in range(njobs)}, what
    except AssertionError as exc:
        log = "\n".join(read_lines(sched.proc)[-60:])
        clients = "\n".join(ln for p in procs for ln in read_lines(p)[-30:])
        raise AssertionError(
            f"{what}: {exc}\nthe scheduler's log ends:\n{log}\nthe clients' logs end:\n{clients}"
        ) from None
