"""Fault tolerance across real network partitions (hosts made of network
namespaces, tests/netns.py): a node's cable is pulled and plugged back while
its jobs run, or its dispynode is killed -9 and restarted.

The client runs in a namespace host of its own, so cutting a node's link
(``Host.link_down``: its bridge port loses carrier, frames are dropped
silently) is a true partition between client and node: the TCP connection
stalls, nobody gets a reset.  Each client run prints one JSON line at the end
with, per job: result, status, how many times ``callback`` saw it end, and the
node that ended it; the tests assert on that.

What must hold in every scenario: each job ends exactly once (one callback
with a terminal status), with the right result if Finished, and the client
program returns (exit 0) in bounded time.

Scenarios: a short outage inside the liveness window (nothing happens); a long
one past it, reentrant (jobs rerun on another node; the late results of the
first are ignored, or end the jobs and cancel the reruns) and non-reentrant
(jobs Abandoned; late results ignored); dispynode killed -9 and restarted with
the results only in its disk store (RESUME finds them); a connection dropped
inside the window (RESUME: jobs still on the node, results sent again); a
reconnect refused (node dead at once).

Durations written as ``OUTAGE_*`` are deliberate outage lengths (how long the
cable stays out): test parameters, not waits for a condition.  Every wait for
a condition (a marker file, an output line, a row in the node's result store)
has a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time

import pytest

from .installed import program
from .netns import read_lines, wait_for_line

pytestmark = pytest.mark.netns

SECRET = "recovery-netns-secret"
ENV = {"DISPY_SECRET": SECRET, "DISPY_NODES": None, "PYTHONUNBUFFERED": "1"}

DISPY_FINISHED = 11
DISPY_ABANDONED = 10
PROBE = 1000  # job id (and argument) of the probe jobs the client sends after a reconnect

# The client.  argv[1]: JSON config:
#   nodes: node IPs given to JobCluster; later: IPs added with allocate_node() after
#   the jobs are submitted (so all the jobs go to `nodes` first); njobs, sleep (seconds
#   each job sleeps, or {node IP: seconds}), pulse (pulse_interval), reentrant, mdir
#   (marker folder), me (the client's IP: jobs find their own address by a UDP
#   connect() to it, which sends nothing); probe: IPs of nodes that must reconnect
#   after the jobs ended, each then runs one more job (PROBE) -- its result comes
#   after every result that node still owed (one ordered connection, and the node
#   runs it after the jobs it has), so by then every late result has reached the
#   client.
# Job x (compute) creates marker files mdir/started-x-IP and, right before it
# returns x*x, mdir/done-x-IP (IP: the node's address).
# Prints "node up IP N" / "node closed IP N" as cluster_status reports them (N: how
# many times so far), "submitted", "all ended" (after job() returned for every job)
# and, last, one JSON line.  The client's debug log shows which late results it ignored
# and which reruns a late result cancelled; the JSON has those job uids too.
CLIENT = r"""
import collections, json, logging, re, sys, threading, time
import dispy

def compute(x, sleep, mdir, me):
    import os, socket, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((me, 9))  # no datagram is sent: only the route (and so our address) is chosen
    ip = s.getsockname()[0]
    s.close()
    if isinstance(sleep, dict):  # seconds per node
        sleep = sleep.get(ip, 0)
    open(os.path.join(mdir, "started-%s-%s" % (x, ip)), "w").close()
    time.sleep(sleep)
    open(os.path.join(mdir, "done-%s-%s" % (x, ip)), "w").close()
    return x * x

cfg = json.loads(sys.argv[1])
t0 = time.monotonic()

def say(line):  # one write per line: threads print too
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

logging.basicConfig(stream=sys.stdout, format="%(asctime)s client %(name)s %(levelname)s %(message)s")
logging.getLogger("dispy").setLevel(logging.DEBUG)
logging.getLogger("dispy.transport").setLevel(logging.INFO)

# late results the client ignored, by job uid (from the client's debug log)
ignored, rerun_cancelled = [], []
class Late(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        m = re.match(r"(?:result for job|late result for job) (\d+)", msg)
        if m and "ignored" in msg:
            ignored.append(int(m.group(1)))
        m = re.match(r"job (\d+) ended on .*its rerun on .* is cancelled", msg)
        if m:
            rerun_cancelled.append(int(m.group(1)))
logging.getLogger("dispy").addHandler(Late())

lock = threading.Lock()
ends = collections.defaultdict(list)  # job id -> statuses the callback saw
up, closed = collections.Counter(), collections.Counter()
cond = threading.Condition()

def callback(job):
    with lock:
        ends[job.id].append(job.status)

ran = set()  # jobs the program saw Running

def status(st, node, job):
    if job is not None and st == dispy.DispyJob.Running:
        with lock:
            ran.add(job.id)
        say("running %s" % job.id)
    elif st == dispy.DispyNode.Initialized:
        with cond:
            up[node.ip_addr] += 1
            cond.notify_all()
        say("node up %s %d" % (node.ip_addr, up[node.ip_addr]))
    elif st == dispy.DispyNode.Closed:
        with cond:
            closed[node.ip_addr] += 1
            cond.notify_all()
        say("node closed %s %d" % (node.ip_addr, closed[node.ip_addr]))

def wait_up(ips, n, timeout):
    with cond:
        return cond.wait_for(lambda: all(up[ip] >= n for ip in ips), timeout=timeout)

cluster = dispy.JobCluster(
    compute, nodes=cfg["nodes"], secret=cfg["secret"], reentrant=cfg["reentrant"],
    pulse_interval=cfg["pulse"], callback=callback, cluster_status=status,
)
assert wait_up(cfg["nodes"], 1, 30), "nodes not up: %r" % dict(up)
jobs = [cluster.submit_job_id(x, x, cfg["sleep"], cfg["mdir"], cfg["me"]) for x in range(cfg["njobs"])]
if cfg.get("later"):
    cluster.allocate_node(cfg["later"])
    assert wait_up(cfg["later"], 1, 30), "later nodes not up: %r" % dict(up)
say("submitted")
waited = {}
for job in jobs:
    t = time.monotonic()
    job(timeout=cfg["job_timeout"])
    waited[job.id] = round(time.monotonic() - t, 2)
say("all ended %.2f" % (time.monotonic() - t0))
probes = {}
for ip in cfg.get("probe", []):
    ok = wait_up([ip], 2, 30)
    say("probe %s %s" % (ip, "reconnected" if ok else "did not reconnect"))
    if ok:
        pj = cluster.submit_node(ip, PROBE_X, 0, cfg["mdir"], cfg["me"])
        probes[ip] = pj(timeout=30) if pj is not None else None
with lock:
    snapshot = {str(j.id): {"uid": j._uid, "result": j.result, "status": j.status,
                            "exception": j.exception, "ip": j.ip_addr, "ran": j.id in ran}
                for j in jobs}
with cond:  # close() below reports every node Closed too
    closed_before = dict(closed)  # (a Closed still queued for the callback thread is missed)
cluster.close()
with lock:  # close() joined the callback thread: these counts are final
    for k, v in snapshot.items():
        v["callbacks"] = list(ends.get(int(k), []))
say(json.dumps({
    "jobs": snapshot, "probes": probes, "waited": waited, "up": dict(up), "closed": closed_before,
    "ignored": ignored, "rerun_cancelled": rerun_cancelled,
    "elapsed": round(time.monotonic() - t0, 2),
}))
""".replace("PROBE_X", str(PROBE))


def dest_path(host) -> str:
    return f"/tmp/dispy-test-{host.ns}"


def start_node(host, cpus: int):
    """dispynode on ``host`` (default port), its stdout+stderr a pipe we read."""
    proc = host.popen(
        [
            *program("dispynode"),
            "--daemon",
            "-c",
            str(cpus),
            "--dest_path",
            dest_path(host),
        ],
        env=ENV,
        stderr=subprocess.STDOUT,
    )
    _started.append((f"dispynode on {host.name} {host.ip}", proc))
    wait_for_line(proc, r"dispynode ready", timeout=30)
    return proc


@pytest.fixture
def fresh_dest():
    """Removes the nodes' --dest_path folders (ours: named after our namespaces)
    before and after the test; prints the output of the programs the test
    started (shown when it fails)."""
    made: list[str] = []
    _started.clear()

    def use(*hosts):
        for h in hosts:
            path = dest_path(h)
            shutil.rmtree(path, ignore_errors=True)
            made.append(path)

    yield use
    for label, proc in _started:
        print(f"----- {label} (pid {proc.pid}, exit {proc.poll()})")
        print("\n".join(read_lines(proc)))
    _started.clear()
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


_started: list = []  # (label, process) of the running test, for its log


def start_client(host, tmp_path, **cfg):
    cfg.setdefault("later", [])
    cfg.setdefault("probe", [])
    cfg.setdefault("job_timeout", 60)
    cfg.update(secret=SECRET, me=host.ip, mdir=str(tmp_path / "markers"))
    os.makedirs(cfg["mdir"], exist_ok=True)
    proc = host.popen_python(
        CLIENT, json.dumps(cfg), env=ENV, stderr=subprocess.STDOUT, cwd=str(tmp_path)
    )
    _started.append((f"client on {host.name} {host.ip}", proc))
    proc.started_at = time.monotonic()
    proc.mdir = cfg["mdir"]
    return proc


def client_result(proc, timeout: float) -> dict:
    """The client's JSON line; asserts it exits 0 within ``timeout`` s of its start."""
    left = timeout - (time.monotonic() - proc.started_at)
    m = wait_for_line(proc, r"^(\{.*\})$", timeout=max(left, 0.1))
    proc.wait(timeout=max(timeout - (time.monotonic() - proc.started_at), 5))
    took = time.monotonic() - proc.started_at
    assert proc.returncode == 0, "\n".join(read_lines(proc)[-80:])
    assert took < timeout, f"client took {took:.1f} s"
    return json.loads(m.group(1))


def wait_until(pred, timeout: float, what: str, poll: float = 0.02):
    """Poll ``pred`` until it returns something true (returned), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(poll)  # poll interval of a condition with a deadline


def markers(mdir: str, kind: str, ip: str | None = None) -> set[int]:
    """Job ids with a ``kind`` (started/done) marker, on node ``ip`` (or any)."""
    out = set()
    for name in os.listdir(mdir):
        k, x, where = name.split("-", 2)
        if k == kind and (ip is None or where == ip):
            out.add(int(x))
    return out


def assert_each_job_ended_once(out: dict, njobs: int, status: int) -> None:
    jobs = out["jobs"]
    assert sorted(int(k) for k in jobs) == list(range(njobs))
    for k, j in jobs.items():
        x = int(k)
        assert j["callbacks"] == [status], f"job {x}: callback saw {j['callbacks']}: {j}"
        assert j["status"] == status, f"job {x}: {j}"
        if status == DISPY_FINISHED:
            assert j["result"] == x * x, f"job {x}: {j}"
        else:
            assert j["result"] is None, f"job {x}: {j}"


def outage(host, seconds: float, since: float | None = None) -> None:
    """Keep ``host``'s cable out until ``seconds`` after ``since`` (default: now),
    then plug it back.  The length is a deliberate test parameter."""
    end = (since if since is not None else time.monotonic()) + seconds
    left = end - time.monotonic()
    if left > 0:
        time.sleep(left)  # the outage itself: a chosen duration, not a wait for a condition
    host.link_up()


# --------------------------------------------------------------------------- tests

OUTAGE_SHORT = 2.0  # well inside the 10 s liveness window of test 1
OUTAGE_LONG = 5.0  # past the 2.5 s liveness window of test 2


def test_short_outage_within_window_loses_nothing(netns, tmp_path, fresh_dest):
    """One node (2 CPUs), pulse 2 s (window 10 s), non-reentrant; 6 jobs of 2 s.
    The cable is out for 2 s while jobs run: the node is never declared dead and
    every job finishes once, with its result."""
    node, client = netns.add_host("r1node"), netns.add_host("r1cli")
    fresh_dest(node)
    start_node(node, 2)
    proc = start_client(client, tmp_path, nodes=[node.ip], njobs=6, sleep=2.0, pulse=2.0,
                        reentrant=False)  # fmt: skip
    wait_for_line(proc, r"^submitted", timeout=30)
    wait_until(lambda: len(markers(proc.mdir, "started")) >= 2, 15, "two jobs started")
    node.link_down()
    outage(node, OUTAGE_SHORT)
    out = client_result(proc, timeout=45)
    assert_each_job_ended_once(out, 6, DISPY_FINISHED)
    assert {j["ip"] for j in out["jobs"].values()} == {node.ip}
    assert out["closed"] == {}, f"node declared dead during a {OUTAGE_SHORT} s outage: {out}"
    assert out["up"] == {node.ip: 1}


@pytest.mark.parametrize("b_sleep", [1.0, 12.0], ids=["rerun-ends-first", "late-result-first"])
def test_long_outage_reentrant_jobs_rerun_elsewhere_once(netns, tmp_path, fresh_dest, b_sleep):
    """Nodes A (2 CPUs) and B (4 CPUs), pulse 0.5 s (window 2.5 s), reentrant.
    All 4 jobs (3 s each on A) go to A (B joins after they are submitted); A's
    cable is out for 5 s while it runs them: A is declared dead, its jobs rerun
    on B.  A's results, computed during the outage, reach the client after A
    reconnects (a probe job on A proves it): each job still ends exactly once,
    Finished.

    rerun-ends-first: on B the jobs take 1 s, so the reruns end them before A is
    back (A's announcement when its cable is back brings the client at once,
    5 s after the cut; reruns of 3 s from 2.5 s on would end after that): A's
    late results are ignored.  late-result-first: on B they take
    12 s, so A's late results come while the reruns still run: they end the
    jobs, and the reruns on B are cancelled."""
    a, b = netns.add_host("r2a"), netns.add_host("r2b")
    client = netns.add_host("r2cli")
    fresh_dest(a, b)
    start_node(a, 2)
    start_node(b, 4)
    proc = start_client(client, tmp_path, nodes=[a.ip], later=[b.ip], njobs=4,
                        sleep={a.ip: 3.0, b.ip: b_sleep}, pulse=0.5, reentrant=True,
                        probe=[a.ip])  # fmt: skip
    wait_for_line(proc, r"^submitted", timeout=30)
    wait_until(lambda: len(markers(proc.mdir, "started", a.ip)) >= 2, 15, "two jobs started on A")
    cut = time.monotonic()
    a.link_down()
    # the window (2.5 s) passes: A is declared dead, its jobs are requeued to B
    wait_for_line(proc, rf"^node closed {a.ip} 1$", timeout=10)
    declared = time.monotonic() - cut
    # B (4 CPUs, idle) starts all four at once
    wait_until(lambda: markers(proc.mdir, "started", b.ip) == {0, 1, 2, 3}, 5, "all rerun on B")
    assert time.monotonic() - cut < OUTAGE_LONG, "the reruns on B began only after the outage"
    outage(a, OUTAGE_LONG, since=cut)
    out = client_result(proc, timeout=50)
    assert_each_job_ended_once(out, 4, DISPY_FINISHED)
    # the window counts from the last message heard, up to one pulse before the cut
    assert 2.5 - 0.5 <= declared < 6, f"A declared dead {declared:.1f} s after the cut"
    assert out["probes"] == {a.ip: PROBE * PROBE}, "A did not come back after the outage"
    assert markers(proc.mdir, "done", a.ip) >= {0, 1, 2, 3}  # A ran them all to the end
    # A's own results (computed during or after the outage) all reached the client
    # before the probe's: each was ignored (the rerun on B had ended the job) or
    # taken (the job ended on A, its rerun was cancelled); never a second end.
    uids = {j["uid"]: k for k, j in out["jobs"].items()}
    if b_sleep <= 3.0:
        assert {j["ip"] for j in out["jobs"].values()} == {b.ip}, out
        assert set(uids) <= set(out["ignored"]), f"A's late results did not arrive: {out}"
    else:
        assert {j["ip"] for j in out["jobs"].values()} == {a.ip}, out
        assert set(uids) <= set(out["rerun_cancelled"]), out
        # cancelled: no rerun on B ran to its end (they would take 12 s)
        assert markers(proc.mdir, "done", b.ip) == set(), sorted(os.listdir(proc.mdir))


def test_long_outage_non_reentrant_jobs_abandoned_once(netns, tmp_path, fresh_dest):
    """One node (2 CPUs), pulse 0.5 s (window 2.5 s), non-reentrant; 4 jobs of 2 s.
    The cable is cut while they run and stays out until the client has given
    up: every job ends Abandoned once, job() returns.  Then the cable is back; the
    node's results (kept for the client) arrive late and are ignored."""
    node, client = netns.add_host("r3node"), netns.add_host("r3cli")
    fresh_dest(node)
    start_node(node, 2)
    proc = start_client(client, tmp_path, nodes=[node.ip], njobs=4, sleep=2.0, pulse=0.5,
                        reentrant=False, probe=[node.ip], job_timeout=30)  # fmt: skip
    wait_for_line(proc, r"^submitted", timeout=30)
    wait_until(lambda: len(markers(proc.mdir, "started", node.ip)) >= 2, 15, "two jobs started")
    cut = time.monotonic()
    node.link_down()
    # job() returns for every job once the liveness window has passed (not after
    # job_timeout: the JSON's `waited` and the statuses tell)
    wait_for_line(proc, r"^all ended", timeout=15)
    ended = time.monotonic() - cut
    node.link_up()
    out = client_result(proc, timeout=50)
    assert_each_job_ended_once(out, 4, DISPY_ABANDONED)
    # the window counts from the last message heard, up to one pulse before the cut
    assert 2.5 - 0.5 <= ended < 8, f"jobs ended {ended:.1f} s after the cut"
    assert out["closed"] == {node.ip: 1}
    for j in out["jobs"].values():
        assert "lost" in (j["exception"] or ""), j
    assert out["probes"] == {node.ip: PROBE * PROBE}, "the node did not come back"
    # every job's result did come back after the reconnect, and was ignored
    assert sorted(markers(proc.mdir, "done", node.ip) - {PROBE}) == [0, 1, 2, 3]
    uids = sorted(j["uid"] for j in out["jobs"].values())
    assert sorted(set(out["ignored"]) & set(uids)) == uids, out


def store_rows(path: str) -> int:
    """Results the node's store holds (committed), read without writing."""
    if not os.path.exists(path):
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    try:
        return conn.execute("SELECT count(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def kill_and_restart_node(netns, tmp_path, fresh_dest, tag: str):
    """One node (2 CPUs), pulse 2 s (window 10 s), non-reentrant; 4 jobs of 1 s.
    The cable is cut once they run (and the node's end of the connection
    destroyed); they finish on the node (results stored on disk, none sent);
    dispynode is killed -9 and started again on the same --dest_path and port;
    the cable is back.  Returns (node host, new dispynode, client output)."""
    node, client = netns.add_host(f"{tag}node"), netns.add_host(f"{tag}cli")
    fresh_dest(node)
    first = start_node(node, 2)
    proc = start_client(client, tmp_path, nodes=[node.ip], njobs=4, sleep=1.0, pulse=2.0,
                        reentrant=False)  # fmt: skip
    wait_for_line(proc, r"^submitted", timeout=30)
    wait_until(lambda: len(markers(proc.mdir, "started", node.ip)) >= 2, 15, "two jobs started")
    cut = time.monotonic()
    node.link_down()
    # The node's end of the connection is destroyed too, so the results are never
    # sent, only kept: else the killed process's kernel socket would deliver what
    # the process had written into it once the cable is back (seen with an earlier
    # version of this test), and the disk store would not be what is tested.
    drop_connections(node, client.ip)
    wait_for_line(first, r"lost its client; jobs go on", timeout=5)
    wait_until(lambda: markers(proc.mdir, "done", node.ip) == {0, 1, 2, 3}, 10, "jobs done")
    db = os.path.join(dest_path(node), "results.db")
    # the results are committed to the node's store (not only computed)
    wait_until(lambda: store_rows(db) == 4, 5, "4 results in the node's store")
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    second = start_node(node, 2)
    assert any("kept from an earlier run" in ln for ln in read_lines(second)), read_lines(second)
    assert time.monotonic() - cut < 8, "too slow: the client's 10 s window is nearly over"
    node.link_up()
    return node, second, client_result(proc, timeout=45)


def test_results_survive_node_kill_and_restart(netns, tmp_path, fresh_dest):
    """kill_and_restart_node: the client reconnects within the window and gets
    every result from the node's disk store: all Finished, once."""
    node, second, out = kill_and_restart_node(netns, tmp_path, fresh_dest, "r4")
    assert_each_job_ended_once(out, 4, DISPY_FINISHED)
    assert {j["ip"] for j in out["jobs"].values()} == {node.ip}
    assert out["closed"] == {}, f"node declared dead: {out}"
    # the client resumed with the new dispynode, which sent the 4 results from its disk
    wait_for_line(second, r"resumed computation \w+: not known here, 0 job\(s\) on the node, "
                  r"4 result\(s\) owed", timeout=5)  # fmt: skip


def node_children(proc) -> list[str]:
    """The processes ``proc`` started that still exist (zombies too), described;
    not the spare computation process an idle node keeps started ahead (it has
    no computation yet: its working folder is the node's, not a computation's)."""
    import re

    import psutil

    out = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            status = child.status()
        except psutil.NoSuchProcess:
            continue  # gone meanwhile
        try:
            cmd = " ".join(child.cmdline())[:80]
            cwd = child.cwd()
        except psutil.Error:  # a zombie has none
            cmd = cwd = ""
        if "dispynode._process_main" in cmd and not re.search(r"_[0-9a-f]{32}$", cwd):
            continue  # the spare
        out.append(f"pid {child.pid} {status} {cmd} in {cwd}".rstrip())
    return out


def test_close_after_resume_leaves_nothing_on_restarted_node(netns, tmp_path, fresh_dest):
    """kill_and_restart_node, then: the client's close() must close its computation
    on the restarted node too (as it does on a node it never lost: there the
    computation's process is gone as soon as the client has closed)."""
    node, second, out = kill_and_restart_node(netns, tmp_path, fresh_dest, "r7")
    assert_each_job_ended_once(out, 4, DISPY_FINISHED)
    left: list[str] = []

    def nothing_left() -> bool:
        left[:] = node_children(second)
        return not left

    try:
        wait_until(nothing_left, 3, "the node's computation closed")
    except AssertionError:
        raise AssertionError(
            f"after the client closed, dispynode still has {left}; its log:\n"
            + "\n".join(read_lines(second)[-5:])
        ) from None


def drop_connections(host, peer: str) -> None:
    """Destroy ``host``'s TCP sockets to ``peer`` (``ss -K``, inside its namespace),
    as a NAT or firewall that forgets the connection would: the program owning
    such a socket gets an error at once; the peer hears nothing (the cable is out).
    (Only sockets still owned by a process: the kernel may go on sending what an
    orphaned socket holds, whatever ss -K says.)"""
    ss = shutil.which("ss", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"]))  # fmt: skip
    assert ss, "ss (iproute2) not found"
    res = host.run([ss, "-K", "-t", "-n", "dst", peer], timeout=10)
    assert res.returncode == 0, res.stderr
    # (a new connection may be on its way already: with the cable out it cannot get further)
    left = host.run([ss, "-t", "-n", "-H", "exclude", "syn-sent", "dst", peer], timeout=10)
    assert left.returncode == 0, left.stderr
    assert left.stdout.strip() == "", f"connections to {peer} survived ss -K: {left.stdout}"


OUTAGE_RESET = 2.5  # test 5: the cable is out this long (inside the 10 s window)


def test_dropped_connection_resumes_within_window(netns, tmp_path, fresh_dest):
    """One node (2 CPUs), pulse 2 s (window 10 s), non-reentrant; 6 jobs of 2 s.
    The cable is cut while jobs run and the client's TCP connection is destroyed
    (as a NAT or firewall dropping its state would; the node does not notice).
    The node's results of the jobs ending meanwhile go into the dead connection.
    The cable is back after 2.5 s: the client reconnects within the window and
    RESUMEs: the node still runs some jobs and sends again the results it was
    not acknowledged; every job finishes once, none abandoned or rerun."""
    node, client = netns.add_host("r5node"), netns.add_host("r5cli")
    fresh_dest(node)
    first = start_node(node, 2)
    proc = start_client(client, tmp_path, nodes=[node.ip], njobs=6, sleep=2.0, pulse=2.0,
                        reentrant=False)  # fmt: skip
    wait_for_line(proc, r"^submitted", timeout=30)
    wait_until(lambda: len(markers(proc.mdir, "started", node.ip)) >= 2, 15, "two jobs started")
    wait_until(  # (the client saw them start: their starts are not what is cut off)
        lambda: sum(ln.startswith("running ") for ln in read_lines(proc)) >= 2, 10,
        "the client saw two jobs running",
    )  # fmt: skip
    cut = time.monotonic()
    node.link_down()
    drop_connections(client, node.ip)
    # two jobs end on the node while the client is cut off: their results are sent
    # on the node's (unknowingly dead) connection
    wait_until(lambda: len(markers(proc.mdir, "done", node.ip)) >= 2, 10, "two jobs done")
    outage(node, OUTAGE_RESET, since=cut)
    out = client_result(proc, timeout=45)
    assert_each_job_ended_once(out, 6, DISPY_FINISHED)
    assert {j["ip"] for j in out["jobs"].values()} == {node.ip}
    assert out["closed"] == {}, f"node declared dead: {out}"
    assert out["up"] == {node.ip: 2}, "the client did not reconnect (or more than once)"
    m = wait_for_line(first, r"resumed computation \w+: known, (\d+) job\(s\) on the node, "
                      r"(\d+) result\(s\) owed", timeout=5)  # fmt: skip
    running, owed = int(m.group(1)), int(m.group(2))
    assert owed >= 2 and running + owed == 4, m.group(0)
    # the jobs that started while the client was cut off were Running once it was back
    # (the node's RESUMED says which of its jobs started), before they ended
    assert all(j["ran"] for j in out["jobs"].values()), out["jobs"]
    # no job ran twice
    assert all(len([n for n in os.listdir(proc.mdir) if n.startswith(f"started-{x}-")]) == 1
               for x in range(6)), sorted(os.listdir(proc.mdir))  # fmt: skip


def test_refused_reconnect_declares_node_dead_at_once(netns, tmp_path, fresh_dest):
    """One node (2 CPUs), pulse 2 s (window 10 s), non-reentrant; 2 jobs of 30 s.
    dispynode is killed -9 while they run (the cable stays in): the connection
    ends, the reconnect is refused, so the node is dead at once -- the jobs end
    Abandoned, once each, well before the 10 s window has passed."""
    node, client = netns.add_host("r6node"), netns.add_host("r6cli")
    fresh_dest(node)
    first = start_node(node, 2)
    proc = start_client(client, tmp_path, nodes=[node.ip], njobs=2, sleep=30.0, pulse=2.0,
                        reentrant=False)  # fmt: skip
    wait_for_line(proc, r"^submitted", timeout=30)
    wait_until(lambda: markers(proc.mdir, "started", node.ip) == {0, 1}, 15, "both jobs started")
    killed = time.monotonic()
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    wait_for_line(proc, r"^all ended", timeout=15)
    ended = time.monotonic() - killed
    out = client_result(proc, timeout=45)
    assert_each_job_ended_once(out, 2, DISPY_ABANDONED)
    assert ended < 5, f"jobs ended {ended:.1f} s after the kill (window 10 s)"
    for j in out["jobs"].values():
        assert "lost" in (j["exception"] or ""), j
