"""dispyscheduler (SharedJobCluster) across real network partitions: hosts made
of network namespaces (tests/netns.py), one subnet.

Topology of every test: a scheduler host S runs ``dispyscheduler`` with two
explicit nodes (``-n N1 -n N2``: no broadcast), N1 and N2 run ``dispynode``
(2 CPUs each), and a client host C runs a ``SharedJobCluster`` program.  The
scheduler's pulse is 1 s, so its liveness window for a node is 5 s (five
pulses).  Cutting a host's cable (``Host.link_down``) drops its frames
silently; ``ss -K`` (inside a namespace) destroys TCP connections there, as
a NAT or firewall forgetting them would.

Each job x writes marker files ``started-x-IP-R`` and ``done-x-IP-R`` (IP: the
node it runs on, R: random, one per run, so a second run on the same node
shows too) in a folder shared by all hosts (namespaces share the file
system), and returns x*x.  The client prints one JSON line at the end with,
per job: result, status, exception and the statuses its callback saw.

What must hold in every scenario: each job ends exactly once (one callback,
with a terminal status), with the right result if Finished, and the client
exits 0 in bounded time.  Scenarios:

1. the scheduler's connection to N1 dropped while N1 runs jobs, cable back
   inside the window: the scheduler reconnects and RESUMEs, nothing is lost
   or run twice;
2. N1's cable out past the window: reentrant jobs rerun on N2, non-reentrant
   ones end Abandoned naming N1; N1's late results (once it is back) end
   nothing a second time;
3. dispyscheduler killed -9 mid-run and restarted on the same port and
   folder: every job ends once, having run once (also those that ended on
   the nodes while it was down);
4. the client's cable out for 3 s: it reconnects to the scheduler, which kept
   its computation (its --zombie_interval, an hour by default, is much longer);
   every job finishes once.

Durations named ``OUTAGE_*`` are deliberate outage lengths (how long a cable
stays out): test parameters, not waits for a condition.  Every wait for a
condition (a marker file, an output line, a row in a node's result store)
has a deadline.  Every process is started by the test in a namespace host
and stopped by PID (``Host.kill_all`` / ``os.kill``).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time

import pytest

from dispy import DispyJob

from .installed import program
from .netns import read_lines, wait_for_line

pytestmark = pytest.mark.netns

NODE_SECRET = "shared-netns-node-secret"
CLUSTER_SECRET = "shared-netns-cluster-secret"
ENV = {
    "DISPY_SECRET": NODE_SECRET,
    "DISPY_SECRET_FILE": None,
    "DISPY_NODES": None,
    "PYTHONUNBUFFERED": "1",
}
SCHED_PORT = 51349  # fixed: a restarted scheduler must be found where it was
SCHED_PULSE = 1.0  # the scheduler's --pulse_interval
WINDOW = 5 * SCHED_PULSE  # its liveness window for a node (five pulses)

#: the scheduler's log lines saying a node is gone (its jobs rerun or abandoned)
NODE_LOST = r"declared dead|node \S+ \(\S+\) lost"

FINISHED = DispyJob.Finished
ABANDONED = DispyJob.Abandoned

# The client.  argv[1]: JSON config: sched, port (the scheduler's address), secret,
# reentrant, pulse (pulse_interval), njobs, sleep (seconds each job sleeps, or
# {node IP: seconds}), mdir (marker folder), me (the client's IP: a job finds its own
# address by a UDP connect() to it, which sends nothing), job_timeout, hold (0, or
# seconds to wait for a line on stdin after every job ended, before closing).
# Prints "node up IP N" / "node closed IP N" as cluster_status reports the scheduler
# (N: how many times so far), "submitted", "all ended", "holding"/"released" and, last,
# one JSON line.  Its dispy debug log (on stdout too) tells which results it ignored.
CLIENT = r"""
import collections, json, logging, re, select, sys, threading, time
import dispy

def compute(x, sleep, mdir, me):
    import os, socket, time, uuid
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect((me, 9))  # picks the route and so our address; sends nothing
    ip = probe.getsockname()[0]
    probe.close()
    if isinstance(sleep, dict):
        sleep = sleep.get(ip, 0)
    run = uuid.uuid4().hex  # one marker per run, also if a job runs twice on a node
    open(os.path.join(mdir, "started-%d-%s-%s" % (x, ip, run)), "w").close()
    time.sleep(sleep)
    open(os.path.join(mdir, "done-%d-%s-%s" % (x, ip, run)), "w").close()
    return x * x

cfg = json.loads(sys.argv[1])
t0 = time.monotonic()
out_lock = threading.Lock()

def say(line):
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

logging.basicConfig(stream=sys.stdout,
                    format="%(asctime)s client %(name)s %(levelname)s %(message)s")
logging.getLogger("dispy").setLevel(logging.DEBUG)
logging.getLogger("dispy.transport").setLevel(logging.INFO)

ignored = []  # job uids whose (late) results the client ignored

class Ignored(logging.Handler):
    def emit(self, record):
        m = re.match(r"(?:late )?result for job (\d+) .*ignored", record.getMessage())
        if m:
            ignored.append(int(m.group(1)))

logging.getLogger("dispy").addHandler(Ignored())

lock = threading.Lock()
ends = collections.defaultdict(list)  # job id -> statuses the callback saw
cond = threading.Condition()
up, closed = collections.Counter(), collections.Counter()

def callback(job):
    with lock:
        ends[job.id].append(job.status)

def status(st, node, job):
    if st == dispy.DispyNode.Initialized:
        with cond:
            up[node.ip_addr] += 1
            n = up[node.ip_addr]
            cond.notify_all()
        say("node up %s %d" % (node.ip_addr, n))
    elif st == dispy.DispyNode.Closed:
        with cond:
            closed[node.ip_addr] += 1
            n = closed[node.ip_addr]
            cond.notify_all()
        say("node closed %s %d" % (node.ip_addr, n))

cluster = dispy.SharedJobCluster(
    compute, scheduler_node=cfg["sched"], scheduler_port=cfg["port"], secret=cfg["secret"],
    reentrant=cfg["reentrant"], recover_file=False, pulse_interval=cfg["pulse"],
    callback=callback, cluster_status=status,
)
with cond:
    assert cond.wait_for(lambda: up[cfg["sched"]] >= 1, timeout=30), "scheduler not up"
jobs = [cluster.submit_job_id(x, x, cfg["sleep"], cfg["mdir"], cfg["me"])
        for x in range(cfg["njobs"])]
say("submitted")
for job in jobs:
    job(timeout=cfg["job_timeout"])
say("all ended %.2f" % (time.monotonic() - t0))
if cfg["hold"]:
    say("holding")
    ready, _, _ = select.select([sys.stdin], [], [], cfg["hold"])
    say("released" if ready else "hold timed out")
with lock:
    snapshot = {str(j.id): {"uid": j._uid, "result": j.result, "status": j.status,
                            "exception": j.exception} for j in jobs}
with cond:  # close() below reports the scheduler Closed too
    closed_before = dict(closed)
    up_before = dict(up)
cluster.close(timeout=30)
with lock:  # close() joined the callback thread: these are final
    for k, v in snapshot.items():
        v["callbacks"] = list(ends.get(int(k), []))
say(json.dumps({"jobs": snapshot, "up": up_before, "closed": closed_before,
                "ignored": ignored, "elapsed": round(time.monotonic() - t0, 2)}))
"""


# ------------------------------------------------------------------------- helpers

_programs: list = []  # (label, process) the running test started, for its log


@pytest.fixture
def programs():
    """Prints the output of the programs the test started when it ends (shown
    when it fails)."""
    _programs.clear()
    yield _programs
    for label, proc in _programs:
        print(f"----- {label} (pid {proc.pid}, exit {proc.poll()})")
        print("\n".join(read_lines(proc)))
    _programs.clear()


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


def log_count(proc, pattern: str) -> int:
    """How many lines of ``proc``'s output so far match ``pattern`` (re.search)."""
    rx = re.compile(pattern)
    return sum(1 for line in read_lines(proc) if rx.search(line))


def wait_log(proc, pattern: str, count: int = 1, timeout: float = 10.0) -> None:
    """Wait until ``count`` lines of ``proc``'s output match ``pattern``."""

    def seen() -> bool:
        if log_count(proc, pattern) >= count:
            return True
        if proc.poll() is not None:  # it ended: no more lines will come
            raise AssertionError(
                f"exit {proc.returncode} before {count} line(s) matching {pattern!r}:\n"
                + "\n".join(read_lines(proc)[-40:])
            )
        return False

    try:
        wait_until(seen, timeout, f"{count} line(s) matching {pattern!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + "\n".join(read_lines(proc)[-40:])) from None


def start_node(host, tmp_path):
    """dispynode (2 CPUs, default port) on ``host``; not waited for (see ``wait_ready``)."""
    proc = host.popen(
        [*program("dispynode"), "--daemon", "-c", "2",
         "--dest_path", str(tmp_path / f"node-{host.name}")],
        env=ENV, stderr=subprocess.STDOUT,
    )  # fmt: skip
    _programs.append((f"dispynode on {host.name} {host.ip}", proc))
    return proc


def node_db(host, tmp_path) -> str:
    return str(tmp_path / f"node-{host.name}" / "results.db")


def start_scheduler(s, nodes, tmp_path, label: str = "dispyscheduler"):
    """dispyscheduler on host ``s`` in front of ``nodes``; returns once it has said it
    is ready and reported every node ready."""
    proc = s.popen(
        [*program("dispyscheduler"), "--daemon", "-i", s.ip,
         "-p", str(SCHED_PORT), "--cluster_secret", CLUSTER_SECRET,
         "--dest_path", str(tmp_path / "sched"), "--pulse_interval", str(SCHED_PULSE),
         *[a for n in nodes for a in ("-n", n.ip)]],
        env=ENV, stderr=subprocess.STDOUT,
    )  # fmt: skip
    _programs.append((f"{label} on {s.name} {s.ip}", proc))
    wait_log(proc, rf"^dispyscheduler ready: addr={re.escape(s.ip)}:{SCHED_PORT}\b", timeout=30)
    for n in nodes:
        wait_log(proc, ready_line(n), timeout=30)
    return proc


def ready_line(node) -> str:
    """The scheduler's log line saying it has (again) a connection to ``node``."""
    return rf"node \S+ \({re.escape(node.ip)}:\d+\) ready with \d+ CPUs"


class Net:
    """The four hosts and the daemons of one test."""

    def __init__(self, netns, tmp_path, tag: str):
        self.s = netns.add_host(f"{tag}s")
        self.n1 = netns.add_host(f"{tag}n1")
        self.n2 = netns.add_host(f"{tag}n2")
        self.c = netns.add_host(f"{tag}c")
        self.tmp_path = tmp_path
        self.node1 = start_node(self.n1, tmp_path)
        self.node2 = start_node(self.n2, tmp_path)
        for proc in (self.node1, self.node2):
            wait_for_line(proc, r"^dispynode ready", timeout=30)
        self.sched = start_scheduler(self.s, [self.n1, self.n2], tmp_path)
        self.mdir = str(tmp_path / "markers")
        os.makedirs(self.mdir)

    def start_client(self, **cfg):
        cfg.setdefault("job_timeout", 60)
        cfg.setdefault("hold", 0)
        cfg.update(sched=self.s.ip, port=SCHED_PORT, secret=CLUSTER_SECRET, me=self.c.ip,
                   mdir=self.mdir)  # fmt: skip
        proc = self.c.popen_python(
            CLIENT, json.dumps(cfg), env=ENV, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE, cwd=str(self.tmp_path),
        )  # fmt: skip
        _programs.append((f"client on {self.c.name} {self.c.ip}", proc))
        proc.started_at = time.monotonic()
        return proc

    def markers(self, kind: str, host=None) -> set[int]:
        """Job ids with a ``kind`` (started/done) marker, on ``host`` (or any)."""
        out = set()
        for name in os.listdir(self.mdir):
            k, x, ip, _run = name.split("-", 3)
            if k == kind and (host is None or ip == host.ip):
                out.add(int(x))
        return out

    def runs(self) -> collections.Counter:
        """How many times each job started, on any node."""
        return collections.Counter(
            int(name.split("-", 2)[1])
            for name in os.listdir(self.mdir)
            if name.startswith("started-")
        )


def release(proc) -> None:
    """Let a client started with ``hold`` close its cluster."""
    wait_for_line(proc, r"^holding$", timeout=5)
    proc.stdin.write("close\n")
    proc.stdin.flush()


def client_result(proc, timeout: float) -> dict:
    """The client's JSON line; asserts it exits 0 within ``timeout`` s of its start."""
    left = timeout - (time.monotonic() - proc.started_at)
    m = wait_for_line(proc, r"^(\{.*\})$", timeout=max(left, 0.1))
    proc.wait(timeout=max(timeout - (time.monotonic() - proc.started_at), 5))
    took = time.monotonic() - proc.started_at
    assert proc.returncode == 0, "\n".join(read_lines(proc)[-80:])
    assert took < timeout, f"client took {took:.1f} s"
    return json.loads(m.group(1))


def assert_each_job_ended_once(out: dict, expected: dict[int, int]) -> None:
    """Job x ended once (one callback) with status ``expected[x]``; x*x if Finished."""
    jobs = out["jobs"]
    assert sorted(int(k) for k in jobs) == sorted(expected), out
    for k, j in jobs.items():
        x, status = int(k), expected[int(k)]
        assert j["callbacks"] == [status], f"job {x}: callback saw {j['callbacks']}: {j}"
        assert j["status"] == status, f"job {x}: {j}"
        if status == FINISHED:
            assert j["result"] == x * x, f"job {x}: {j}"
        else:
            assert j["result"] is None, f"job {x}: {j}"


def outage(host, seconds: float, since: float) -> None:
    """Keep ``host``'s cable out until ``seconds`` after ``since``, then plug it
    back.  The length is a deliberate test parameter."""
    left = since + seconds - time.monotonic()
    if left > 0:
        time.sleep(left)  # the outage itself: a chosen duration, not a wait for a condition
    host.link_up()


def drop_connections(host, peer: str) -> None:
    """Destroy ``host``'s TCP connections to ``peer`` (``ss -K`` in its namespace):
    its program gets an error at once; the peer (cable out) hears nothing."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    ss = shutil.which("ss", path=path)
    assert ss, "ss (iproute2) not found"
    res = host.run([ss, "-K", "-t", "-n", "dst", peer], timeout=10)
    assert res.returncode == 0, res.stderr
    # a new connection may be on its way already (SYN-SENT): with the cable out it stalls
    left = host.run([ss, "-t", "-n", "-H", "exclude", "syn-sent", "dst", peer], timeout=10)
    assert left.returncode == 0, left.stderr
    assert left.stdout.strip() == "", f"connections to {peer} survived ss -K: {left.stdout}"


def db_rows(path: str, table: str = "results") -> int:
    """Rows of ``table`` committed in the SQLite file at ``path``, read-only: a node's
    result store (``results``: results not acknowledged yet) or the scheduler's
    state (``jobs``: jobs whose client has no result yet)."""
    if not os.path.exists(path):
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


# --------------------------------------------------------------------------- tests

OUTAGE_DROP = 2.0  # test 1: N1's cable out this long, inside the 5 s window
OUTAGE_LONG = 8.0  # test 2: N1's cable out this long, past the 5 s window
OUTAGE_CLIENT = 3.0  # test 4: the client's cable out this long


def test_dropped_node_connection_resumes_within_window(netns, tmp_path, programs):
    """8 non-reentrant jobs of 1.5 s (4 per node).  Once N1 runs two, its cable is
    cut and the scheduler's connection to it destroyed (ss -K in S); N1 ends jobs
    meanwhile (their results go into its dead connection).  Cable back after 2 s:
    the scheduler reconnects inside the window and RESUMEs; N1 still has all its
    jobs (running or results owed), none is declared lost, rerun or abandoned."""
    net = Net(netns, tmp_path, "a")
    n1 = net.n1
    proc = net.start_client(njobs=8, sleep=1.5, pulse=1.0, reentrant=False)
    wait_for_line(proc, r"^submitted$", timeout=30)
    wait_until(lambda: len(net.markers("started", n1)) >= 2, 15, "two jobs started on N1")
    cut = time.monotonic()
    n1.link_down()
    drop_connections(net.s, n1.ip)
    wait_log(net.sched, rf"node {re.escape(n1.ip)}:\d+: .*; reconnecting", timeout=5)
    # a job ends on N1 while the scheduler cannot hear it: its result is owed
    wait_until(lambda: net.markers("done", n1), OUTAGE_DROP, "a job done on N1 during the outage")
    outage(n1, OUTAGE_DROP, since=cut)
    out = client_result(proc, timeout=45)
    assert_each_job_ended_once(out, dict.fromkeys(range(8), FINISHED))
    assert set(net.runs().values()) == {1}, f"a job ran twice: {sorted(os.listdir(net.mdir))}"
    assert not log_count(net.sched, NODE_LOST), "\n".join(read_lines(net.sched))
    assert log_count(net.sched, ready_line(n1)) == 2, "the scheduler did not reconnect to N1"
    assert out["closed"] == {} and out["up"] == {net.s.ip: 1}, out  # the client saw nothing
    m = re.search(r"resumed computation \w+: known, (\d+) job\(s\) on the node, "
                  r"(\d+) result\(s\) owed", "\n".join(read_lines(net.node1)))  # fmt: skip
    assert m, "N1 got no RESUME:\n" + "\n".join(read_lines(net.node1))
    running, owed = int(m.group(1)), int(m.group(2))
    assert owed >= 1 and running + owed == len(net.markers("started", n1)), m.group(0)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_node_cut_past_window(netns, tmp_path, programs, reentrant):
    """8 jobs: 3 s on N1, 0.5 s on N2 (4 per node).  Once N1 runs two, its cable
    is out for 8 s: after the 5 s window the scheduler declares it dead.
    reentrant: N1's jobs (running or queued there) rerun on N2 before N1 is back;
    non-reentrant: they end Abandoned, the reason naming N1; the others finish.
    N1 runs its jobs to the end meanwhile; once it is back, the scheduler
    reconnects and gets those results late; the client stays until N1's store
    is empty (every such result acknowledged): none ends a job a second time."""
    net = Net(netns, tmp_path, "b" if reentrant else "c")
    n1, n2 = net.n1, net.n2
    proc = net.start_client(njobs=8, sleep={n1.ip: 3.0, n2.ip: 0.5}, pulse=1.0,
                            reentrant=reentrant, hold=60)  # fmt: skip
    wait_for_line(proc, r"^submitted$", timeout=30)
    wait_until(lambda: len(net.markers("started", n1)) >= 2, 15, "two jobs started on N1")
    cut = time.monotonic()
    n1.link_down()
    wait_log(net.sched, rf"node {re.escape(n1.ip)}:\d+ silent for [\d.]+ s \(5 pulses\): declared dead",
             timeout=WINDOW + 3)  # fmt: skip
    declared = time.monotonic() - cut
    wait_log(net.sched, rf"node \S+ \({re.escape(n1.ip)}:\d+\) lost", timeout=2)
    if reentrant:  # N2 (idle) reruns N1's jobs: every job has run on N2 now
        wait_until(lambda: net.markers("started", n2) == set(range(8)), 3, "all jobs on N2")
    else:  # N1's jobs end Abandoned, N2's had finished: all ended
        wait_for_line(proc, r"^all ended", timeout=3)
    assert time.monotonic() - cut < OUTAGE_LONG, "too slow: N1's cable is back already"
    outage(n1, OUTAGE_LONG, since=cut)
    # N1 is back: the scheduler reconnects and RESUMEs; N1 sends its results
    wait_log(net.sched, ready_line(n1), count=2, timeout=15)
    db = node_db(n1, tmp_path)

    def n1_results_acknowledged() -> bool:
        return net.markers("started", n1) <= net.markers("done", n1) and db_rows(db) == 0

    wait_until(n1_results_acknowledged, 15, "N1's late results all acknowledged")
    release(proc)
    out = client_result(proc, timeout=60)
    on_n1 = net.markers("started", n1)
    assert len(on_n1) >= 2, on_n1
    assert (WINDOW - SCHED_PULSE) - 0.5 <= declared < WINDOW + 2, f"declared after {declared:.1f} s"
    runs = net.runs()
    if reentrant:
        assert_each_job_ended_once(out, dict.fromkeys(range(8), FINISHED))
        # N1's jobs ran there (to the end) and once more on N2; the others once, on N2
        assert runs == {x: 2 if x in on_n1 else 1 for x in range(8)}, sorted(os.listdir(net.mdir))
    else:
        assert runs == dict.fromkeys(range(8), 1), sorted(os.listdir(net.mdir))
        expected = {x: ABANDONED if x in on_n1 else FINISHED for x in range(8)}
        assert_each_job_ended_once(out, expected)
        assert not on_n1 & net.markers("started", n2), "a non-reentrant job ran twice"
        for x in on_n1:
            why = out["jobs"][str(x)]["exception"] or ""
            assert re.search(rf"node \S+ \({re.escape(n1.ip)}:\d+\) was lost", why), why
    assert out["closed"] == {} and out["up"] == {net.s.ip: 1}, out  # the client saw nothing


@pytest.mark.parametrize("on_disk", [True, False], ids=["jobs-on-disk", "jobs-just-sent"])
def test_scheduler_killed_and_restarted(netns, tmp_path, programs, on_disk):
    """12 non-reentrant jobs of 1 s: 8 go to the nodes (2 run, 2 wait on each), 4
    wait at the scheduler.  Once 4 run, dispyscheduler is killed -9; jobs end on
    the nodes while it is down; it is started again with the same arguments (port,
    --dest_path) and asks the nodes (RESUME) for their jobs; the client
    reconnects.  Every job ends once, Finished, having run once.

    jobs-on-disk: killed once its state file holds the 12 jobs: it restores them,
    takes over those the nodes have and queues the rest again.  jobs-just-sent:
    killed at once (jobs are written 0.1 s after they come, so usually none is):
    it learns of the jobs on the nodes from their RESUME answers, and the client
    sends again the ones it does not list."""
    net = Net(netns, tmp_path, "d" if on_disk else "f")
    proc = net.start_client(njobs=12, sleep=1.0, pulse=1.0, reentrant=False)
    wait_for_line(proc, r"^submitted$", timeout=30)
    wait_until(lambda: len(net.markers("started")) >= 4, 15, "four jobs started")
    state = str(tmp_path / "sched" / "scheduler.db")
    if on_disk:
        wait_until(lambda: db_rows(state, "jobs") == 12, 5, "12 jobs in the scheduler's state")
    done_at_kill = net.markers("done")
    os.kill(net.sched.pid, signal.SIGKILL)
    assert net.sched.wait(10) == -signal.SIGKILL
    # the nodes go on: jobs end (their results kept for the scheduler) while it is down
    wait_until(lambda: len(net.markers("done") - done_at_kill) >= 2, 5, "jobs done meanwhile")
    second = start_scheduler(net.s, [net.n1, net.n2], tmp_path, label="dispyscheduler (restarted)")
    out = client_result(proc, timeout=45)
    assert_each_job_ended_once(out, dict.fromkeys(range(12), FINISHED))
    runs = net.runs()
    assert sorted(runs) == list(range(12)) and set(runs.values()) == {1}, runs
    wait_log(second, r"restored 1 computation\(s\)", timeout=1)
    for node in (net.node1, net.node2):  # each node told the new scheduler what it had
        wait_log(node, r"resumed computation \w+: known,", timeout=1)
    if on_disk:
        log = "\n".join(read_lines(second))
        m = re.search(r"restored 1 computation\(s\) with (\d+) job\(s\)", log)
        assert m and 12 - len(done_at_kill) <= int(m.group(1)) <= 12, log
        m = re.search(r"restart: (\d+) job\(s\) on nodes again, (\d+) queued again", log)
        assert m, log
        on_nodes, queued = int(m.group(1)), int(m.group(2))
        assert on_nodes >= 4 and queued >= 1, m.group(0)  # both paths taken
    assert out["closed"] == {} and out["up"] == {net.s.ip: 2}, out  # reconnected once


def test_client_cable_out_reconnects(netns, tmp_path, programs):
    """12 non-reentrant jobs of 1 s; client pulse 0.4 s (it gives up on a silent
    connection after 2 s).  Once 4 run, the client's cable is out for 3 s: jobs
    end meanwhile (their results go into the dead connection); the client
    reconnects once the cable is back, RESUMEs (the scheduler kept its
    computation: its zombie_interval is an hour) and gets every result: all
    Finished once, each job run once; the nodes saw nothing."""
    net = Net(netns, tmp_path, "e")
    proc = net.start_client(njobs=12, sleep=1.0, pulse=0.4, reentrant=False)
    wait_for_line(proc, r"^submitted$", timeout=30)
    wait_until(lambda: len(net.markers("started")) >= 4, 15, "four jobs started")
    cut = time.monotonic()
    done_at_cut = net.markers("done")
    net.c.link_down()
    wait_until(lambda: len(net.markers("done") - done_at_cut) >= 2, OUTAGE_CLIENT,
               "jobs done during the outage")  # fmt: skip
    outage(net.c, OUTAGE_CLIENT, since=cut)
    wait_for_line(proc, rf"^node up {re.escape(net.s.ip)} 2$", timeout=10)
    out = client_result(proc, timeout=45)
    assert_each_job_ended_once(out, dict.fromkeys(range(12), FINISHED))
    runs = net.runs()
    assert sorted(runs) == list(range(12)) and set(runs.values()) == {1}, runs
    assert out["closed"] == {}, out  # the scheduler was never declared dead
    client_log = "\n".join(read_lines(proc))
    assert re.search(rf"node {re.escape(net.s.ip)}:{SCHED_PORT} reconnected: \d+ job\(s\) there, "
                     r"computation kept", client_log), client_log  # fmt: skip
    assert log_count(net.sched, r"client \S+ authenticated") == 2
    assert not log_count(net.sched, NODE_LOST), "\n".join(read_lines(net.sched))
