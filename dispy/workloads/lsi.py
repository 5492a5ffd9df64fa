"""Distributed LSI: the truncated SVD of a term-document matrix by a
randomized range finder whose products run as jobs over corpus chunks.

The corpus is ``A`` (documents x terms, rows split into chunks ``A_i``); LSI
wants the SVD of the term-document matrix ``X = A^T = U S V^T``: ``U``
(terms x k) are the topics, ``S`` the singular values.  With ``l = k +
oversample`` columns:

1. ``Q_0 = Omega``: a Gaussian terms x l matrix, drawn on the nodes from a
   seed (nothing sent);
2. ``power_iters + 1`` passes of ``Y = X X^T Q = sum_i A_i^T (A_i Q)``: each
   job computes its chunk's ``A_i^T (A_i Q)`` (terms x l) in one go (the
   products ``A_i Q`` and ``A_i^T Z`` of the two-pass method, fused: no
   per-document matrix ever leaves the node); each node adds up the parts
   it computed, and the node sums are added up and orthonormalised,
   ``Q = qr(Y)`` (``runner.sum_then``): on the node itself when the cluster
   has one node (``Y`` and ``Q`` then never leave it), else on the client;
3. one pass of ``G = sum_i (A_i Q)^T (A_i Q)`` (l x l per job): the Gram
   matrix of ``B = Q^T X``; its eigen-decomposition ``G = W S^2 W^T`` gives
   the singular values and ``U = Q W`` (as gensim's stochastic SVD does for
   corpora too large to hold ``B``), where ``Q`` is (``Rotate``).

Each pass's ``Q`` goes to each node once (``ClusterRunner.put``), or stays on
the one node that made it; the corpus chunks were placed once before the
first pass.  If the node holding ``Q`` is lost, the passes start again with
``Q`` on the client.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np

from . import NodeArrayLost, SerialRunner, one_blas_thread
from .corpus import chunk_bounds

#: Per job process: the seeded Gaussian start matrix, drawn once.
_omega_cache: dict = {}


class Gaussian:
    """A handle whose ``get()`` draws the seeded ``rows x cols`` standard
    normal matrix (the same on every node; drawn once per process)."""

    __slots__ = ("seed", "rows", "cols")

    def __init__(self, seed: int, rows: int, cols: int) -> None:
        self.seed, self.rows, self.cols = seed, rows, cols

    def __reduce__(self):
        return (Gaussian, (self.seed, self.rows, self.cols))

    def get(self) -> np.ndarray:
        key = (self.seed, self.rows, self.cols)
        m = _omega_cache.get(key)
        if m is None:
            _omega_cache.clear()
            m = np.random.default_rng(self.seed).standard_normal((self.rows, self.cols))
            _omega_cache[key] = m
        return m


# -- on the nodes ---------------------------------------------------------------------


def power_step(chunk, q) -> np.ndarray:
    """Job: ``A_i^T (A_i Q)`` (terms x l) for the chunk ``A_i`` and the pass's ``Q``."""
    a = chunk.get()
    return np.asarray(a.T @ (a @ q.get()))


def gram_step(chunk, q) -> np.ndarray:
    """Job: ``(A_i Q)^T (A_i Q)`` (l x l)."""
    c = np.asarray(chunk.get() @ q.get())
    return c.T @ c


class Rotate:
    """The Gram pass's last step, ``then(G)`` of ``runner.sum_then``: from the
    Gram matrix ``G`` and ``Q`` (``q.get()``), the top ``k`` singular values and
    ``U = Q W`` (``G = W S^2 W^T``), each column's largest entry positive;
    returned packed, the values on the first row.  It runs where ``G`` was
    added up: on a single node, ``Q`` never travels and ``U`` (k columns,
    not l) is what the client fetches."""

    __slots__ = ("q", "k")

    def __init__(self, q, k: int) -> None:
        self.q, self.k = q, k

    def __reduce__(self):
        return (Rotate, (self.q, self.k))

    def __call__(self, g: np.ndarray) -> np.ndarray:
        evals, evecs = np.linalg.eigh((g + g.T) / 2)
        order = np.argsort(evals)[::-1][: self.k]
        s = np.sqrt(np.clip(evals[order], 0.0, None))
        u = self.q.get() @ evecs[:, order]
        signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
        signs[signs == 0] = 1.0
        return np.vstack([s[None, :], u * signs])


# -- on the client --------------------------------------------------------------------


@dataclass
class LsiResult:
    u: np.ndarray  #: terms x k left singular vectors (the topics), orthonormal columns
    s: np.ndarray  #: k singular values, descending
    passes: int = 0  #: passes over the corpus
    seconds: float = 0.0
    chunks: int = 0
    bytes_sent: int = 0  #: bytes the client sent to nodes during the run (0 in serial)
    pass_bytes: list = field(default_factory=list)  #: bytes sent in each pass
    pass_seconds: list = field(default_factory=list)


#: One Cholesky QR pass leaves the columns orthonormal to about cond(R)^2 x 1e-16;
#: above this estimate of cond(R) a second pass follows (CholeskyQR2).  LSI's
#: passes measured 60-900 on corpora from 20,000 x 5,000 to 30,000 x 10,000.
COND_ONE_PASS = 1e4


def orthonormalize(y: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """An orthonormal basis of the columns of the tall ``y`` (terms x l).

    Cholesky QR: the Gram matrix ``Y^T Y`` (syrk), its Cholesky factor ``R``,
    then ``Q = Y R^-1`` with ``R`` inverted (l x l) and applied by a triangular
    product, three times faster here than a triangular solve; all on the
    Fortran-ordered view of ``y``'s transpose, so BLAS copies nothing.  It
    runs between passes while the nodes wait, on the node when there is one
    (5,000 x 200: 7-11 ms, against 32 ms for two passes with solves).  A second pass follows when ``R``
    is ill-conditioned (``COND_ONE_PASS``); when the second pass's factor is far
    from the identity, or a factorisation fails, Householder QR instead.
    ``overwrite``: the basis may be computed in ``y``'s memory (a C-ordered
    float64 array: the result is then ``y``, no 8 MB to allocate and fault in)."""
    from scipy.linalg import LinAlgError, cholesky
    from scipy.linalg.blas import dsyrk, dtrmm
    from scipy.linalg.lapack import dtrcon, dtrtri

    try:
        q = np.ascontiguousarray(y, dtype=np.float64)
        inplace = overwrite and q is y and q.flags.writeable
        for second in (False, True):
            qt = q.T  # l x n, Fortran order: the same memory
            r = cholesky(
                dsyrk(1.0, qt, trans=0, lower=0), lower=False, check_finite=False, overwrite_a=True
            )
            if second and np.max(np.abs(r - np.eye(r.shape[0]))) > 0.1:
                raise LinAlgError("ill-conditioned")
            rinv, info = dtrtri(r, lower=0)
            if info != 0:
                raise LinAlgError("singular factor")
            # (R^-T Y^T)^T = Y R^-1
            q = dtrmm(1.0, rinv, qt, side=0, lower=0, trans_a=1, overwrite_b=inplace).T
            if not second and dtrcon(r, norm="1", uplo="U")[0] * COND_ONE_PASS >= 1.0:
                break
        return np.ascontiguousarray(q)
    except LinAlgError:
        q, _ = np.linalg.qr(y)
        return q


#: ``then`` of each range pass: the sum is ours to overwrite (on the node, the
#: shared map of its file, which then becomes Q without a copy).
_ORTH_IN_PLACE = functools.partial(orthonormalize, overwrite=True)


@one_blas_thread
def lsi(
    corpus,
    k: int,
    runner=None,
    oversample: int = 100,
    power_iters: int = 2,
    chunksize: int | None = None,
    seed: int = 0,
    log=None,
) -> LsiResult:
    """Top-``k`` SVD of the term-document matrix of ``corpus`` (CSR, docs x terms).

    ``runner``: a ``ClusterRunner`` (jobs on a cluster) or None for a serial
    run.  ``chunksize``: documents per job (default: chunks of at most 20,000
    documents, at least two per CPU and a multiple of the CPUs).  ``oversample`` extra
    columns and ``power_iters`` power iterations trade time for accuracy.
    """
    runner = runner or SerialRunner()
    n_docs, n_terms = corpus.shape
    if k < 1 or k > min(n_docs, n_terms):
        raise ValueError(f"k={k} must be between 1 and min(documents, terms)")
    l_cols = min(k + max(0, oversample), n_terms, n_docs)
    if chunksize is None:  # chunks of at most 20,000 documents, a multiple of the CPUs
        cpus = runner.cpus
        n_chunks = cpus * max(1, -(-n_docs // (cpus * 20_000)), 2 if n_docs >= 4 * cpus else 1)
        chunksize = max(1, -(-n_docs // n_chunks))
    t0 = time.perf_counter()
    sent0 = runner.bytes_sent()
    bounds = chunk_bounds(n_docs, chunksize)
    chunks = runner.scatter(corpus, bounds, name="lsi-corpus")
    res = LsiResult(u=np.empty(0), s=np.empty(0), chunks=len(bounds))
    mark, tmark = runner.bytes_sent(), time.perf_counter()

    def end_pass(what: str) -> None:
        nonlocal mark, tmark
        now, tnow = runner.bytes_sent(), time.perf_counter()
        res.pass_bytes.append(now - mark)
        res.pass_seconds.append(tnow - tmark)
        res.passes += 1
        if log is not None:
            log(f"lsi pass {res.passes} ({what}): {tnow - tmark:.2f} s, {now - mark} bytes sent")
        mark, tmark = now, tnow

    def passes(on_node: bool):
        q_handle = Gaussian(seed, n_terms, l_cols)
        for it in range(power_iters + 1):
            q_handle = runner.sum_then(
                power_step, [(c, q_handle) for c in chunks], _ORTH_IN_PLACE, "lsi-q", on_node
            )
            end_pass(f"range, power iteration {it}")
        su = runner.sum_then(
            gram_step, [(c, q_handle) for c in chunks], Rotate(q_handle, k), "lsi-u", on_node, False
        )
        end_pass("gram")
        return runner.get(su)

    try:
        su = passes(on_node=True)
    except NodeArrayLost as exc:  # the node holding Q was lost: again, Q on the client
        if log is not None:
            log(f"lsi: {exc}; starting the passes again")
        su = passes(on_node=False)
    res.s, res.u = np.array(su[0]), np.array(su[1:])
    res.seconds = time.perf_counter() - t0
    res.bytes_sent = runner.bytes_sent() - sent0
    return res


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between the column spaces of ``a`` and ``b``."""
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    cos = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return np.arccos(np.clip(cos, -1.0, 1.0))
