"""What the dispyscheduler costs; prints ONE JSON object to stdout.

    python benchmarks/shared.py             # full run (about 15 s on 2 idle cores)
    python benchmarks/shared.py --quick     # smoke run, a few seconds
    python benchmarks/shared.py --profile   # also cProfile the dispyscheduler (to stderr
                                            # and ``scheduler_profile`` in the JSON)

Two dispynodes of 1 CPU each on 127.0.0.1 (``dispy.LocalNode``, one node
secret) and a ``dispyscheduler`` in front of both (127.0.0.1, a free port,
the nodes given by address: nothing broadcasts; stopped by its PID).

* ``throughput``: tiny jobs (``echo(x)`` returns x), N submitted then all
  waited, by one client: with a ``JobCluster`` straight to both nodes
  (``direct``) and with a ``SharedJobCluster`` through the scheduler
  (``shared``); rounds alternate, each on a fresh cluster after a warm-up.
  ``scheduler_cost`` = 1 - median(shared) / median(direct).
* ``clients``: 8 client programs (this file with ``--client``) each submit
  M tiny jobs through the scheduler at once.  Each sets its cluster up (one
  job), says ``ready`` and waits for ``go`` on stdin, so setup is not timed:
  aggregate jobs/s is all jobs over the time from ``go`` to the last client
  done; also each client's jobs/s and the spread of their finish times.

Logs go to stderr; stdout carries only the JSON.  A measurement, not a
pass/fail test: ``targets`` says which figures meet their goal.  The machine
may be shared: before each group the script waits (``--settle`` s at most)
for other programs to go quiet and reports the CPUs they used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import os
import platform
import pstats
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import psutil

import dispy
from dispy import discovery

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from core import CpuMeter, r, wait_quiet  # noqa: E402

# Network safety, as in the tests: nothing this script starts (the variable is
# inherited) may send a datagram beyond loopback from this network namespace.
os.environ[discovery.GUARD_ENV] = str(discovery.netns_inode() or "all")

log = logging.getLogger("bench")

#: Longest any single wait may block (a round of jobs, a start, a client).
WAIT_S = 120.0

FULL = {"jobs": 3000, "warmup": 200, "rounds": 3, "clients": 8, "client_jobs": 500}
QUICK = {"jobs": 300, "warmup": 30, "rounds": 1, "clients": 8, "client_jobs": 50}

TARGETS = {"scheduler_cost": ("<=", 0.30)}


def echo(x):
    return x


# -- processes -------------------------------------------------------------------------


class Child:
    """A subprocess whose stdout lines are collected by a thread; its stderr goes
    to ``errfile``.  ``wait_line`` waits (bounded) for a line with a prefix."""

    def __init__(self, cmd, env, errfile: str, stdin=subprocess.DEVNULL) -> None:
        self.errfile = errfile
        self._err = open(errfile, "w")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=self._err, text=True
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, prefix: str, timeout: float) -> str | None:
        """The first stdout line starting with ``prefix``: None if the process
        exited or ``timeout`` passed first."""

        def found():
            return next((ln for ln in self.lines if ln.startswith(prefix)), None)

        with self._cond:
            self._cond.wait_for(
                lambda: found() is not None or self.proc.poll() is not None, timeout=timeout
            )
            return found()

    def err_tail(self, n: int = 3000) -> str:
        try:
            with open(self.errfile, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0, grace: float = 0.0) -> int | None:
        """Let it exit by itself for ``grace`` s, else SIGTERM to this PID (then
        SIGKILL if it lingers); the exit code."""
        if grace and self.proc.poll() is None:
            if self.proc.stdin:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()  # end of input: it may exit
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._reader.join(10)
        self.proc.stdout.close()
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self._err.close()
        return self.proc.returncode


def wait_log(path: str, pred, timeout: float, proc: subprocess.Popen) -> bool:
    """Poll the log file ``path`` until ``pred(text)`` holds (True), the process
    exited or ``timeout`` passed (False)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.02) + 1):
        with open(path, errors="replace") as f:
            if pred(f.read()):
                return True
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling a condition, bounded by the deadline
    return False


class Scheduler(Child):
    """``dispyscheduler`` on 127.0.0.1 (free port) in front of ``nodes``; with
    ``profile_out``, under cProfile (written when it exits on SIGTERM)."""

    def __init__(self, nodes, node_secret, cluster_secret, workdir, profile_out=None) -> None:
        env = dict(os.environ, DISPY_SECRET=node_secret)  # the nodes' secret, not in ps
        pre = ["-m", "cProfile", "-o", profile_out] if profile_out else []
        cmd = [sys.executable, *pre, "-m", "dispyscheduler", "--daemon", "-i", "127.0.0.1",
               "-p", "0", "--cluster_secret", cluster_secret,
               "--dest_path", os.path.join(workdir, "sched"),
               *[a for n in nodes for a in ("-n", n.address)]]  # fmt: skip
        super().__init__(cmd, env, os.path.join(workdir, "scheduler.log"))
        line = self.wait_line("dispyscheduler ready", WAIT_S)
        if line is None:
            self.stop()
            raise RuntimeError(f"dispyscheduler did not start:\n{self.err_tail()}")
        self.port = int(line.split("addr=")[1].split()[0].rsplit(":", 1)[1])
        # clients that come before the nodes are set up start on fewer nodes
        if not wait_log(
            self.errfile, lambda t: t.count("ready with") >= len(nodes), WAIT_S, self.proc
        ):
            self.stop()
            raise RuntimeError(f"dispyscheduler did not set up its nodes:\n{self.err_tail()}")
        self.ps = psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system


# -- throughput ------------------------------------------------------------------------


def wait_cpus(cluster, cpus: int, timeout: float = WAIT_S) -> None:
    """Wait until the cluster's nodes have ``cpus`` CPUs in all (bounded)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.02) + 1):
        if sum(n.cpus for n in cluster.status()[0]) >= cpus:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)  # polling a condition, bounded by the deadline
    raise RuntimeError(f"the cluster did not get {cpus} CPUs within {timeout:g} s")


def run_round(cluster, n: int) -> float:
    """Submit ``echo(i)`` for i < n, then wait; seconds from first submit to all done."""
    t0 = time.perf_counter()
    jobs = [cluster.submit(i) for i in range(n)]
    if not cluster.wait(timeout=WAIT_S, progress=False):
        raise RuntimeError(f"{n} jobs did not end within {WAIT_S:g} s")
    dt = time.perf_counter() - t0
    bad = [j for j in jobs if j.status != dispy.DispyJob.Finished]
    total = sum(j.result for j in jobs if j.status == dispy.DispyJob.Finished)
    if bad or total != n * (n - 1) // 2:
        why = bad[0].exception if bad else ""
        raise RuntimeError(f"{len(bad)} of {n} jobs failed (sum {total}): {why}")
    return dt


def bench_throughput(cfg, nodes, node_secret, sched, cluster_secret) -> dict:
    n = cfg["jobs"]
    rates: dict[str, list[float]] = {"direct": [], "shared": []}
    sched_ms: list[float] = []
    load: list[dict] = []

    def make(mode):
        if mode == "direct":
            return dispy.JobCluster(
                echo, nodes=[nd.address for nd in nodes], secret=node_secret, recover_file=False
            )
        return dispy.SharedJobCluster(
            echo,
            scheduler_node="127.0.0.1",
            scheduler_port=sched.port,
            secret=cluster_secret,
            recover_file=False,
        )

    for i in range(cfg["rounds"]):
        for mode in ("direct", "shared"):
            with make(mode) as cluster:
                wait_cpus(cluster, len(nodes))
                run_round(cluster, cfg["warmup"])
                c0 = sched.cpu_s()
                with CpuMeter() as meter:
                    dt = run_round(cluster, n)
                c1 = sched.cpu_s()
            rates[mode].append(n / dt)
            load.append({"mode": mode, **meter.figures()})
            if mode == "shared":
                sched_ms.append((c1 - c0) / n * 1e3)
            log.info(
                "throughput: round %d %s: %d jobs in %.3f s = %.0f jobs/s (%s)",
                i + 1, mode, n, dt, n / dt, meter.figures(),
            )  # fmt: skip
    direct = statistics.median(rates["direct"])
    shared = statistics.median(rates["shared"])
    return {
        "jobs_per_round": n,
        "direct_jobs_per_s": r(direct, 1),
        "direct_jobs_per_s_runs": [r(x, 1) for x in rates["direct"]],
        "shared_jobs_per_s": r(shared, 1),
        "shared_jobs_per_s_runs": [r(x, 1) for x in rates["shared"]],
        "scheduler_cost": r(1 - shared / direct),
        "scheduler_cpu_ms_per_job": r(statistics.median(sched_ms)),
        "throughput_cpu_load": load,
    }


# -- concurrent client programs ----------------------------------------------------------


def client_main(args) -> int:
    """One client program: set up, say ``ready``, wait for ``go``, run, report."""
    out = sys.stdout
    sys.stdout = sys.stderr  # only our protocol lines on stdout
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    n = args.jobs
    cluster = dispy.SharedJobCluster(
        echo,
        scheduler_node="127.0.0.1",
        scheduler_port=args.port,
        secret=args.secret,
        recover_file=False,
    )
    try:
        if cluster.submit(-1)(timeout=WAIT_S) != -1:
            raise RuntimeError("set-up job failed")
        print("ready", file=out, flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        t0 = time.time()
        jobs = [cluster.submit(i) for i in range(n)]
        done = cluster.wait(timeout=WAIT_S, progress=False)
        t1 = time.time()
        ok = done and all(j.status == dispy.DispyJob.Finished for j in jobs)
        ok = ok and sum(j.result for j in jobs) == n * (n - 1) // 2
        bad = [str(j.exception)[-300:] for j in jobs if j.exception][:2]
        res = {"t0": t0, "t1": t1, "n": n, "ok": ok, "bad": bad}
        print("result " + json.dumps(res), file=out, flush=True)
        # stay (the computation too) until told, by the end of input: the parent
        # measures the CPU time of its child processes, which must not end before
        sys.stdin.readline()
    finally:
        cluster.close()
    return 0


def bench_clients(cfg, sched, cluster_secret, workdir) -> dict:
    k, m = cfg["clients"], cfg["client_jobs"]
    cmd = [sys.executable, os.path.abspath(__file__), "--client", "--port", str(sched.port),
           "--jobs", str(m)]  # fmt: skip
    env = dict(os.environ, BENCH_CLUSTER_SECRET=cluster_secret)  # not on the command line
    env.pop("DISPY_SECRET", None)
    clients = []
    try:
        for i in range(k):
            clients.append(
                Child(cmd, env, os.path.join(workdir, f"client{i}.log"), stdin=subprocess.PIPE)
            )
        deadline = time.monotonic() + WAIT_S
        for i, c in enumerate(clients):
            if c.wait_line("ready", max(0.1, deadline - time.monotonic())) is None:
                raise RuntimeError(f"client {i} did not get ready:\n{c.err_tail()}")
        c0 = sched.cpu_s()
        with CpuMeter() as meter:
            t_go = time.time()
            for c in clients:
                c.proc.stdin.write("go\n")
                c.proc.stdin.flush()
            results = []
            deadline = time.monotonic() + WAIT_S
            for i, c in enumerate(clients):
                line = c.wait_line("result ", max(0.1, deadline - time.monotonic()))
                if line is None:
                    raise RuntimeError(f"client {i} gave no result:\n{c.err_tail()}")
                results.append(json.loads(line[len("result ") :]))
        c1 = sched.cpu_s()
    finally:
        for c in clients:  # end of input: all of them exit at once
            with contextlib.suppress(OSError):
                c.proc.stdin.close()
        codes = [c.stop(grace=30.0) for c in clients]
    bad = [(i, res["bad"]) for i, res in enumerate(results) if not res["ok"]]
    if bad:
        raise RuntimeError(f"clients with failed jobs: {bad}")
    if any(codes):
        raise RuntimeError(f"client exit codes {codes}")
    total = sum(res["n"] for res in results)
    wall = max(res["t1"] for res in results) - t_go
    per = [res["n"] / (res["t1"] - res["t0"]) for res in results]
    finish = [res["t1"] - t_go for res in results]
    log.info(
        "clients: %d x %d jobs: %.0f jobs/s in all, %.3f s; finish spread %.3f s (%s)",
        k, m, total / wall, wall, max(finish) - min(finish), meter.figures(),
    )  # fmt: skip
    return {
        "clients": k,
        "jobs_per_client": m,
        "clients_jobs_per_s": r(total / wall, 1),
        "clients_wall_s": r(wall),
        "clients_per_client_jobs_per_s": [r(x, 1) for x in per],
        "clients_per_client_jobs_per_s_min_median_max": [
            r(min(per), 1),
            r(statistics.median(per), 1),
            r(max(per), 1),
        ],
        "clients_finish_s": [r(x) for x in finish],
        "clients_finish_spread_s": r(max(finish) - min(finish)),
        "clients_start_spread_s": r(max(res["t0"] for res in results) - t_go),
        "clients_scheduler_cpu_ms_per_job": r((c1 - c0) / total * 1e3),
        "clients_cpu_load": meter.figures(),
    }


# -- main ------------------------------------------------------------------------------


def git_commit() -> dict:
    def git(*a):
        return subprocess.run(
            ["git", "-C", HERE, *a], capture_output=True, text=True, timeout=30
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def profile_top(path: str, n: int = 25) -> list:
    """The top ``n`` functions of a cProfile dump, by own time, printed to stderr too."""
    stats = pstats.Stats(path)
    s = io.StringIO()
    stats.stream = s
    stats.sort_stats("tottime").print_stats(n)
    stats.sort_stats("cumulative").print_stats(n)
    print(f"---- cProfile of the dispyscheduler\n{s.getvalue()}", file=sys.stderr)
    total = stats.total_tt or 1.0
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [
        {
            "function": f"{os.path.relpath(f) if f.startswith('/') else f}:{line}({name})",
            "calls": nc,
            "tottime_s": r(tt),
            "tottime_share": r(tt / total),
            "cumtime_s": r(ct),
        }
        for (f, line, name), (_cc, nc, tt, ct, _callers) in rows
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer jobs: a smoke run of a few seconds")
    p.add_argument(
        "--only", choices=("throughput", "clients"), action="append", help="run only this group"
    )
    p.add_argument("--profile", action="store_true", help="run the dispyscheduler under cProfile")
    p.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="before each group, wait up to this many s for other programs to go quiet",
    )
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.client:
        args.secret = os.environ["BENCH_CLUSTER_SECRET"]
        return client_main(args)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    cfg = QUICK if args.quick else FULL
    if args.quick:
        args.settle = min(args.settle, 1.0)
    groups = args.only or ["throughput", "clients"]
    out: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dispy": dispy.__version__,
        "git": git_commit(),
        "quick": args.quick,
        "nodes": "2 dispynodes x 1 CPU on 127.0.0.1, one dispyscheduler in front",
        "profiled": args.profile,
    }
    errors: dict = {}
    durations: dict = {}
    load_before: dict = {}
    t_start = time.perf_counter()
    node_secret = secrets.token_hex(16)
    cluster_secret = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="dispy-bench-shared-")
    profile_out = os.path.join(workdir, "scheduler.prof") if args.profile else None
    sched = None
    # anything a library prints goes to stderr: stdout is the JSON alone
    with contextlib.redirect_stdout(sys.stderr), contextlib.ExitStack() as stack:
        try:
            nodes = [
                stack.enter_context(dispy.LocalNode(cpus=1, secret=node_secret).start(WAIT_S))
                for _ in range(2)
            ]
            sched = Scheduler(nodes, node_secret, cluster_secret, workdir, profile_out)
            log.info("nodes %s; scheduler on port %d", [n.address for n in nodes], sched.port)
            for g in groups:
                others = wait_quiet(args.settle)
                load_before[g] = r(others, 2)
                log.info("== %s (other programs use %.2f CPUs)", g, others)
                t0 = time.perf_counter()
                try:
                    if g == "throughput":
                        out.update(bench_throughput(cfg, nodes, node_secret, sched, cluster_secret))
                    else:
                        out.update(bench_clients(cfg, sched, cluster_secret, workdir))
                except Exception as exc:
                    log.error("%s failed:\n%s", g, traceback.format_exc())
                    errors[g] = f"{type(exc).__name__}: {exc}"
                durations[g] = r(time.perf_counter() - t0, 2)
        except Exception as exc:
            log.error("set-up failed:\n%s", traceback.format_exc())
            errors["setup"] = f"{type(exc).__name__}: {exc}"
        finally:
            if sched is not None:
                code = sched.stop()
                if code:
                    errors["scheduler_exit"] = f"exit code {code}: {sched.err_tail(1500)}"
        if profile_out and os.path.exists(profile_out):
            try:
                out["scheduler_profile"] = profile_top(profile_out)
            except Exception as exc:
                errors["profile"] = f"{type(exc).__name__}: {exc}"
    shutil.rmtree(workdir, ignore_errors=True)

    targets = {}
    for name, (op, goal) in TARGETS.items():
        value = out.get(name)
        if value is None:
            continue
        ok = value >= goal if op == ">=" else value <= goal
        targets[name] = {"value": value, "target": f"{op} {goal}", "met": bool(ok)}
    out["targets"] = targets
    out["seconds"] = durations
    out["other_programs_cpus_before"] = load_before
    out["total_s"] = r(time.perf_counter() - t_start, 2)
    if errors:
        out["errors"] = errors
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
