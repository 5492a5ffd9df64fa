"""The LSI and LDA workloads beside gensim's, on one local node with 1 and 2
CPUs; prints ONE JSON object to stdout.

    pip install -e '.[bench]'                            # gensim, Pyro4, scipy
    python benchmarks/workloads.py                       # 20,000 x 5,000 and 100,000 x 20,000
    python benchmarks/workloads.py --sizes 20000x5000
    python benchmarks/workloads.py --quick               # smoke run, seconds
    python benchmarks/workloads.py --only lsi --cpus 2

For each size a corpus is drawn by LDA's generative process
(``synthetic_corpus``, seeded; 20 planted topics, ~100 words per document),
plus 1,000 held-out documents (fewer with ``--quick``).  For each CPU count
a ``dispy.LocalNode(cpus=N)`` on 127.0.0.1 is started (and stopped, by PID);
a run's ``wall_seconds`` covers placing the corpus on the node and every
pass, not the node's start (``node_start_seconds``).  gensim's serial
``LsiModel``/``LdaModel`` run on the same corpus with the same parameters in
the same process, so each size prints both side by side: seconds,
``gensim_seconds_over_ours`` (per CPU count), and quality.

LSI: k=100, oversampling 100, 2 power iterations (gensim's defaults) = 4
passes; quality: the relative errors of ours and gensim's singular values
against the exact ones (``scipy.sparse.linalg.svds``; ``--no-exact`` skips
it), and their largest relative difference from each other.  LDA: k=20, online VB with gensim's defaults (chunks of 2,000
documents, an M-step per chunk; each M-step's E-step cut into a job per
CPU), ``--lda-passes`` passes (default 2); quality: the held-out per-word
bound (gensim's ``log_perplexity``; higher is better) and its relative
distance from gensim's.  ``recovery``: K=8 planted topics on two corpora of
5,000 x 1,000, 10 passes, the mean cosine of the matched topics over
``--recovery-seeds`` seeds, ours (each update cut in two, as on 2 CPUs; run
serially, which computes the same) and gensim's.

Each CPU count runs ``--rounds`` times (default 3), the counts taking turns;
a figure is its best round (``wall_seconds``, and what goes with it), every
round's seconds are in ``wall_seconds_rounds``.  Before anything,
``--prefault-gib`` GiB of memory is touched once in a child process (see
``core.prefault``: this VM backs memory at first touch, which the first
large arrays of a run measured instead of the workload).

The machine may be shared: ``cpu_busy_percent_before`` is the whole
machine's CPU use in the second before each run, and
``local_pool_speedup_2`` what two processes of a ``ProcessPoolExecutor`` get
for two of the workload's own jobs right after the runs (the ceiling for
``speedup``; 2 vCPUs may be one core's two hyperthreads, and sparse products
are bound by memory bandwidth).  ``benchmarks/workloads_hosts.py`` runs the
same across two network-namespace hosts against gensim's distributed mode.
Logs go to stderr.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import logging
import multiprocessing
import os
import platform
import sys
import time
import traceback

import numpy as np
import psutil
import scipy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import core  # noqa: E402  (its --prefault-gib)

import dispy  # noqa: E402
from dispy.workloads import SerialRunner, corpus, lda, local_cluster, lsi  # noqa: E402

log = logging.getLogger("bench.workloads")


def _busy() -> float:
    return psutil.cpu_percent(interval=1.0)


#: What the local-pool ceiling jobs read (inherited by the forked pool processes).
_POOL: dict = {}


def _pool_job(kind: str, i: int) -> float:
    d = _POOL
    if kind == "lsi":
        lsi.power_step(d["chunks"][i], d["q"])
    else:
        lda.estep(d["chunks"][i], d["model"], d["alpha"])
    return 0.0


def _pool_ceiling(kind: str, matrix, chunksize: int, args) -> float:
    """What this machine gives two processes for this very job right now: two
    of the workload's jobs (the first two chunks) run one after the other,
    then at once, on a ProcessPoolExecutor of 2; time ratio."""
    r = SerialRunner()
    _POOL["chunks"] = r.scatter(matrix, [(0, chunksize), (chunksize, 2 * chunksize)])
    if kind == "lsi":
        l_cols = min(args.lsi_topics + args.oversample, matrix.shape[1])
        _POOL["q"] = lsi.Gaussian(args.seed, matrix.shape[1], l_cols)
    else:
        lam = np.random.default_rng(args.seed).gamma(
            100.0, 0.01, (args.lda_topics, matrix.shape[1])
        )
        _POOL["model"] = r.put({"expElogbeta": np.exp(lda.dirichlet_expectation(lam))})
        _POOL["alpha"] = np.full(args.lda_topics, 1.0 / args.lda_topics)
    ctx = multiprocessing.get_context("fork")
    try:
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
            list(ex.map(_pool_job, [kind, kind], [0, 1]))  # warm up both processes
            t0 = time.perf_counter()
            for i in (0, 1):
                ex.submit(_pool_job, kind, i).result()
            seq = time.perf_counter() - t0
            t0 = time.perf_counter()
            list(ex.map(_pool_job, [kind, kind], [0, 1]))
            par = time.perf_counter() - t0
    finally:
        _POOL.clear()
    return seq / par


def _run_lsi(matrix, cpus: int, args, chunksize: int) -> dict:
    busy = _busy()
    t0 = time.perf_counter()
    with local_cluster(local_cpus=cpus) as runner:
        start = time.perf_counter() - t0
        res = lsi.lsi(
            matrix,
            args.lsi_topics,
            runner,
            oversample=args.oversample,
            power_iters=args.power_iters,
            chunksize=chunksize,
            seed=args.seed,
            log=log.info,
        )
        received = sum(n["bytes_received"] for n in runner.cluster.stats()["nodes"].values())
        placement = runner.placement
    docs = matrix.shape[0]
    return {
        "cpus": cpus,
        "wall_seconds": res.seconds,
        "documents_per_second": docs / res.seconds,
        "document_passes_per_second": docs * res.passes / res.seconds,
        "passes": res.passes,
        "chunks": res.chunks,
        "bytes_sent": res.bytes_sent,
        "bytes_sent_corpus": res.bytes_sent - sum(res.pass_bytes),
        "bytes_sent_per_pass": res.pass_bytes,
        "bytes_received_total": received,
        "pass_seconds": res.pass_seconds,
        "singular_values_top5": [float(x) for x in res.s[:5]],
        "placement": placement,
        "node_start_seconds": start,
        "cpu_busy_percent_before": busy,
        "_s": res.s,
    }


def _run_lda(train, heldout, cpus: int, args) -> dict:
    busy = _busy()
    t0 = time.perf_counter()
    with local_cluster(local_cpus=cpus) as runner:
        start = time.perf_counter() - t0
        model = lda.lda(
            train,
            args.lda_topics,
            runner,
            passes=args.lda_passes,
            chunksize=args.lda_chunksize,
            update_every=args.update_every,
            seed=args.seed,
            log=log.info,
        )
        t1 = time.perf_counter()
        doc_bound, words = lda.heldout_bound(model, heldout, runner, chunksize=args.lda_chunksize)
        perplexity = (doc_bound + model.topic_bound()) / words
        eval_s = time.perf_counter() - t1
        placement = runner.placement
    docs = train.shape[0]
    return {
        "cpus": cpus,
        "wall_seconds": model.seconds,
        "documents_per_second": docs * model.passes / model.seconds,
        "passes": model.passes,
        "updates": model.updates,
        "chunks": model.chunks,
        "bytes_sent": model.bytes_sent,
        "bytes_sent_corpus": model.bytes_sent - sum(model.pass_bytes),
        "bytes_sent_per_pass": model.pass_bytes,
        "pass_seconds": model.pass_seconds,
        "heldout_log_perplexity": perplexity,
        "heldout_documents_bound_per_word": doc_bound / words,
        "heldout_eval_seconds": eval_s,
        "placement": placement,
        "node_start_seconds": start,
        "cpu_busy_percent_before": busy,
    }


def _gensim(train, heldout, args, which) -> dict:
    """gensim's serial LsiModel / LdaModel on the same corpus, same parameters."""
    import gensim
    from gensim.matutils import Sparse2Corpus

    out: dict = {"version": gensim.__version__}
    bow = Sparse2Corpus(train, documents_columns=False)
    try:
        if "lsi" in which:
            busy = _busy()
            t0 = time.perf_counter()
            m = gensim.models.LsiModel(
                bow,
                num_topics=args.lsi_topics,
                chunksize=20_000,  # gensim's default
                onepass=False,
                power_iters=args.power_iters,
                extra_samples=args.oversample,
            )
            s = time.perf_counter() - t0
            out["lsi"] = {
                "wall_seconds": s,
                "documents_per_second": train.shape[0] / s,
                "singular_values_top5": [float(x) for x in m.projection.s[:5]],
                "cpu_busy_percent_before": busy,
                "_s": np.asarray(m.projection.s[: args.lsi_topics]),
            }
        if "lda" in which:
            busy = _busy()
            t0 = time.perf_counter()
            m = gensim.models.LdaModel(
                bow,
                num_topics=args.lda_topics,
                passes=args.lda_passes,
                chunksize=args.lda_chunksize,
                update_every=1,
                iterations=50,
                gamma_threshold=1e-3,
                eval_every=None,
                random_state=args.seed,
            )
            s = time.perf_counter() - t0
            out["lda"] = {
                "wall_seconds": s,
                "documents_per_second": train.shape[0] * args.lda_passes / s,
                "heldout_log_perplexity": float(
                    m.log_perplexity(list(Sparse2Corpus(heldout, documents_columns=False)))
                ),
                "cpu_busy_percent_before": busy,
            }
    except Exception as exc:  # a measurement, not a test: say what failed and go on
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _recovery(args) -> dict:
    """Planted-topic recovery: K=8 on two corpora, 10 passes, over seeds."""
    import gensim
    from gensim.matutils import Sparse2Corpus

    out: dict = {"topics": 8, "passes": 10, "documents": 5000, "terms": 1000, "corpora": []}
    for cseed in (0, 1):
        drawn = corpus.synthetic_corpus(5000, 1000, 8, doc_length=100.0, seed=cseed)
        ours, theirs = [], []
        for seed in range(args.recovery_seeds):
            m = lda.lda(drawn.matrix, 8, passes=10, seed=seed, split=2)
            ours.append(float(lda.match_topics(m.topics, drawn.topics)[1].mean()))
            g = gensim.models.LdaModel(
                Sparse2Corpus(drawn.matrix, documents_columns=False),
                num_topics=8, passes=10, eval_every=None, random_state=seed,
            )  # fmt: skip
            lam = g.state.get_lambda()
            theirs.append(
                float(lda.match_topics(lam / lam.sum(1, keepdims=True), drawn.topics)[1].mean())
            )
            log.info(
                "recovery corpus %d seed %d: ours %.4f gensim %.4f",
                cseed,
                seed,
                ours[-1],
                theirs[-1],
            )
        out["corpora"].append({
            "corpus_seed": cseed,
            "ours_mean_cosine": ours,
            "gensim_mean_cosine": theirs,
            "ours_median": float(np.median(ours)),
            "gensim_median": float(np.median(theirs)),
        })  # fmt: skip
    return out


def _rel_errors(s, exact) -> dict:
    k = min(len(s), len(exact))
    rel = np.abs(np.asarray(s[:k]) - exact[:k]) / exact[:k]
    return {
        "max": float(rel.max()),
        "top10_max": float(rel[:10].max()),
        "median": float(np.median(rel)),
    }


def _rounds(args, cpu_counts: list, label: str, run) -> tuple[dict, int]:
    """``run(cpus)`` for every CPU count, ``--rounds`` times, the counts taking turns:
    each count's best round (``_best``), and 0; with ``'error'`` (the traceback)
    and 1 if a run failed."""
    runs: dict = {}
    try:
        for rnd in range(args.rounds):
            for c in cpu_counts:
                log.warning("%s on %d CPU(s), round %d", label, c, rnd + 1)
                runs[c] = _best(runs.get(c), run(c))
    except Exception:
        runs["error"] = traceback.format_exc()
        return runs, 1
    return runs, 0


def _best(kept: dict | None, new: dict) -> dict:
    """The faster of two rounds of one CPU count (all rounds' seconds kept)."""
    rounds = (kept["wall_seconds_rounds"] if kept else []) + [new["wall_seconds"]]
    best = new if kept is None or new["wall_seconds"] < kept["wall_seconds"] else kept
    best["wall_seconds_rounds"] = rounds
    return best


def _speedup(res: dict, runs: dict, kind: str, train, chunksize: int, args) -> None:
    ok = [r for r in runs.values() if isinstance(r, dict)]
    if len(ok) >= 2:
        res["speedup"] = ok[0]["wall_seconds"] / ok[-1]["wall_seconds"]
        res["local_pool_speedup_2"] = _pool_ceiling(kind, train, chunksize, args)
    res.update({f"cpus_{k}": v for k, v in runs.items()})


def run_size(docs: int, terms: int, args, cpu_counts: list, which: set) -> tuple[dict, int]:
    out: dict = {}
    heldout_docs = 1000 if not args.quick else 200
    t0 = time.perf_counter()
    drawn = corpus.synthetic_corpus(
        docs + heldout_docs, terms, 20, doc_length=args.doc_length, seed=args.seed
    )
    train, heldout = drawn.matrix[:docs], drawn.matrix[docs:]
    out["corpus"] = {
        "documents": docs,
        "terms": terms,
        "nonzeros": int(train.nnz),
        "words": float(train.sum()),
        "heldout_documents": heldout_docs,
        "planted_topics": 20,
        "mean_doc_length": args.doc_length,
        "generate_seconds": time.perf_counter() - t0,
    }
    status = 0
    n = max(cpu_counts)
    lsi_chunksize = args.lsi_chunksize or -(-docs // (n * max(2, -(-docs // (n * 20_000)))))
    gensim_out = (
        {"skipped": "--no-gensim"} if args.no_gensim else _gensim(train, heldout, args, which)
    )
    if "lsi" in which:
        runs, failed = _rounds(
            args, cpu_counts, f"{docs}x{terms}: LSI k={args.lsi_topics}",
            lambda c: _run_lsi(train, c, args, lsi_chunksize),
        )  # fmt: skip
        status = status or failed
        res = {
            "topics": args.lsi_topics,
            "oversample": args.oversample,
            "power_iters": args.power_iters,
            "chunksize": lsi_chunksize,
        }
        ok = [r for r in runs.values() if isinstance(r, dict)]
        if len(ok) >= 2:
            res["max_rel_diff_singular_values_between_cpu_counts"] = float(
                np.max(np.abs(ok[0]["_s"] - ok[-1]["_s"]) / ok[0]["_s"])
            )
        if ok and not args.no_exact:  # the true singular values (ARPACK), for both
            from scipy.sparse.linalg import svds

            t1 = time.perf_counter()
            exact = np.sort(svds(train, k=args.lsi_topics, return_singular_vectors=False))[::-1]
            res["exact_svds_seconds"] = time.perf_counter() - t1
            res["singular_values_rel_error_vs_exact"] = _rel_errors(ok[-1]["_s"], exact)
            if "lsi" in gensim_out:
                gensim_out["lsi"]["singular_values_rel_error_vs_exact"] = _rel_errors(
                    gensim_out["lsi"]["_s"], exact
                )
        g = gensim_out.get("lsi")
        if g is not None and ok:
            gs = g.pop("_s")
            k = min(len(gs), len(ok[-1]["_s"]))
            res["max_rel_diff_singular_values_vs_gensim"] = float(
                np.max(np.abs(ok[-1]["_s"][:k] - gs[:k]) / gs[:k])
            )
            for r in ok:
                r["gensim_seconds_over_ours"] = g["wall_seconds"] / r["wall_seconds"]
        for r in ok:
            r.pop("_s")
        _speedup(res, runs, "lsi", train, lsi_chunksize, args)
        out["lsi"] = res
    if "lda" in which:
        runs, failed = _rounds(
            args, cpu_counts, f"{docs}x{terms}: LDA k={args.lda_topics}",
            lambda c: _run_lda(train, heldout, c, args),
        )  # fmt: skip
        status = status or failed
        res = {
            "topics": args.lda_topics,
            "passes": args.lda_passes,
            "chunksize": args.lda_chunksize,
            "update_every": args.update_every,
        }
        g = gensim_out.get("lda")
        for r in runs.values():
            if isinstance(r, dict) and g is not None:
                r["gensim_seconds_over_ours"] = g["wall_seconds"] / r["wall_seconds"]
                theirs = g["heldout_log_perplexity"]
                # bounds are negative: > 0 when ours is the better (higher) one
                r["heldout_bound_better_than_gensim_by"] = (
                    r["heldout_log_perplexity"] - theirs
                ) / abs(theirs)
        _speedup(res, runs, "lda", train, args.lda_chunksize // max(cpu_counts), args)
        out["lda"] = res
    out["gensim"] = gensim_out
    return out, status


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="20000x5000,100000x20000",
                   help="corpora as DOCSxTERMS, comma separated")  # fmt: skip
    p.add_argument("--docs", type=int, help="one corpus of this many documents (with --terms)")
    p.add_argument("--terms", type=int)
    p.add_argument("--quick", action="store_true", help="5,000 x 2,000, small k: a smoke run")
    p.add_argument("--only", default="lsi,lda", help="lsi, lda or both (comma separated)")
    p.add_argument("--cpus", default="1,2", help="node CPU counts to run (comma separated)")
    p.add_argument("--lsi-topics", type=int, default=100)
    p.add_argument("--oversample", type=int, default=100)
    p.add_argument("--power-iters", type=int, default=2)
    p.add_argument("--lsi-chunksize", type=int, help="default: 2 or more chunks per CPU")
    p.add_argument("--lda-topics", type=int, default=20)
    p.add_argument("--lda-passes", type=int, default=2)
    p.add_argument("--lda-chunksize", type=int, default=2000)
    p.add_argument("--update-every", type=int, default=1, help="chunks per M-step (gensim's 1)")
    p.add_argument("--doc-length", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recovery-seeds", type=int, default=3, help="0: skip the recovery part")
    p.add_argument("--no-gensim", action="store_true", help="skip gensim")
    p.add_argument("--no-exact", action="store_true", help="skip the exact SVD (svds) reference")
    p.add_argument("--rounds", type=int, default=3, help="runs per CPU count (the best counts)")
    core.add_prefault_argument(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(message)s",
    )
    if args.docs or args.terms:
        sizes = [(args.docs or 20_000, args.terms or 5_000)]
    else:
        sizes = [tuple(int(x) for x in sz.lower().split("x")) for sz in args.sizes.split(",")]
    if args.quick:
        args.rounds = 1
        sizes = [(5000, 2000)]
        args.lsi_topics, args.oversample = min(args.lsi_topics, 20), min(args.oversample, 20)
        args.lda_chunksize = min(args.lda_chunksize, 500)
        args.recovery_seeds = min(args.recovery_seeds, 1)
    if not args.no_gensim:
        try:
            import gensim  # noqa: F401
        except ImportError:
            p.error("gensim is not installed: pip install -e '.[bench]' (or --no-gensim)")
    which = {w.strip() for w in args.only.split(",") if w.strip()}
    cpu_counts = [int(c) for c in args.cpus.split(",") if c.strip()]
    out: dict = {
        "benchmark": "workloads",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "dispy": dispy.__version__,
        },
    }
    if args.prefault_gib > 0:
        out["memory_prefault_s"] = core.prefault(args.prefault_gib)
    status = 0
    for docs, terms in sizes:
        out[f"{docs}x{terms}"], st = run_size(docs, terms, args, cpu_counts, which)
        status = status or st
    if args.recovery_seeds > 0 and not args.no_gensim and "lda" in which:
        out["recovery"] = _recovery(args)
    json.dump(out, sys.stdout, indent=1)
    print()
    return status


if __name__ == "__main__":
    sys.exit(main())
