"""Distributed LDA by variational Bayes (Hoffman, Blei & Bach 2010), online or
batch, as gensim's ``LdaModel`` computes it: jobs run the E-step, the client
the M-step.

The sequence of updates is gensim's, however many CPUs run it: an update
merges ``update_every`` chunks of ``chunksize`` documents (gensim's defaults:
one chunk of 2,000), and it is the E-step of those documents that is shared
out.  Each update: the client places the current ``expElogbeta`` (K x terms)
on every node once (``ClusterRunner.put``); the update's documents are cut
into one job per CPU (``split``), each running the E-step for its documents
against it (``estep``) and returning their sufficient statistics (K x the
terms they use, with those terms' ids) and their part of the variational
bound.  The client sums them in order and updates the topics ``lambda``:

* online (``update_every`` chunks per update):
  ``lambda = (1 - rho) lambda + rho (eta + D / n_batch * sstats)`` with
  gensim's ``rho = (offset + pass + n_merged / chunksize) ** -decay``
  (``n_merged``: documents merged into lambda in the first pass before this
  update; later passes keep the rate of the first pass's end, as gensim);
* batch (``update_every=0``): one update per pass, ``lambda = eta + sstats``.

Splitting an update rather than merging one update per CPU keeps gensim's
quality per pass: with one M-step per two chunks the held-out bound was 8%
worse at two passes (20,000 x 5,000, K=20).

``log_perplexity`` is gensim's held-out per-word bound: the variational lower
bound of the held-out documents (their E-step against the final topics) plus
the topics' term, divided by the held-out word count (``heldout_bound`` gives
the documents' part alone, which does not grow with the number of topics and
terms as the topics' term does).

The E-step is vectorised over the documents of a chunk (gensim loops over
them in Python); each document stops iterating when its mean change of gamma
is below ``gamma_threshold``, as in gensim.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln, psi

from . import SerialRunner, one_blas_thread
from .corpus import chunk_bounds

#: Seed stream for the held-out E-step (the training passes use 0, 1, 2, ...).
HELDOUT_STREAM = 1 << 30


def dirichlet_expectation(alpha: np.ndarray) -> np.ndarray:
    """E[log theta] for theta ~ Dirichlet(alpha), along the last axis."""
    if alpha.ndim == 1:
        return psi(alpha) - psi(alpha.sum())
    return psi(alpha) - psi(alpha.sum(axis=1))[:, None]


# -- on the nodes ---------------------------------------------------------------------


def _estep(a, exp_elog_beta, alpha, iterations, threshold, rng):
    """Variational E-step for the documents of ``a`` (CSR docs x terms).

    Returns (gamma docs x K, expElogtheta, phinorm per nonzero)."""
    n_docs = a.shape[0]
    k = exp_elog_beta.shape[0]
    lengths = np.diff(a.indptr)
    gamma = rng.gamma(100.0, 1.0 / 100.0, (n_docs, k))
    gamma[lengths == 0] = alpha  # an empty document's posterior is its prior
    exp_et = np.exp(dirichlet_expectation(gamma))
    cts_all = np.asarray(a.data, dtype=np.float64)
    eb_all = exp_elog_beta[:, a.indices].T.copy()  # nnz x K: expElogbeta of each token's term
    # the working set: documents still iterating, with their nonzeros
    docs = np.flatnonzero(lengths > 0)
    sel = np.repeat(lengths > 0, lengths)
    cts, eb, lens = cts_all[sel], eb_all[sel], lengths[docs]
    for _ in range(iterations):
        if docs.size == 0:
            break
        th = exp_et[docs]
        phinorm = np.einsum("nk,nk->n", np.repeat(th, lens, axis=0), eb) + 1e-100
        # acc[d] = sum over d's tokens of cts/phinorm * eb: a sparse (docs x tokens) product
        indptr = np.concatenate(([0], np.cumsum(lens)))
        per_doc = sp.csr_matrix((cts / phinorm, np.arange(cts.size), indptr), (docs.size, cts.size))
        acc = per_doc @ eb
        new = alpha + th * acc
        change = np.mean(np.abs(new - gamma[docs]), axis=1)
        gamma[docs] = new
        exp_et[docs] = np.exp(dirichlet_expectation(new))
        going = change >= threshold
        if not going.all():  # drop the converged documents from the working set
            keep = np.repeat(going, lens)
            docs, lens, cts, eb = docs[going], lens[going], cts[keep], eb[keep]
    phinorm = np.einsum("nk,nk->n", np.repeat(exp_et, lengths, axis=0), eb_all) + 1e-100
    return gamma, exp_et, phinorm


def _doc_bound(gamma, alpha, cts, phinorm) -> float:
    """The documents' part of the variational bound (gensim's LdaModel.bound
    without the topics' term): E[log p(w|theta,beta)] + the theta terms."""
    elog_theta = dirichlet_expectation(gamma)
    words = float(np.dot(cts, np.log(phinorm)))
    theta = np.sum((alpha - gamma) * elog_theta) + np.sum(gammaln(gamma) - gammaln(alpha))
    theta += np.sum(gammaln(np.sum(alpha)) - gammaln(gamma.sum(axis=1)))
    return words + float(theta)


def estep(chunk, model, alpha, iterations=50, gamma_threshold=1e-3, seed=(0,), sstats=True):
    """Job: the E-step of one chunk against ``model`` (a handle to
    ``{'expElogbeta': K x terms}``).

    Returns a dict: ``bound`` (the chunk's documents' bound), ``docs``,
    ``words``, and with ``sstats``: ``cols`` (the term ids the chunk uses) and
    ``sstats`` (K x len(cols)), gensim's sufficient statistics restricted to
    those terms (the other columns are zero)."""
    a = chunk.get()
    exp_elog_beta = model.get()["expElogbeta"]
    alpha = np.asarray(alpha, dtype=np.float64)
    rng = np.random.default_rng(list(seed))
    gamma, exp_et, phinorm = _estep(a, exp_elog_beta, alpha, iterations, gamma_threshold, rng)
    cts = np.asarray(a.data, dtype=np.float64)
    out = {
        "bound": _doc_bound(gamma, alpha, cts, phinorm),
        "docs": int(a.shape[0]),
        "words": float(cts.sum()),
    }
    if sstats:
        cols, inv = np.unique(a.indices, return_inverse=True)
        ratio = sp.csr_matrix((cts / phinorm, inv.ravel(), a.indptr), shape=(a.shape[0], cols.size))
        s = np.ascontiguousarray(np.asarray(ratio.T @ exp_et).T)  # K x u
        s *= exp_elog_beta[:, cols]
        out["cols"] = cols.astype(np.int32)
        out["sstats"] = s
    return out


# -- on the client --------------------------------------------------------------------


@dataclass
class LdaResult:
    lam: np.ndarray  #: K x terms variational topic parameters lambda
    alpha: np.ndarray  #: the (symmetric) document-topic prior, K
    eta: float
    passes: int = 0
    updates: int = 0
    seconds: float = 0.0
    chunks: int = 0
    bytes_sent: int = 0
    pass_bytes: list = field(default_factory=list)
    pass_seconds: list = field(default_factory=list)
    #: per pass: the training documents' per-word bound (E-step part, before the update)
    train_bound: list = field(default_factory=list)
    #: the training chunks as placed for the runner (log_perplexity(model) reuses them)
    chunk_refs: list = field(default_factory=list, repr=False)

    @property
    def topics(self) -> np.ndarray:
        """K x terms topic-word distributions (rows sum to 1)."""
        return self.lam / self.lam.sum(axis=1, keepdims=True)

    def topic_bound(self) -> float:
        """The topics' term of the bound: E[log p(beta|eta)] - E[log q(beta|lambda)]."""
        lam, eta = self.lam, self.eta
        elog_beta = dirichlet_expectation(lam)
        score = np.sum((eta - lam) * elog_beta) + np.sum(gammaln(lam) - gammaln(eta))
        score += np.sum(gammaln(eta * lam.shape[1]) - gammaln(lam.sum(axis=1)))
        return float(score)


@one_blas_thread
def lda(
    corpus,
    k: int,
    runner=None,
    passes: int = 1,
    chunksize: int | None = None,
    update_every: int = 1,
    alpha: float | None = None,
    eta: float | None = None,
    decay: float = 0.5,
    offset: float = 1.0,
    iterations: int = 50,
    gamma_threshold: float = 1e-3,
    seed: int = 0,
    split: int | None = None,
    log=None,
) -> LdaResult:
    """Fit LDA with ``k`` topics to ``corpus`` (CSR docs x terms counts).

    The updates are gensim's ``LdaModel`` ones, whatever the number of CPUs:
    ``chunksize`` documents (default 2,000, as gensim) per chunk,
    ``update_every`` chunks per M-step (online VB, default 1), or 0 for batch
    VB (one update per pass).  What the CPUs change is only who runs an
    update's E-step: its documents are cut into ``split`` jobs (default: the
    runner's CPUs), which run at once, and their statistics are summed in
    order.  ``alpha``, ``eta``: symmetric priors (default 1/k, as gensim).
    ``decay``, ``offset``: the online learning rate, gensim's
    ``rho = (offset + pass + documents_merged / chunksize) ** -decay``, where
    only the first pass counts merged documents (later passes are gensim's
    "extra passes" over the same corpus).
    """
    runner = runner or SerialRunner()
    n_docs, n_terms = corpus.shape
    if k < 1:
        raise ValueError("k must be at least 1")
    update_every = 1 if update_every is None else int(update_every)
    if update_every < 0:
        raise ValueError("update_every must be 0 (batch) or a number of chunks per update")
    chunksize = 2000 if chunksize is None else int(chunksize)
    if chunksize < 1:
        raise ValueError("chunksize must be at least 1")
    split = runner.cpus if split is None else int(split)
    if split < 1:
        raise ValueError("split must be at least 1")
    alpha_v = np.full(k, 1.0 / k if alpha is None else float(alpha))
    eta = 1.0 / k if eta is None else float(eta)
    t0 = time.perf_counter()
    sent0 = runner.bytes_sent()
    # the updates' documents, then each update's share of every job
    per_update = n_docs if update_every == 0 else update_every * chunksize
    updates = chunk_bounds(n_docs, per_update)
    pieces = [_split(lo, hi, split) for lo, hi in updates]
    chunks = runner.scatter(corpus, [b for ps in pieces for b in ps], name="lda-corpus")
    groups, at = [], 0
    for ps in pieces:
        groups.append(list(range(at, at + len(ps))))
        at += len(ps)
    rng = np.random.default_rng(seed)
    lam = eta + rng.gamma(100.0, 1.0 / 100.0, (k, n_terms))  # gensim: eta + random sstats
    res = LdaResult(lam=lam, alpha=alpha_v, eta=eta, chunks=len(chunks), chunk_refs=chunks)
    merged = 0  # documents merged into lambda in the first pass (gensim's num_updates)
    for p in range(passes):
        mark, tmark = runner.bytes_sent(), time.perf_counter()
        bound = words = 0.0
        for group in groups:
            exp_elog_beta = np.exp(dirichlet_expectation(lam))
            model = runner.put({"expElogbeta": exp_elog_beta}, name="lda-model")
            args = [
                (chunks[i], model, alpha_v, iterations, gamma_threshold, (seed, p, i))
                for i in group
            ]
            sstats = np.zeros((k, n_terms))
            batch_docs = 0
            for r in runner.map(estep, args):
                sstats[:, r["cols"]] += r["sstats"]
                batch_docs += r["docs"]
                bound += r["bound"]
                words += r["words"]
            if update_every == 0:
                lam = eta + sstats
            else:
                rho = (offset + p + merged / chunksize) ** -decay  # gensim's schedule
                lam = (1.0 - rho) * lam + rho * (eta + (n_docs / max(batch_docs, 1)) * sstats)
            if p == 0:
                merged += batch_docs
            res.updates += 1
        res.lam = lam
        now, tnow = runner.bytes_sent(), time.perf_counter()
        res.pass_bytes.append(now - mark)
        res.pass_seconds.append(tnow - tmark)
        res.train_bound.append(bound / max(words, 1.0))
        res.passes += 1
        if log is not None:
            log(
                f"lda pass {p + 1}: {tnow - tmark:.2f} s, {now - mark} bytes sent, "
                f"training per-word bound {res.train_bound[-1]:.4f}"
            )
    res.seconds = time.perf_counter() - t0
    res.bytes_sent = runner.bytes_sent() - sent0
    return res


def _split(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """Rows ``lo:hi`` cut into at most ``parts`` ranges of near-equal size."""
    n = max(1, min(parts, hi - lo))
    cuts = [lo + (hi - lo) * i // n for i in range(n + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def heldout_bound(
    model: LdaResult,
    corpus=None,
    runner=None,
    chunksize: int | None = None,
    iterations: int = 50,
    gamma_threshold: float = 1e-3,
    seed: int = 0,
) -> tuple[float, float]:
    """(the documents' part of the variational bound, their word count) for
    ``corpus`` (CSR docs x terms) under ``model``, by an E-step against the
    final topics.  ``corpus=None``: the training corpus, as already placed by
    ``lda`` (pass the same runner)."""
    runner = runner or SerialRunner()
    if corpus is None:
        if not model.chunk_refs:
            raise ValueError("no corpus given and the model keeps no training chunks")
        chunks = model.chunk_refs
    else:
        n_docs = corpus.shape[0]
        if corpus.shape[1] != model.lam.shape[1]:
            raise ValueError(
                f"held-out corpus has {corpus.shape[1]} terms, the model {model.lam.shape[1]}"
            )
        if chunksize is None:
            chunksize = min(2000, max(1, -(-n_docs // runner.cpus)))
        bounds = chunk_bounds(n_docs, chunksize)
        chunks = runner.scatter(corpus, bounds, name="lda-heldout")
    handle = runner.put({"expElogbeta": np.exp(dirichlet_expectation(model.lam))}, "lda-model")
    args = [
        (c, handle, model.alpha, iterations, gamma_threshold, (seed, HELDOUT_STREAM, i), False)
        for i, c in enumerate(chunks)
    ]
    bound = words = 0.0
    for r in runner.map(estep, args):
        bound += r["bound"]
        words += r["words"]
    return bound, words


def log_perplexity(model: LdaResult, corpus=None, runner=None, **kwargs) -> float:
    """Per-word bound of ``corpus`` (held-out documents, CSR docs x terms) under
    ``model``: gensim's ``LdaModel.log_perplexity(corpus)``, the documents'
    bound plus the topics' term, over the word count.  Arguments as
    ``heldout_bound``."""
    bound, words = heldout_bound(model, corpus, runner, **kwargs)
    return (bound + model.topic_bound()) / max(words, 1.0)


def match_topics(found: np.ndarray, planted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair ``found`` topics with ``planted`` ones (rows, K x terms) by the
    Hungarian assignment on cosine similarity; returns (index of the found
    topic for each planted topic, their cosine similarities)."""
    from scipy.optimize import linear_sum_assignment

    fn = found / np.linalg.norm(found, axis=1, keepdims=True)
    pn = planted / np.linalg.norm(planted, axis=1, keepdims=True)
    cos = pn @ fn.T
    rows, cols = linear_sum_assignment(-cos)
    order = np.argsort(rows)
    return cols[order], cos[rows[order], cols[order]]
