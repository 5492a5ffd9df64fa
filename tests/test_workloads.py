"""The LSI and LDA workloads (dispy.workloads, examples/lsi.py, examples/lda.py):
corpus formats, quality against exact and serial references on small seeded
corpora, distributed runs on real nodes (data placed with cluster.put, and
the fallback that sends it in job arguments), and the example scripts end to
end."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("scipy")

import scipy.sparse as sp  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

import dispy  # noqa: E402
from dispy import workloads  # noqa: E402
from dispy.workloads import (  # noqa: E402
    ClusterRunner,
    SerialRunner,
    call,
    corpus,
    lda,
    lsi,
    preload,
)

from .conftest import EXAMPLES  # noqa: E402

# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes():
    """Two dispynodes of 1 CPU each on 127.0.0.1 (stopped by PID at the end)."""
    secret = secrets.token_hex(16)
    nodes = []
    try:
        for _ in range(2):
            nodes.append(dispy.LocalNode(cpus=1, secret=secret).start())
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def _cluster(nodes):
    cluster = dispy.JobCluster(
        call, nodes=[n.address for n in nodes], secret=nodes[0].secret, setup=preload
    )
    ClusterRunner(cluster).wait_nodes(len(nodes), 30)
    return cluster


@pytest.fixture(scope="module")
def cluster(two_nodes):
    c = _cluster(two_nodes)
    yield c
    c.close()


@pytest.fixture(scope="module")
def lsi_corpus():
    return corpus.synthetic_corpus(1600, 600, 12, doc_length=60, seed=11).matrix


@pytest.fixture(scope="module")
def lda_corpus():
    drawn = corpus.synthetic_corpus(1200, 400, 5, doc_length=80, alpha=0.1, eta=0.05, seed=3)
    return drawn.matrix[:1000], drawn.matrix[1000:], drawn.topics


# -- corpora ------------------------------------------------------------------------------


def test_matrix_market_both_orientations(tmp_path):
    m = corpus.synthetic_corpus(50, 30, 3, doc_length=10, seed=1).matrix
    for orientation in corpus.ORIENTATIONS:
        path = tmp_path / f"{orientation}.mm"
        corpus.write_mm(path, m, orientation)
        rows, cols = map(int, path.read_text().splitlines()[2].split()[:2])
        assert (rows, cols) == (m.shape if orientation == corpus.DOCS_TERMS else m.shape[::-1])
        back = corpus.read_mm(path, orientation)
        assert back.shape == m.shape and (back != m).nnz == 0
        assert back.indices.dtype == np.int32 and back.has_sorted_indices
    # read the other way round: the transpose
    assert corpus.read_mm(tmp_path / "docs-terms.mm", corpus.TERMS_DOCS).shape == (30, 50)
    with pytest.raises(ValueError):
        corpus.read_mm(tmp_path / "docs-terms.mm", "sideways")


def test_gensim_matrix_market_file(tmp_path):
    """gensim's MmWriter layout: real values, 1-based, size line padded with blanks."""
    path = tmp_path / "gensim.mm"
    path.write_text(
        "%%MatrixMarket matrix coordinate real general\n"
        "3 4 4" + " " * 50 + "\n1 1 2.0\n1 4 1.0\n3 2 0.5\n3 3 3.0\n"
    )
    m = corpus.read_mm(path)
    assert m.shape == (3, 4)
    assert list(corpus.to_bow(m)) == [[(0, 2.0), (3, 1.0)], [], [(1, 0.5), (2, 3.0)]]


def test_bag_of_words_round_trip():
    docs = [[(0, 1.0), (5, 2.0)], [], [(2, 3.0), (1, 1.0)]]
    m = corpus.from_bow(docs, num_terms=7)
    assert m.shape == (3, 7) and m[2, 1] == 1.0 and m[0, 5] == 2.0
    assert list(corpus.to_bow(m)) == [[(0, 1.0), (5, 2.0)], [], [(1, 1.0), (2, 3.0)]]
    assert corpus.from_bow(docs).shape == (3, 6)
    with pytest.raises(ValueError):
        corpus.from_bow(docs, num_terms=4)


def test_synthetic_corpus_is_seeded_lda():
    a = corpus.synthetic_corpus(400, 200, 4, doc_length=50, seed=5)
    b = corpus.synthetic_corpus(400, 200, 4, doc_length=50, seed=5)
    c = corpus.synthetic_corpus(400, 200, 4, doc_length=50, seed=6)
    assert (a.matrix != b.matrix).nnz == 0 and np.array_equal(a.topics, b.topics)
    assert (a.matrix != c.matrix).nnz > 0
    assert a.matrix.shape == (400, 200) and a.topics.shape == (4, 200)
    np.testing.assert_allclose(a.topics.sum(axis=1), 1.0)
    np.testing.assert_allclose(a.doc_topics.sum(axis=1), 1.0)
    lengths = np.asarray(a.matrix.sum(axis=1)).ravel()
    assert lengths.min() >= 1 and abs(lengths.mean() - 50) < 2
    # the words follow the topics: expected counts theta @ beta * length
    expected = (a.doc_topics @ a.topics) * lengths[:, None]
    got = a.matrix.toarray()
    assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.8


# -- LSI ----------------------------------------------------------------------------------


def test_lsi_matches_dense_svd(lsi_corpus):
    k = 10
    res = lsi.lsi(lsi_corpus, k, oversample=30, power_iters=2, chunksize=400)
    u, s, _ = np.linalg.svd(lsi_corpus.toarray().T, full_matrices=False)
    np.testing.assert_allclose(res.s, s[:k], rtol=0.01)
    assert np.all(np.diff(res.s) <= 0)
    assert res.u.shape == (600, k)
    np.testing.assert_allclose(res.u.T @ res.u, np.eye(k), atol=1e-10)
    angles = lsi.principal_angles(res.u, u[:, :k])
    assert angles.max() < 0.05, angles
    assert res.passes == 4 and res.chunks == 4


@pytest.mark.parametrize("use_put", [True, False], ids=["put", "arguments"])
def test_lsi_distributed_equals_one_node(two_nodes, cluster, lsi_corpus, use_put):
    kw = dict(oversample=30, power_iters=2, chunksize=400, seed=3)
    serial = lsi.lsi(lsi_corpus, 10, **kw)
    runner = ClusterRunner(cluster, use_put=use_put)
    assert runner.placement == ("put" if use_put else "arguments") and runner.cpus == 2
    both = lsi.lsi(lsi_corpus, 10, runner, **kw)
    with _cluster(two_nodes[:1]) as one_cluster:
        one = lsi.lsi(lsi_corpus, 10, ClusterRunner(one_cluster, use_put=use_put), **kw)
    for res in (both, one):
        np.testing.assert_allclose(res.s, serial.s, rtol=1e-10)
        np.testing.assert_allclose(res.u, serial.u, atol=1e-9)
        assert res.bytes_sent > 0 and len(res.pass_bytes) == res.passes == 4
    if use_put:
        # the corpus once per node, each pass's Q once per node: less than in arguments
        args = lsi.lsi(lsi_corpus, 10, ClusterRunner(cluster, use_put=False), **kw)
        assert both.bytes_sent < args.bytes_sent
        assert sum(both.pass_bytes[1:]) < sum(args.pass_bytes[1:])


def test_node_sum_files(tmp_path, monkeypatch):
    """A node's part of a sum: parts added under a lock, taken once with the list
    of what was added, then gone; a part of another shape is refused."""
    monkeypatch.chdir(tmp_path)  # a job's working folder: its computation's on the node
    parts = [np.full((3, 2), float(i)) for i in range(4)]
    for i in (2, 0, 3):
        assert workloads.node_sum_add(np.asarray, "k1", i, parts[i]) == (3, 2)
    total, added = workloads.node_sum_take("k1")
    assert added == [2, 0, 3] and total.tolist() == [5.0] * 6
    assert workloads.node_sum_take("k1") == (None, [])
    assert os.listdir(tmp_path) == []
    workloads.node_sum_add(np.asarray, "k2", 0, parts[0])
    with pytest.raises(ValueError, match="holds 48 bytes"):
        workloads.node_sum_add(np.asarray, "k2", 1, np.zeros(3))
    with pytest.raises(ValueError, match="sum key"):
        workloads.node_sum_add(np.asarray, "../k", 0, parts[0])


def test_runner_sum_merges_on_each_node(cluster, two_nodes):
    """Twelve parts on two nodes: each node sends one array (two take jobs), the
    sum is the ordered one up to rounding, and the nodes keep no sum files."""
    runner = ClusterRunner(cluster)
    assert runner.merge
    args = [((50_000,), (i + 1) / 7.0) for i in range(12)]
    want = workloads.ordered_sum(np.full(*a) for a in args)
    before = cluster.stats()["nodes"]
    got = runner.sum(np.full, args)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    after = cluster.stats()["nodes"]
    received = sum(after[n]["bytes_received"] - before[n]["bytes_received"] for n in after)
    assert received < 3 * want.nbytes, received  # 2 node sums, not 12 parts (400 KB each)
    for node in two_nodes:
        left = [f for _, _, fs in os.walk(node.dest_path) for f in fs if ".dispy-sum-" in f]
        assert left == []
    plain = ClusterRunner(cluster, merge=False)
    np.testing.assert_allclose(plain.sum(np.full, args), want, rtol=1e-12)


def test_node_sum_then_files(tmp_path, monkeypatch):
    """On the node: a sum with all its parts becomes a NodeArray file that jobs
    read (read-only, shared map); one lacking parts comes back to the client
    as it is; the array it replaces is removed; a missing one is named."""
    monkeypatch.chdir(tmp_path)
    parts = [np.full((3, 2), float(i + 1)) for i in range(3)]
    for i in (1, 0, 2):
        workloads.node_sum_add(np.asarray, "s1", i, parts[i])
    assert workloads.node_sum_then("s1", 3, (3, 2), np.negative) == (True, (3, 2), None)
    one = workloads.NodeArray("s1", (3, 2), "n1")
    got = one.get()
    assert got.tolist() == [[-6.0, -6.0]] * 3 and not got.flags.writeable
    assert sorted(os.listdir(tmp_path)) == [".dispy-array-s1"]  # the sum's files are gone
    for i in (0, 2):  # part 1 ran on another node
        workloads.node_sum_add(np.asarray, "s2", i, parts[i])
    done, total, added = workloads.node_sum_then("s2", 3, (3, 2), np.negative, drop="s1")
    assert not done and added == [0, 2] and total.tolist() == [4.0] * 6
    assert os.listdir(tmp_path) == []  # s1 dropped
    assert workloads.node_array_get(one).tolist() == [[-6.0, -6.0]] * 3  # (this process's map)
    with pytest.raises(workloads.NodeArrayMissing, match=r"not on this node: it was made on n2"):
        workloads.NodeArray("s2", (3, 2), "n2").get()


def test_node_sum_then_orthonormalises_the_sum_file_in_place(tmp_path, monkeypatch):
    """LSI's then(): Q is computed in the shared map of the sum's file, which
    becomes the NodeArray itself (the same file: nothing copied)."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((50, 4)) for _ in range(2)]
    for i, part in enumerate(parts):
        workloads.node_sum_add(np.asarray, "q1", i, part)
    inode = os.stat(tmp_path / ".dispy-sum-q1").st_ino
    done, shape, _ = workloads.node_sum_then("q1", 2, (50, 4), lsi._ORTH_IN_PLACE)
    assert done and shape == (50, 4)
    assert os.stat(tmp_path / ".dispy-array-q1").st_ino == inode
    assert os.listdir(tmp_path) == [".dispy-array-q1"]
    q = workloads.NodeArray("q1", shape, "n1").get()
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-12)
    y = parts[0] + parts[1]
    np.testing.assert_allclose(lsi.principal_angles(q, y), 0.0, atol=1e-7)


def test_runner_sum_then_keeps_the_result_on_a_single_node(two_nodes, cluster):
    """One node: then(sum) is computed there and stays there (a NodeArray; the
    client receives neither the sum nor the result until get()); two nodes:
    the client applies then and puts the result on both."""
    args = [((40_000,), (i + 1) / 7.0) for i in range(6)]
    want = -workloads.ordered_sum(np.full(*a) for a in args)
    with _cluster(two_nodes[:1]) as one_cluster:
        runner = ClusterRunner(one_cluster)
        before = one_cluster.stats()["nodes"]
        handle = runner.sum_then(np.full, args, np.negative, name="neg")
        after = one_cluster.stats()["nodes"]
        received = sum(after[n]["bytes_received"] - before[n]["bytes_received"] for n in after)
        assert isinstance(handle, workloads.NodeArray) and handle.shape == want.shape
        assert received < want.nbytes // 4, received
        np.testing.assert_allclose(runner.get(handle), want, rtol=1e-12)
        a = np.arange(8.0).reshape(2, 4)  # a job reads it on the node: A^T (A Q)
        q = want.reshape(4, -1)
        node_view = workloads.NodeArray(handle.key, q.shape, handle.node)
        got = one_cluster.submit(lsi.power_step, workloads.Inline(a), node_view)()
        np.testing.assert_allclose(got, a.T @ (a @ q), rtol=1e-12)
        again = runner.sum_then(np.full, args, np.negative, name="neg")  # replaces the first
        assert again.key != handle.key
        left = [f for _, _, fs in os.walk(two_nodes[0].dest_path) for f in fs]
        assert sum(".dispy-array-" in f for f in left) == 1, left
    both = ClusterRunner(cluster).sum_then(np.full, args, np.negative, name="neg")
    assert isinstance(both, dispy.NodeData)
    np.testing.assert_allclose(both.get(), want, rtol=1e-12)


def test_lsi_starts_again_when_the_node_holding_q_is_lost(two_nodes, lsi_corpus):
    """A NodeArray its node does not have (the node restarted): the next pass's
    jobs fail with NodeArrayLost and lsi runs its passes again with Q on the client."""

    class LosingRunner(ClusterRunner):
        lost = 0

        def sum_then(self, *args, **kwargs):
            handle = super().sum_then(*args, **kwargs)
            if isinstance(handle, workloads.NodeArray) and not self.lost:
                self.lost += 1
                return workloads.NodeArray(handle.key + "gone", handle.shape, handle.node)
            return handle

    kw = dict(oversample=30, power_iters=2, chunksize=400, seed=3)
    serial = lsi.lsi(lsi_corpus, 10, **kw)
    logged = []
    with _cluster(two_nodes[:1]) as one_cluster:
        runner = LosingRunner(one_cluster)
        res = lsi.lsi(lsi_corpus, 10, runner, log=logged.append, **kw)
    assert runner.lost == 1
    assert any("NodeArrayMissing" in m and "starting the passes again" in m for m in logged)
    np.testing.assert_allclose(res.s, serial.s, rtol=1e-10)
    np.testing.assert_allclose(res.u, serial.u, atol=1e-9)


def test_runner_falls_back_without_put():
    class OldCluster:  # a cluster API without put()
        def status(self):
            return [], 0

    runner = ClusterRunner(OldCluster())
    assert not runner.use_put and runner.placement == "arguments"
    m = corpus.synthetic_corpus(20, 10, 2, doc_length=5, seed=0).matrix
    refs = runner.scatter(m, [(0, 7), (7, 20)])
    assert (sp.vstack([r.get() for r in refs]) != m).nnz == 0
    assert runner.put(np.arange(3)).get().tolist() == [0, 1, 2]


# -- LDA ----------------------------------------------------------------------------------


def _gensim_inference(a, exp_elog_beta, alpha, iterations, threshold, gamma):
    """gensim's LdaModel.inference (one document at a time), transcribed, plus
    its bound() for the same documents without the topics' term."""
    sstats = np.zeros_like(exp_elog_beta)
    elog_beta = np.log(exp_elog_beta)
    bound = 0.0
    for d in range(a.shape[0]):
        ids = a.indices[a.indptr[d] : a.indptr[d + 1]]
        cts = a.data[a.indptr[d] : a.indptr[d + 1]]
        gammad = gamma[d]
        exp_etd = np.exp(lda.dirichlet_expectation(gammad))
        ebd = exp_elog_beta[:, ids]
        phinorm = exp_etd @ ebd + 1e-100
        for _ in range(iterations):
            last = gammad
            gammad = alpha + exp_etd * ((cts / phinorm) @ ebd.T)
            exp_etd = np.exp(lda.dirichlet_expectation(gammad))
            phinorm = exp_etd @ ebd + 1e-100
            if np.mean(np.abs(gammad - last)) < threshold:
                break
        gamma[d] = gammad
        sstats[:, ids] += np.outer(exp_etd, cts / phinorm)
        etd = lda.dirichlet_expectation(gammad)
        bound += np.sum(cts * logsumexp(etd + elog_beta[:, ids].T, axis=1))
        bound += np.sum((alpha - gammad) * etd) + np.sum(lda.gammaln(gammad) - lda.gammaln(alpha))
        bound += lda.gammaln(np.sum(alpha)) - lda.gammaln(np.sum(gammad))
    return sstats * exp_elog_beta, bound


def test_estep_is_gensims(lda_corpus):
    """The vectorised E-step gives gensim's per-document results."""
    train, _, _ = lda_corpus
    a = sp.vstack([train[:150], sp.csr_matrix((2, train.shape[1])), train[150:200]], format="csr")
    rng = np.random.default_rng(0)
    exp_elog_beta = np.exp(lda.dirichlet_expectation(rng.gamma(2.0, 1.0, (5, train.shape[1]))))
    alpha = np.full(5, 0.2)
    model = SerialRunner().put({"expElogbeta": exp_elog_beta})
    chunk = SerialRunner().scatter(a, [(0, a.shape[0])])[0]
    got = lda.estep(chunk, model, alpha, 50, 1e-3, seed=(4, 0, 1))
    gamma0 = np.random.default_rng([4, 0, 1]).gamma(100.0, 0.01, (a.shape[0], 5))
    want, bound = _gensim_inference(a, exp_elog_beta, alpha, 50, 1e-3, gamma0)
    dense = np.zeros_like(want)
    dense[:, got["cols"]] = got["sstats"]
    np.testing.assert_allclose(dense, want, rtol=1e-8, atol=1e-12)
    assert got["bound"] == pytest.approx(bound, rel=1e-9)
    assert got["docs"] == 202 and got["words"] == pytest.approx(a.sum())


@pytest.mark.parametrize("use_put", [True, False], ids=["put", "arguments"])
def test_lda_distributed_vs_serial(cluster, lda_corpus, use_put):
    train, heldout, planted = lda_corpus
    kw = dict(passes=4, chunksize=200, seed=1)
    runner = ClusterRunner(cluster, use_put=use_put)
    dist = lda.lda(train, 5, runner, **kw)  # each update's 200 documents: a job per CPU
    assert dist.updates == 4 * 5 and dist.chunks == 10 and len(dist.pass_bytes) == 4
    assert dist.bytes_sent > 0
    dist_lp = lda.log_perplexity(dist, heldout, runner)
    # the same updates, serial, each E-step cut the same way: the same result up to rounding
    same = lda.lda(train, 5, split=2, **kw)
    np.testing.assert_allclose(dist.lam, same.lam, rtol=1e-7)
    assert lda.log_perplexity(dist, None, runner) == pytest.approx(
        lda.log_perplexity(same), rel=1e-6
    )
    # serial with the E-step in one piece: only the documents' random starts differ
    serial = lda.lda(train, 5, **kw)
    serial_lp = lda.log_perplexity(serial, heldout)
    assert abs(dist_lp - serial_lp) <= 0.005 * abs(serial_lp), (dist_lp, serial_lp)
    # the planted topics are recovered
    np.testing.assert_allclose(dist.topics.sum(axis=1), 1.0)
    for model in (dist, serial):
        _, cos = lda.match_topics(model.topics, planted)
        assert cos.min() > 0.95, cos


def test_lda_update_schedule_is_gensims():
    """An update per chunk; the learning rate counts documents merged in the first
    pass only (gensim's extra passes keep the first pass's last rate); batch VB is
    one update a pass; cutting an update's E-step changes only the random starts."""
    m = corpus.synthetic_corpus(300, 50, 3, doc_length=20, seed=2).matrix
    got = lda.lda(m, 3, passes=3, chunksize=100, split=1, seed=4)
    assert got.updates == 9 and got.chunks == 3
    # the reference: gensim's online loop written out, with the same E-step
    refs = SerialRunner().scatter(m, [(0, 100), (100, 200), (200, 300)])
    alpha, eta = np.full(3, 1 / 3), 1 / 3
    lam = eta + np.random.default_rng(4).gamma(100.0, 0.01, (3, 50))
    for p in range(3):
        for i, ref in enumerate(refs):
            model = SerialRunner().put({"expElogbeta": np.exp(lda.dirichlet_expectation(lam))})
            r = lda.estep(ref, model, alpha, 50, 1e-3, seed=(4, p, i))
            sstats = np.zeros_like(lam)
            sstats[:, r["cols"]] = r["sstats"]
            merged = 100 * (i if p == 0 else 3)
            rho = (1.0 + p + merged / 100) ** -0.5
            lam = (1 - rho) * lam + rho * (eta + 3 * sstats)
    np.testing.assert_allclose(got.lam, lam, rtol=1e-10)
    assert lda.lda(m, 3, passes=3, chunksize=100, split=3).chunks == 9
    batch = lda.lda(m, 3, passes=2, chunksize=100, update_every=0)
    assert batch.updates == 2 and batch.chunks == 1
    with pytest.raises(ValueError):
        lda.lda(m, 3, chunksize=0)
    with pytest.raises(ValueError):
        lda.lda(m, 3, split=0)


def test_lda_quality_per_pass_against_gensim():
    """At equal passes and gensim's defaults (a chunk per M-step), the held-out
    per-word bound is within 0.5% of gensim's LdaModel or better, serial and with
    each update cut in two as on 2 CPUs."""
    gensim = pytest.importorskip("gensim")
    from gensim.matutils import Sparse2Corpus

    drawn = corpus.synthetic_corpus(4500, 800, 10, doc_length=80, seed=7)
    train, heldout = drawn.matrix[:4000], drawn.matrix[4000:]
    kw = dict(passes=2, chunksize=500)
    g = gensim.models.LdaModel(
        Sparse2Corpus(train, documents_columns=False), num_topics=10, eval_every=None,
        random_state=0, **kw,
    )  # fmt: skip
    theirs = g.log_perplexity(list(Sparse2Corpus(heldout, documents_columns=False)))
    for split in (1, 2):
        ours = lda.log_perplexity(lda.lda(train, 10, split=split, seed=0, **kw), heldout)
        assert ours >= theirs * 1.005, (split, ours, theirs)  # bounds are negative


# -- the examples, end to end -------------------------------------------------------------


def _run(script, *args, cwd):
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_example_scripts(tmp_path):
    _run("make_corpus.py", "c.mm", "--docs", 600, "--terms", 300, "--topics", 4,
         "--doc-length", 50, "--heldout", "h.mm", "--heldout-docs", 100, "--seed", 2,
         cwd=tmp_path)  # fmt: skip
    m = corpus.read_mm(tmp_path / "c.mm")
    assert m.shape == (600, 300)

    _run("lsi.py", "--corpus", "c.mm", "--topics", 5, "--local", 2, "--json", "lsi.json",
         "--save-u", "u.npy", cwd=tmp_path)  # fmt: skip
    out = json.loads((tmp_path / "lsi.json").read_text())
    assert out["documents"] == 600 and out["terms"] == 300 and out["bytes_sent"] > 0
    assert out["seconds"] > 0 and out["cpus"] == 2
    s = np.linalg.svd(m.toarray(), compute_uv=False)[:5]
    np.testing.assert_allclose(out["singular_values"], s, rtol=0.01)
    u = np.load(tmp_path / "u.npy")
    assert u.shape == (300, 5)

    _run("lda.py", "--corpus", "c.mm", "--topics", 4, "--passes", 2, "--heldout", "h.mm",
         "--local", 2, "--json", "lda.json", "--save-topics", "t.npy", cwd=tmp_path)  # fmt: skip
    out = json.loads((tmp_path / "lda.json").read_text())
    assert out["documents"] == 600 and out["heldout_documents"] == 100
    assert out["perplexity_on"] == "heldout" and -20 < out["log_perplexity"] < 0
    assert out["log_perplexity"] < out["documents_bound_per_word"] < 0
    assert out["seconds"] > 0 and out["bytes_sent"] > 0
    topics = np.load(tmp_path / "t.npy")
    assert topics.shape == (4, 300)
    np.testing.assert_allclose(topics.sum(axis=1), 1.0)


@pytest.mark.parametrize("case", ["scaled", "nearly dependent", "dependent"])
def test_orthonormalize_keeps_the_span_with_orthonormal_columns(case):
    """One Cholesky QR pass for a well-conditioned matrix (its columns' scales may
    differ by 1e6), a second for a nearly dependent one, Householder QR for a
    dependent one: orthonormal columns spanning the input's columns each time."""
    from dispy.workloads.lsi import orthonormalize

    rng = np.random.default_rng(3)
    y = rng.standard_normal((3000, 60))
    if case == "scaled":
        y *= np.logspace(0, 6, 60)
    elif case == "nearly dependent":
        y[:, 1] = y[:, 0] + 1e-7 * y[:, 1]
    else:
        y[:, 2] = y[:, 0]
    q = orthonormalize(y)
    assert q.shape == y.shape
    if case != "dependent":  # (the span of a dependent y has fewer dimensions)
        np.testing.assert_allclose(q.T @ q, np.eye(60), atol=1e-12)
        # y lies in q's span
        resid = y - q @ (q.T @ y)
        assert np.linalg.norm(resid) <= 1e-10 * np.linalg.norm(y)
    else:
        assert np.all(np.isfinite(q))
        resid = y - q @ (q.T @ y)
        assert np.linalg.norm(resid) <= 1e-10 * np.linalg.norm(y)
