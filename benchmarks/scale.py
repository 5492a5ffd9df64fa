"""How the client scales with the number of nodes; prints ONE JSON object to stdout.

    python benchmarks/scale.py                  # 1, 8, 32 and 64 nodes (about a minute)
    python benchmarks/scale.py --nodes 1,8      # other counts
    python benchmarks/scale.py --quick          # 1 and 4 nodes, few jobs

For each count N: N ``dispynode -c 1`` daemons on loopback addresses of their
own (127.0.1.1, 127.0.1.2, ...; loopback only, nothing is broadcast), started
together; then one JobCluster naming them all:

* ``nodes_started_s``: until every daemon said it listens; ``nodes_settled_s``:
  until the daemons and their spare computation processes went quiet (N
  nodes on one machine share its 2 CPUs as they start: the cluster is made
  after that, as it would be on N machines whose nodes are up);
* ``ready_s``: from the JobCluster's creation until every node has the
  computation set up (its ``cluster_status`` callback said Initialized);
* ``first_ready_s``: until the first one did;
* ``jobs_s``: ``jobs_per_node`` jobs of ``job_s`` seconds of sleep per node,
  submitted at once, until the last ended (ideal: jobs_per_node x job_s);
* ``client_cpu_ms_per_job``: the client process's CPU time over those jobs.

Then a memory figure: ``held_jobs`` tiny jobs submitted and held by the
program (on one node of 2 CPUs): the client's RSS growth per ended job, and
``map_items`` tiny items through ``cluster.map(chunksize=1000)``: the
client's peak RSS.  Every daemon is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _bench_jobs  # noqa: E402

import dispy  # noqa: E402
from dispy import discovery  # noqa: E402

os.environ[discovery.GUARD_ENV] = str(discovery.netns_inode() or "all")  # never broadcast here
log = logging.getLogger("bench")
SECRET = "scale benchmark secret, long enough"
WAIT_S = 120.0


def start_nodes(n: int, tmp: str) -> list[tuple[subprocess.Popen, str]]:
    env = dict(os.environ, DISPY_SECRET=SECRET)
    procs = []
    for i in range(n):
        ip = f"127.0.1.{i + 1}"
        cmd = [
            sys.executable, "-m", "dispynode", "-i", ip, "--node_port", "0", "-c", "1",
            "--daemon", "--no_discovery", "--dest_path", os.path.join(tmp, f"n{i}"),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        )
    out = []
    for p in procs:
        line = p.stdout.readline().decode()
        if "ready" not in line:
            raise RuntimeError(f"a node did not start: {line!r}")
        out.append((p, line.split("addr=", 1)[1].split()[0]))
    return out


def stop_nodes(nodes) -> None:
    for p, _ in nodes:
        p.terminate()
    for p, _ in nodes:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def settle(nodes, limit_s: float = 60.0, window_s: float = 0.25) -> float:
    """Wait until the nodes' processes (daemons and the spare computation process
    each starts) use under 5% of one CPU together, at most ``limit_s``; the seconds
    waited.  On this one machine, N nodes starting at once share its CPUs: a
    cluster made meanwhile would time their start, not its own setup."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        procs = []
        for p, _ in nodes:
            try:
                top = psutil.Process(p.pid)
                procs += [top, *top.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        before = {}
        for q in procs:
            with contextlib.suppress(psutil.Error):
                before[q] = sum(q.cpu_times()[:2])
        time.sleep(window_s)  # (a measuring window, not a wait for a condition)
        used = 0.0
        for q, t in before.items():
            with contextlib.suppress(psutil.Error):
                used += sum(q.cpu_times()[:2]) - t
        if used / window_s < 0.05:
            break
    return time.perf_counter() - t0


def run_count(n: int, jobs_per_node: int, job_s: float, tmp: str) -> dict:
    t_start = time.perf_counter()
    nodes = start_nodes(n, os.path.join(tmp, str(n)))
    started = time.perf_counter() - t_start
    settled = started + settle(nodes)
    try:
        ready: list[float] = []
        all_ready = threading.Event()
        lock = threading.Lock()

        def status(st, node, job) -> None:
            if st == dispy.DispyNode.Initialized:
                with lock:
                    ready.append(time.perf_counter())
                    if len(ready) == n:
                        all_ready.set()

        t0 = time.perf_counter()
        with dispy.JobCluster(
            _bench_jobs.sleep_for, nodes=[a for _, a in nodes], secret=SECRET,
            cluster_status=status, recover_file=False, depends=[_bench_jobs],
        ) as cluster:  # fmt: skip
            if not all_ready.wait(WAIT_S):
                raise RuntimeError(f"only {len(ready)} of {n} nodes ready in {WAIT_S} s")
            t_ready = time.perf_counter()
            cpu0 = psutil.Process().cpu_times()
            t1 = time.perf_counter()
            js = [cluster.submit(job_s) for _ in range(n * jobs_per_node)]
            cluster.wait(timeout=WAIT_S)
            t2 = time.perf_counter()
            cpu1 = psutil.Process().cpu_times()
            ok = all(j.status == dispy.DispyJob.Finished for j in js)
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        return {
            "nodes": n,
            "nodes_started_s": round(started, 3),
            "nodes_settled_s": round(settled, 3),
            "first_ready_s": round(min(ready) - t0, 3),
            "ready_s": round(t_ready - t0, 3),
            "jobs_s": round(t2 - t1, 3),
            "ideal_jobs_s": round(jobs_per_node * job_s, 3),
            "client_cpu_ms_per_job": round(1000 * cpu / len(js), 3),
            "all_finished": ok,
        }
    finally:
        stop_nodes(nodes)


def run_memory(held: int, items: int, tmp: str) -> dict:
    node = dispy.LocalNode(cpus=2, secret=SECRET).start()
    try:
        with dispy.JobCluster(
            _bench_jobs.identity, nodes=[node.address], secret=SECRET,
            recover_file=False, depends=[_bench_jobs],
        ) as cluster:  # fmt: skip
            cluster.submit(1)(timeout=WAIT_S)
            proc = psutil.Process()
            gc.collect()
            rss0 = proc.memory_info().rss
            t = time.perf_counter()
            jobs = [cluster.submit(i) for i in range(held)]
            cluster.wait(timeout=WAIT_S)
            rate = held / (time.perf_counter() - t)
            gc.collect()
            per_job = (proc.memory_info().rss - rss0) / held
            assert [j.result for j in jobs[:10]] == list(range(10))
            del jobs
            gc.collect()
            peak = [proc.memory_info().rss]
            t = time.perf_counter()
            total = 0
            for i, r in enumerate(cluster.map(range(items), chunksize=1000)):
                total += r
                if i % 50_000 == 0:
                    peak.append(proc.memory_info().rss)
            map_s = time.perf_counter() - t
            assert total == items * (items - 1) // 2
        return {
            "held_jobs": held,
            "held_jobs_per_s": round(rate),
            "rss_bytes_per_ended_job": round(per_job),
            "map_items": items,
            "map_items_per_s": round(items / map_s),
            "map_peak_rss_mb": round(max(peak) / (1 << 20), 1),
        }
    finally:
        node.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1,8,32,64", help="node counts, comma separated")
    p.add_argument("--jobs-per-node", type=int, default=10)
    p.add_argument("--job-s", type=float, default=0.1)
    p.add_argument("--held", type=int, default=200_000, help="tiny jobs held by the program")
    p.add_argument("--items", type=int, default=1_000_000, help="tiny items through map")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.nodes, args.held, args.items = "1,4", 5000, 50_000
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dispy-scale-") as tmp:
        counts = [int(x) for x in args.nodes.split(",")]
        curve = [run_count(n, args.jobs_per_node, args.job_s, tmp) for n in counts]
        memory = run_memory(args.held, args.items, tmp)
    biggest = curve[-1]
    out = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "curve": curve,
        "memory": memory,
        "targets": {
            f"{biggest['nodes']}_nodes_ready_within_1s": biggest["ready_s"] <= 1.0,
            "ended_job_under_1kb": memory["rss_bytes_per_ended_job"] <= 1024,
            "map_million_items_under_300mb": memory["map_peak_rss_mb"] <= 300,
        },
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
