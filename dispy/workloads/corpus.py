"""Corpora for the LSI and LDA workloads: Matrix Market files, gensim-style
bag-of-words, and a seeded synthetic corpus drawn from LDA's generative process.

Every function here returns (or takes) one layout: a ``scipy.sparse.csr_matrix``
of **documents x terms** (a row per document, float64 counts, int32 term ids
sorted within each row).  Files may hold either orientation:

* ``DOCS_TERMS`` (the default): a row per document, as gensim's ``MmCorpus``
  and ``MmWriter`` write them (``docno termid count``, 1-based);
* ``TERMS_DOCS``: a row per term (a term-document matrix, as
  ``gensim.matutils.corpus2csc`` gives and ``scipy.io.mmwrite`` of it writes).

Requires scipy (``pip install 'dispy[workloads]'``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.io
import scipy.sparse as sp

DOCS_TERMS = "docs-terms"
TERMS_DOCS = "terms-docs"
ORIENTATIONS = (DOCS_TERMS, TERMS_DOCS)


def _check_orientation(orientation: str) -> None:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, not {orientation!r}")


def as_corpus(matrix) -> sp.csr_matrix:
    """``matrix`` (any scipy sparse matrix or dense array, docs x terms) in the
    canonical layout: CSR, float64, int32 indices, sorted, duplicates summed."""
    m = sp.csr_matrix(matrix, dtype=np.float64)
    m.sum_duplicates()  # also sorts the indices
    if m.indices.dtype != np.int32 and m.shape[1] < 2**31:
        m.indices = m.indices.astype(np.int32)
    return m


def read_mm(path, orientation: str = DOCS_TERMS) -> sp.csr_matrix:
    """Read a Matrix Market coordinate file (``.mm``, ``.mtx``, optionally
    ``.gz``/``.bz2``) as a docs x terms CSR matrix.

    ``orientation`` says how the file is laid out (see the module's doc):
    ``'docs-terms'`` (gensim's MmCorpus, the default) or ``'terms-docs'``.
    """
    _check_orientation(orientation)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file {path!r} not found")
    try:  # scipy >= 1.12 asks which kind of result is wanted (and warns if not told)
        m = scipy.io.mmread(path, spmatrix=True)
    except TypeError:
        m = scipy.io.mmread(path)
    if not sp.issparse(m):
        m = sp.csr_matrix(m)
    if orientation == TERMS_DOCS:
        m = m.T
    return as_corpus(m)


def write_mm(path, corpus, orientation: str = DOCS_TERMS) -> None:
    """Write ``corpus`` (docs x terms) as a Matrix Market coordinate file at
    exactly ``path``, in ``orientation`` (default: gensim's docs x terms).
    Integer counts are written as ``integer``, anything else as ``real``."""
    _check_orientation(orientation)
    m = as_corpus(corpus)
    if orientation == TERMS_DOCS:
        m = m.T.tocsr()
        m.sort_indices()
    integral = bool(np.all(m.data == np.round(m.data)))
    out = sp.coo_matrix(m)
    if integral:
        out = out.astype(np.int64)
    # a file object: scipy would append '.mtx' to a name without it
    with open(os.fspath(path), "wb") as f:
        scipy.io.mmwrite(
            f,
            out,
            comment=f"dispy.workloads corpus, {orientation}",
            field="integer" if integral else "real",
            symmetry="general",
        )


def from_bow(docs, num_terms: int | None = None) -> sp.csr_matrix:
    """A gensim bag-of-words corpus (an iterable of documents, each a list of
    ``(term_id, weight)``) as a docs x terms CSR matrix.  ``num_terms``
    defaults to the largest term id + 1."""
    indptr = [0]
    indices: list[int] = []
    data: list[float] = []
    for doc in docs:
        for term, weight in doc:
            indices.append(int(term))
            data.append(float(weight))
        indptr.append(len(indices))
    n_terms = (max(indices) + 1 if indices else 0) if num_terms is None else num_terms
    if indices and max(indices) >= n_terms:
        raise ValueError(f"term id {max(indices)} does not fit num_terms={n_terms}")
    m = sp.csr_matrix(
        (np.asarray(data, np.float64), np.asarray(indices, np.int64), np.asarray(indptr)),
        shape=(len(indptr) - 1, n_terms),
    )
    return as_corpus(m)


def to_bow(corpus):
    """Yield each document of ``corpus`` (docs x terms) as gensim's bag of
    words: a list of ``(term_id, weight)`` sorted by term id (a streamed
    corpus that ``gensim.models.LsiModel``/``LdaModel`` accept)."""
    m = as_corpus(corpus)
    for i in range(m.shape[0]):
        lo, hi = m.indptr[i], m.indptr[i + 1]
        yield list(zip(m.indices[lo:hi].tolist(), m.data[lo:hi].tolist(), strict=True))


def chunk_bounds(n_docs: int, chunksize: int) -> list[tuple[int, int]]:
    """Row ranges ``[(lo, hi), ...]`` of at most ``chunksize`` documents."""
    if chunksize < 1:
        raise ValueError("chunksize must be at least 1")
    return [(lo, min(lo + chunksize, n_docs)) for lo in range(0, n_docs, chunksize)]


@dataclass
class SyntheticCorpus:
    """What ``synthetic_corpus`` drew: the counts and the truth behind them."""

    matrix: sp.csr_matrix  #: docs x terms counts (float64)
    topics: np.ndarray  #: K x terms, the planted topic-word distributions (rows sum to 1)
    doc_topics: np.ndarray  #: docs x K, each document's topic proportions theta


def synthetic_corpus(
    n_docs: int,
    n_terms: int,
    n_topics: int,
    doc_length: float = 100.0,
    alpha: float = 0.1,
    eta: float = 0.01,
    seed: int = 0,
    block: int = 20_000,
) -> SyntheticCorpus:
    """Draw a corpus by LDA's generative process, reproducibly from ``seed``.

    * K topics ``beta_k ~ Dirichlet(eta)`` over the ``n_terms`` terms;
    * for each document ``theta_d ~ Dirichlet(alpha)``, its length
      ``N_d ~ Poisson(doc_length)`` (at least 1), and for each of its words a
      topic ``z ~ theta_d`` then a term ``w ~ beta_z``.

    Vectorised (per block of documents: topic counts by one multinomial per
    document, terms by one ``searchsorted`` into the topics' stacked CDFs), so
    100,000 documents take seconds.
    """
    if min(n_docs, n_terms, n_topics) < 1:
        raise ValueError("n_docs, n_terms and n_topics must be positive")
    rng = np.random.default_rng(seed)
    topics = rng.dirichlet(np.full(n_terms, eta), size=n_topics)
    # a Dirichlet with a tiny eta can put all mass on one term; keep rows exact
    topics /= topics.sum(axis=1, keepdims=True)
    theta = rng.dirichlet(np.full(n_topics, alpha), size=n_docs)
    lengths = np.maximum(rng.poisson(doc_length, size=n_docs), 1)
    # topic k's CDF shifted to [k, k+1]: the stacked CDFs are non-decreasing,
    # so one searchsorted maps (topic, uniform) to a term for every token
    cdf = np.cumsum(topics, axis=1)
    cdf[:, -1] = 1.0
    stacked = (cdf + np.arange(n_topics)[:, None]).ravel()
    parts = []
    for lo in range(0, n_docs, block):
        hi = min(lo + block, n_docs)
        counts = rng.multinomial(lengths[lo:hi], theta[lo:hi])  # docs x K tokens per topic
        z = np.repeat(np.tile(np.arange(n_topics), hi - lo), counts.ravel())
        doc = np.repeat(np.arange(lo, hi), lengths[lo:hi])
        u = rng.random(z.size)
        idx = np.searchsorted(stacked, z + u, side="right")
        term = np.clip(idx - z * n_terms, 0, n_terms - 1)
        parts.append(
            sp.csr_matrix(
                (np.ones(z.size), (doc - lo, term)), shape=(hi - lo, n_terms), dtype=np.float64
            )
        )
    matrix = as_corpus(sp.vstack(parts, format="csr"))
    return SyntheticCorpus(matrix=matrix, topics=topics, doc_topics=theta)
