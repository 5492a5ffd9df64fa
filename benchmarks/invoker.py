"""``dispy.invoker`` against LensKit's invoker (parinvoke) and serial; prints ONE
JSON object to stdout.

    pip install -e '.[bench]'            # parinvoke, the library LensKit's invoker became
    python benchmarks/invoker.py          # about a minute; --quick: seconds
    python benchmarks/invoker.py --no-netns

Same run, same model (500,000 x 50 float64 item factors, 200 MB), same 400
tasks ``argmax(items @ u)``, BLAS single-threaded, 2 worker processes:

* ``serial``: the tasks in this process;
* ``parinvoke``: ``InvokeContext().invoker(model, func, 2)`` (persists the
  model into shared memory for a process pool);
* ``dispy``: ``dispy.invoker(model, func, n_jobs=2)`` (a node started on this
  machine, the model placed once, mapped read-only by its job processes).

``startup_s`` is invoker() until it can take work (model persisted/placed);
``map_s`` the 400 tasks; ``speedup`` is serial over startup + map.

Then (unless ``--no-netns``; needs root and iproute2) two hosts of 1 CPU each
in network namespaces made for the run and removed after: the same work on
one host and on both (``two_hosts_speedup``), and each node's memory (PSS of
the daemon and its processes) before the invoker and after its tasks ran
(``node_mb_growth``: about one model per node, not one per job process).  Nothing leaves the namespaces.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # single-threaded BLAS here and in every worker

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import _bench_jobs  # noqa: E402

import dispy  # noqa: E402
from dispy import discovery  # noqa: E402

os.environ[discovery.GUARD_ENV] = str(discovery.netns_inode() or "all")  # no broadcast here
log = logging.getLogger("bench")
MB = 1 << 20


def r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def make_work(n_items: int, k: int, n_tasks: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_items, k)), [rng.standard_normal(k) for _ in range(n_tasks)]


def run_serial(items, users) -> tuple[float, list]:
    t = time.perf_counter()
    out = [_bench_jobs.best_item(items, u) for u in users]
    return time.perf_counter() - t, out


def run_parinvoke(items, users, n_jobs: int):
    try:
        from parinvoke import InvokeContext
    except ImportError:
        return {"error": "parinvoke is not installed: pip install -e '.[bench]'"}, None
    t0 = time.perf_counter()
    ctx = InvokeContext.default()  # shared memory, as LensKit uses it
    ctx.setup()
    inv = ctx.invoker(items, _bench_jobs.best_item, n_jobs)
    try:
        # the pool may start lazily: one task makes sure the model is in place
        first = list(inv.map(users[:1]))
        t1 = time.perf_counter()
        rest = list(inv.map(users[1:]))
        t2 = time.perf_counter()
    finally:
        inv.shutdown()
        ctx.teardown()
    return {"startup_s": r(t1 - t0), "map_s": r(t2 - t1)}, first + rest


def run_dispy(items, users, n_jobs: int, **kw):
    invoker = dispy.invoker  # imported (on first use) outside the timing, as parinvoke is
    t0 = time.perf_counter()
    with invoker(items, _bench_jobs.best_item, n_jobs, **kw) as inv:
        first = list(inv.map(users[:1]))  # as for parinvoke: in place, one task done
        t1 = time.perf_counter()
        out = first + list(inv.map(users[1:]))
        t2 = time.perf_counter()
    return {"startup_s": r(t1 - t0), "map_s": r(t2 - t1)}, out


# -- two hosts in network namespaces ------------------------------------------------------

CLIENT = r"""
import json, os, sys, time
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
sys.path.insert(0, sys.argv[1])
import numpy as np
import _bench_jobs, dispy
import dispy.engine.link
# the namespaces stand for separate machines: the model goes over the network, as
# it would there, not by file name through the /dev/shm these namespaces share
dispy.engine.link.HAND_OVER_DATA = False
n_items, k, n_tasks = map(int, sys.argv[2:5])
hosts = sys.argv[5:]
rng = np.random.default_rng(7)
items = rng.standard_normal((n_items, k))
users = [rng.standard_normal(k) for _ in range(n_tasks)]
out = {}
for label, nodes in (("one_host", hosts[:1]), ("two_hosts", hosts)):
    t0 = time.perf_counter()
    with dispy.invoker(items, _bench_jobs.best_item, nodes=nodes) as inv:
        t1 = time.perf_counter()
        res = list(inv.map(users))
        t2 = time.perf_counter()
        print("mapped", label, flush=True)
        sys.stdin.readline()  # the parent measures the nodes' memory now, model in use
    out[label] = {"startup_s": round(t1 - t0, 3), "map_s": round(t2 - t1, 3)}
    out[label + "_ok"] = res == [_bench_jobs.best_item(items, u) for u in users]
print("RESULT " + json.dumps(out), flush=True)
"""


def node_mb(pid: int) -> float:
    """PSS of a node daemon and its children (shared pages counted once)."""
    import psutil

    total = 0
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.Error, AttributeError):
            pass
    return total / MB


def run_netns(n_items: int, k: int, n_tasks: int) -> dict:
    try:
        from tests.netns import NetnsUnavailable, Network, wait_for_line
    except ImportError as exc:
        return {"skipped": f"tests/netns.py not importable: {exc}"}
    secret = "bench-invoker-" + os.urandom(8).hex()
    env = {"DISPY_SECRET": secret, "PYTHONPATH": os.path.dirname(HERE), "PYTHONUNBUFFERED": "1"}
    try:
        net = Network()
    except NetnsUnavailable as exc:
        return {"skipped": str(exc)}
    try:
        c = net.add_host("bc", "a")
        hosts = [net.add_host(f"bn{i}", "a") for i in (1, 2)]
        nodes = []
        for i, h in enumerate(hosts):
            proc = h.popen(
                [sys.executable, "-m", "dispynode", "-c", "1", "--daemon", "--no_discovery",
                 "--dest_path", f"/tmp/dispy-bench-inv-{os.getpid()}-{i}"],
                env=env, stderr=-2,
            )  # fmt: skip
            wait_for_line(proc, r"^dispynode ready", timeout=60)
            nodes.append(proc)
        client = c.popen(
            [sys.executable, "-c", CLIENT, HERE, str(n_items), str(k), str(n_tasks),
             *[h.ip for h in hosts]],
            env=env, stdin=-1, stderr=-2,
        )  # fmt: skip
        out: dict = {}
        for label in ("one_host", "two_hosts"):
            before = [node_mb(p.pid) for p in nodes]
            wait_for_line(client, rf"^mapped {label}", timeout=600)
            after = [node_mb(p.pid) for p in nodes]
            out[f"{label}_node_mb_growth"] = [
                r(a - b, 1) for a, b in zip(after, before, strict=True)
            ]
            client.stdin.write("\n")
            client.stdin.flush()
        m = wait_for_line(client, r"^RESULT (.*)$", timeout=600)
        out.update(json.loads(m.group(1)))
        one = out["one_host"]["startup_s"] + out["one_host"]["map_s"]
        two = out["two_hosts"]["startup_s"] + out["two_hosts"]["map_s"]
        out["two_hosts_speedup"] = r(one / two, 2)
        out["two_hosts_map_speedup"] = r(out["one_host"]["map_s"] / out["two_hosts"]["map_s"], 2)
        out["model_mb"] = r(n_items * k * 8 / MB, 1)
        return out
    finally:
        net.close()
        for i in (0, 1):
            import shutil

            shutil.rmtree(f"/tmp/dispy-bench-inv-{os.getpid()}-{i}", ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small model, few tasks: seconds")
    p.add_argument("--no-netns", action="store_true", help="skip the two-host runs")
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--tasks", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    n_items = args.items or (20_000 if args.quick else 500_000)
    n_tasks = args.tasks or (40 if args.quick else 400)
    k = 50
    items, users = make_work(n_items, k, n_tasks)
    serial_s, expect = run_serial(items, users)
    par, par_out = run_parinvoke(items, users, 2)
    dsp, dsp_out = run_dispy(items, users, 2)
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "model_mb": r(items.nbytes / MB, 1),
        "tasks": n_tasks,
        "serial_s": r(serial_s),
        "parinvoke": par,
        "dispy": dsp,
        "results_agree": dsp_out == expect and (par_out is None or par_out == expect),
    }
    for fig in (par, dsp):
        if "map_s" in fig:
            fig["speedup"] = r(serial_s / (fig["startup_s"] + fig["map_s"]), 2)
    if "speedup" in par:
        result["targets"] = {
            "dispy_at_least_parinvoke": dsp["speedup"] >= par["speedup"],
            "dispy_startup_no_slower": dsp["startup_s"] <= par["startup_s"],
        }
    if not args.no_netns:
        result["two_hosts"] = run_netns(n_items, k, n_tasks)
        sp = result["two_hosts"].get("two_hosts_speedup")
        if sp is not None:
            result.setdefault("targets", {})["two_hosts_at_least_1.8x"] = sp >= 1.8
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
