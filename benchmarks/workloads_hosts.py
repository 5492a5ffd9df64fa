"""Distributed LSI and LDA across two "hosts": ``dispy.workloads`` against
gensim's own distributed mode (Pyro4); prints ONE JSON object to stdout.

    pip install -e '.[bench]'                        # brings gensim and Pyro4
    sudo python benchmarks/workloads_hosts.py        # 20,000 docs x 5,000 terms
    sudo python benchmarks/workloads_hosts.py --quick             # ~3,000 x 1,000
    sudo python benchmarks/workloads_hosts.py --docs 50000 --terms 10000 --lda-passes 2

Needs root and iproute2.  The hosts are Linux network namespaces made for the
run with ``tests/netns.py`` (a client host ``wc`` and node hosts ``wn1``,
``wn2`` on one private subnet) and removed after; nothing is sent outside
them.  They share this machine's CPUs (2 here): each node host runs jobs on
1 CPU (``dispynode -c 1``; one gensim worker), the client host runs the
client, gensim's dispatchers and the Pyro4 name server.

One client process in ``wc`` draws the corpus (``synthetic_corpus``, as
``benchmarks/workloads.py``; 1% more documents held out) and runs, in order:

* ours on one host, then two: ``JobCluster(call, nodes=[...], setup=preload)``
  in a ``ClusterRunner``; seconds exclude the nodes' start;
* gensim serial (the reference; LSI also ``onepass=True``, the algorithm of
  gensim's distributed LSI, which refuses ``onepass=False``);
* gensim distributed with one worker (on ``wn1``), then two (``wn2`` added):
  name server ``python -m Pyro4.naming -x`` (no broadcast responder) on the
  client's address, ``lsi_dispatcher``/``lda_dispatcher`` in ``wc``, one
  ``lsi_worker`` and one ``lda_worker`` per node host.

No Pyro4 lookup broadcasts: gensim's LSI scripts take no name-server options,
``pyro_daemon`` finds its own address with a bare ``locateNS()``, and Pyro4's
``locateNS(host=None)`` broadcasts whatever ``PYRO_NS_HOST`` says; so every
gensim process runs through ``PIN`` below, which makes lookups go to
``$PYRO_NS_HOST:$PYRO_NS_PORT`` directly and makes broadcast sockets an error.

LDA: ours makes gensim's serial sequence of updates on any number of hosts
(an M-step per ``update_every`` chunks; each update's E-step is cut into a
job per CPU); gensim's distributed mode makes an M-step per ``update_every``
x workers chunks, so with two workers it makes half the M-steps of one (its
held-out bound shows it).

gensim's distributed LDA is slow here for a reason of its own, seen in the
dispatcher's log: each reset of a worker starts one more ``requestjob`` loop,
and the loops left over keep calling ``getjob`` (a 1 s blocking wait) through
the worker's one proxy to the dispatcher, so a finished job's ``jobdone``
waits seconds for that proxy, longer at each M-step.

Every wait has a deadline (``--timeout`` per run); a run that fails or times
out is reported in ``errors`` and the rest is still printed.  Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # single-threaded BLAS here and in every process started

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from dispy import discovery  # noqa: E402

os.environ[discovery.GUARD_ENV] = str(discovery.netns_inode() or "all")  # no broadcast here
NS_PORT = 9090

# Run first in every gensim/Pyro4 process: name-server lookups go to the
# configured host, never by broadcast, and a broadcast socket is an error.
PIN = r"""
import Pyro4, Pyro4.core, Pyro4.naming, Pyro4.socketutil
_locate = Pyro4.core._locateNS
def _pinned(host=None, port=None, broadcast=True, hmac_key=None):
    return _locate(host or Pyro4.config.NS_HOST, port or Pyro4.config.NS_PORT, False, hmac_key)
def _no_broadcast(*args, **kwargs):
    raise RuntimeError("Pyro4 broadcast is disabled in this benchmark")
Pyro4.core._locateNS = Pyro4.locateNS = Pyro4.naming.locateNS = _pinned
Pyro4.socketutil.createBroadcastSocket = _no_broadcast
"""

# ``python -c PIN+LAUNCH module args...``: ``python -m module args...`` after PIN.
LAUNCH = r"""
import runpy, sys
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

# The client (in ``wc``): prints ``RESULT <name> <json>`` per run, ``WANT <n>``
# when it needs gensim's processes with n workers (answered on stdin: ``go``
# or the reason not to), then ``DONE``.  Run after PIN.
CLIENT = r"""
import json, logging, os, sys, time, traceback
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
cfg = json.loads(sys.argv[1])
import dispy, dispy.engine.link, dispy.workloads as wl
from dispy.workloads import corpus, lda, lsi
import gensim
from gensim.matutils import Sparse2Corpus
# separate machines in spirit: data goes over the network, not through the /dev/shm
# these namespaces share
dispy.engine.link.HAND_OVER_DATA = False
docs, terms, held = cfg["docs"], cfg["terms"], cfg["heldout"]
drawn = corpus.synthetic_corpus(docs + held, terms, 20, doc_length=100.0, seed=cfg["seed"])
train, heldout = drawn.matrix[:docs], drawn.matrix[docs:]
bow = Sparse2Corpus(train, documents_columns=False)
held_bow = list(Sparse2Corpus(heldout, documents_columns=False))
id2word = gensim.utils.FakeDict(terms)

def emit(name, value):
    print("RESULT " + name + " " + json.dumps(value), flush=True)

emit("corpus", {"nonzeros": int(train.nnz), "words": float(train.sum())})

def guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        sys.stderr.write(traceback.format_exc())
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}

def ours(nodes):
    t0 = time.perf_counter()
    cluster = dispy.JobCluster(wl.call, nodes=nodes, secret=cfg["secret"], setup=wl.preload)
    try:
        runner = wl.ClusterRunner(cluster, job_timeout=cfg["timeout"])
        runner.wait_nodes(len(nodes))
        out = {"hosts": len(nodes), "node_setup_seconds": time.perf_counter() - t0}
        def run_lsi():
            r = lsi.lsi(train, cfg["lsi_k"], runner, oversample=cfg["oversample"],
                        power_iters=cfg["power_iters"], chunksize=cfg["lsi_chunksize"], seed=cfg["seed"])
            return {"wall_seconds": r.seconds, "passes": r.passes,
                    "singular_values_top5": [float(x) for x in r.s[:5]]}
        def run_lda():
            m = lda.lda(train, cfg["lda_k"], runner, passes=cfg["lda_passes"],
                        chunksize=cfg["lda_chunksize"], update_every=cfg["update_every"],
                        seed=cfg["seed"])
            b, w = lda.heldout_bound(m, heldout, runner, chunksize=cfg["lda_chunksize"])
            return {"wall_seconds": m.seconds, "updates": m.updates,
                    "heldout_per_word_bound": (b + m.topic_bound()) / w}
        out["lsi"], out["lda"] = guard(run_lsi), guard(run_lda)
        return out
    finally:
        cluster.close()

def gensim_lsi(**kw):
    t0 = time.perf_counter()
    m = gensim.models.LsiModel(bow, num_topics=cfg["lsi_k"], id2word=id2word,
                               chunksize=cfg["lsi_chunksize"], power_iters=cfg["power_iters"],
                               extra_samples=cfg["oversample"], **kw)
    return {"wall_seconds": time.perf_counter() - t0, "workers": m.numworkers,
            "onepass": kw.get("onepass"), "singular_values_top5": [float(x) for x in m.projection.s[:5]]}

def gensim_lda(**kw):
    t0 = time.perf_counter()
    m = gensim.models.LdaModel(bow, num_topics=cfg["lda_k"], id2word=id2word, passes=cfg["lda_passes"],
                               chunksize=cfg["lda_chunksize"], update_every=cfg["update_every"],
                               iterations=50, gamma_threshold=1e-3, eval_every=None,
                               random_state=cfg["seed"], **kw)
    s = time.perf_counter() - t0
    return {"wall_seconds": s, "workers": m.numworkers,
            "heldout_per_word_bound": float(m.log_perplexity(held_bow))}

for n in (1, 2):
    emit(f"ours_{n}", guard(ours, cfg["nodes"][:n]))
emit("gensim_serial", {"lsi": guard(gensim_lsi, onepass=False),
                       "lsi_onepass": guard(gensim_lsi, onepass=True), "lda": guard(gensim_lda)})
ns_conf = {"host": os.environ["PYRO_NS_HOST"], "port": int(os.environ["PYRO_NS_PORT"]), "broadcast": False}
for n in (1, 2):
    print(f"WANT {n}", flush=True)
    reply = sys.stdin.readline().strip()
    if reply != "go":
        emit(f"gensim_dist_{n}", {"error": reply or "no answer from the parent"})
        continue
    emit(f"gensim_dist_{n}", {"lsi": guard(gensim_lsi, onepass=True, distributed=True),
                              "lda": guard(gensim_lda, distributed=True, ns_conf=ns_conf)})
print("DONE", flush=True)
"""


def log(msg: str) -> None:
    print(f"[workloads_hosts {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Gensim:
    """gensim's distributed processes: name server and the two dispatchers on the
    client host, one LSI and one LDA worker per node host.  Started afresh for
    each worker count (gensim's LDA workers keep polling the dispatcher after a
    run, so a second run on the same processes would start from that state)."""

    REGISTERED = r"registered with nameserver \(URI '([^']+)'\)"

    def __init__(self, client_host, env: dict) -> None:
        self.client, self.env = client_host, env
        self.procs: list = []
        self.uris: dict[str, dict[str, str]] = {}
        self.ns_args = ["--host", client_host.ip, "--port", str(NS_PORT), "--no-broadcast", "-v"]

    def _launch(self, host, label: str, argv: list[str], pin: bool = True):
        full = [sys.executable, "-c", PIN + LAUNCH, *argv] if pin else [sys.executable, *argv]
        proc = host.popen(full, env={**self.env, "PYRO_HOST": host.ip}, stderr=subprocess.STDOUT)
        self.procs.append((label, proc))
        return proc

    def start(self, worker_hosts: list) -> None:
        from tests.netns import wait_for_line

        self.stop()
        uris = self.uris[f"{len(worker_hosts)}_worker(s)"] = {}
        ns_argv = ["-m", "Pyro4.naming", "-n", self.client.ip, "-p", str(NS_PORT), "-x"]
        ns = self._launch(self.client, "name_server", ns_argv, pin=False)
        uris["name_server"] = wait_for_line(ns, r"NS running on (\S+)", timeout=60).group(1)
        self._launch(self.client, "lsi_dispatcher", ["gensim.models.lsi_dispatcher"])
        self._launch(self.client, "lda_dispatcher", ["gensim.models.lda_dispatcher", *self.ns_args])
        for h in worker_hosts:  # all started at once, then waited for
            self._launch(h, f"lsi_worker_{h.name}", ["gensim.models.lsi_worker"])
            self._launch(h, f"lda_worker_{h.name}", ["gensim.models.lda_worker", *self.ns_args])
        for label, proc in self.procs[1:]:
            uris[label] = wait_for_line(proc, self.REGISTERED, timeout=60).group(1)
        log(f"gensim up: {uris}")

    def stop(self) -> None:
        """Stop the processes started, by PID (SIGTERM, then SIGKILL after 10 s)."""
        procs, self.procs = self.procs, []
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def run(args) -> dict:
    from tests.netns import NetnsUnavailable, Network, WaitTimeout, wait_for_line

    secret = "bench-wlh-" + os.urandom(8).hex()
    tmp = tempfile.mkdtemp(prefix="dispy-bench-wlh-")
    base_env = {"PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    out: dict = {"runs": {}, "errors": {}}
    try:
        net = Network()
    except NetnsUnavailable as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        return {"skipped": str(exc)}
    try:
        client_host = net.add_host("wc", "a")
        hosts = [net.add_host(f"wn{i}", "a") for i in (1, 2)]
        out["addresses"] = {h.name: h.ip for h in (client_host, *hosts)}
        t0 = time.perf_counter()
        for i, h in enumerate(hosts):
            dest = os.path.join(tmp, f"node{i + 1}")
            proc = h.popen(
                [sys.executable, "-m", "dispynode", "-c", "1", "--daemon", "--no_discovery",
                 "--dest_path", dest],
                env={**base_env, "DISPY_SECRET": secret}, stderr=subprocess.STDOUT,
            )  # fmt: skip
            wait_for_line(proc, r"^dispynode ready", timeout=60)
        out["node_start_seconds"] = time.perf_counter() - t0
        log(f"dispynodes up on {[h.ip for h in hosts]}")
        pyro_env = {**base_env, "PYRO_SERIALIZERS_ACCEPTED": "pickle", "PYRO_SERIALIZER": "pickle",
                    "PYRO_NS_HOST": client_host.ip, "PYRO_NS_PORT": str(NS_PORT)}  # fmt: skip
        cfg = {**vars(args), "secret": secret, "nodes": [h.ip for h in hosts]}
        client = client_host.popen(
            [sys.executable, "-c", PIN + CLIENT, json.dumps(cfg)],
            env={**pyro_env, "DISPY_SECRET": secret}, stdin=subprocess.PIPE, stderr=None, cwd=tmp,
        )  # fmt: skip
        gensim = Gensim(client_host, pyro_env)
        for _ in range(20):  # 6 RESULT lines, 2 WANT lines, DONE
            try:
                m = wait_for_line(client, r"^(RESULT|WANT|DONE) ?(\S*) ?(.*)$", args.timeout)
            except WaitTimeout as exc:
                out["errors"]["client"] = str(exc)[-3000:]
                break
            kind, name, rest = m.groups()
            if kind == "RESULT":
                out["runs"][name] = json.loads(rest)
                log(f"{name} done")
            elif kind == "WANT":  # gensim's processes with this many workers, afresh
                answer = "go"
                try:
                    gensim.start(hosts[: int(name)])
                except (WaitTimeout, OSError, RuntimeError) as exc:
                    gensim.stop()
                    answer = f"gensim's Pyro4 processes did not start: {exc}"[-3000:]
                client.stdin.write(answer.replace("\n", " | ") + "\n")
                client.stdin.flush()
            else:
                break
        gensim.stop()
        out["gensim_pyro_uris"] = gensim.uris
        return out
    finally:
        net.close()  # kills, by PID, every process started in the namespaces
        shutil.rmtree(tmp, ignore_errors=True)


#: label in the figures -> (the client's run, its LSI part, its LDA part)
LABELS = {
    "ours_1_host": ("ours_1", "lsi", "lda"),
    "ours_2_hosts": ("ours_2", "lsi", "lda"),
    "gensim_distributed_1_worker": ("gensim_dist_1", "lsi", "lda"),
    "gensim_distributed_2_workers": ("gensim_dist_2", "lsi", "lda"),
    "gensim_serial": ("gensim_serial", "lsi", "lda"),
    "gensim_serial_onepass": ("gensim_serial", "lsi_onepass", None),
}


def rnd(x, nd: int = 3):
    return None if x is None else round(float(x), nd)


def summarize(raw: dict) -> dict:
    """The client's runs as side-by-side figures; failures go to ``errors``."""
    runs, errors = raw.pop("runs", {}), raw.pop("errors", {})
    fig: dict = {"lsi": {}, "lda": {}}
    for label, (run, lsi_key, lda_key) in LABELS.items():
        entry = runs.get(run, {"error": "did not run (see errors.client)"})
        for wl, key in (("lsi", lsi_key), ("lda", lda_key)):
            if key is not None:
                got = entry if "error" in entry else entry.get(key, {})
                if "error" in got:
                    errors[f"{label}.{wl}"] = got["error"]
                fig[wl][label] = got

    def column(wl: str, key: str, nd: int = 3) -> dict:
        return {label: rnd(f.get(key), nd) for label, f in fig[wl].items()}

    def ratio(s: dict, a: str, b: str):
        return rnd(s[a] / s[b], 2) if s.get(a) and s.get(b) else None

    seconds = {wl: column(wl, "wall_seconds") for wl in fig}
    svs = {k: v.get("singular_values_top5") for k, v in fig["lsi"].items()}
    dist = ("gensim_distributed_1_worker", "gensim_distributed_2_workers")
    return {
        "seconds": seconds,
        "speedup_2_hosts_vs_1": {
            wl: {"ours": ratio(s, "ours_1_host", "ours_2_hosts"), "gensim": ratio(s, *dist)}
            for wl, s in seconds.items()
        },
        "gensim_distributed_seconds_over_ours": {
            wl: {
                "1_host": ratio(s, dist[0], "ours_1_host"),
                "2_hosts": ratio(s, dist[1], "ours_2_hosts"),
            }
            for wl, s in seconds.items()
        },
        "quality": {
            "lsi_singular_values_top5": {k: v and [rnd(x, 2) for x in v] for k, v in svs.items()},
            "lda_heldout_per_word_bound": column("lda", "heldout_per_word_bound", 4),
        },
        "gensim_workers_seen": {k: {wl: fig[wl][k].get("workers") for wl in fig} for k in dist},
        "ours_node_setup_seconds": {
            k: rnd(runs[k].get("node_setup_seconds")) for k in ("ours_1", "ours_2") if k in runs
        },
        "errors": errors,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=20_000)
    p.add_argument("--terms", type=int, default=5_000)
    p.add_argument(
        "--quick", action="store_true", help="3,000 x 1,000, LDA chunks of 1,500: a smoke run"
    )
    p.add_argument("--lsi-k", type=int, default=100)
    p.add_argument("--oversample", type=int, default=100, help="gensim's extra_samples")
    p.add_argument("--power-iters", type=int, default=2)
    p.add_argument("--lsi-chunksize", type=int, help="default: the corpus in 4 chunks (2 per host)")
    p.add_argument("--lda-k", type=int, default=20)
    p.add_argument("--lda-passes", type=int, default=1)
    p.add_argument("--lda-chunksize", type=int, default=2000)
    p.add_argument(
        "--update-every", type=int, default=1, help="chunks per M-step (gensim: per worker)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds each run may take")
    args = p.parse_args()
    if args.quick:
        args.docs, args.terms = min(args.docs, 3000), min(args.terms, 1000)
        args.lda_chunksize = min(args.lda_chunksize, 1500)
        args.timeout = min(args.timeout, 300.0)
    if args.lsi_chunksize is None:  # 2 chunks per host (20,000 at most): the same in every run
        chunks = 4 * max(1, -(-args.docs // 80_000))
        args.lsi_chunksize = -(-args.docs // chunks)
    args.heldout = max(10, args.docs // 100)
    t0 = time.perf_counter()
    raw = run(args)
    import gensim
    import numpy as np

    cpus = os.cpu_count()
    out = {
        "benchmark": "workloads_hosts",
        "note": f"the 'hosts' are network namespaces on ONE machine with {cpus} CPUs: the two "
        "node hosts (1 job CPU / 1 gensim worker each) and the client host (client, gensim "
        "dispatchers, name server) share those cores",
        "machine": {"cpus": cpus, "python": platform.python_version(), "numpy": np.__version__,
                    "gensim": gensim.__version__},
        "corpus": {"documents": args.docs, "terms": args.terms, "heldout_documents": args.heldout,
                   "planted_topics": 20, **raw.get("runs", {}).pop("corpus", {})},
        "params": {
            "lsi": {"k": args.lsi_k, "oversample": args.oversample,
                    "power_iters": args.power_iters, "chunksize": args.lsi_chunksize,
                    "gensim_distributed": "onepass=True (it has no distributed onepass=False)"},
            "lda": {"k": args.lda_k, "passes": args.lda_passes, "chunksize": args.lda_chunksize,
                    "update_every": args.update_every,
                    "chunks_per_m_step": "ours: update_every; gensim distributed: update_every x workers",
                    "iterations": 50, "gamma_threshold": 1e-3},
        },
    }  # fmt: skip
    if "skipped" in raw:
        out["skipped"] = raw["skipped"]
    else:
        out.update(summarize(raw))
        out.update(raw)
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0 if "skipped" not in out and not out.get("errors") else 1


if __name__ == "__main__":
    sys.exit(main())
