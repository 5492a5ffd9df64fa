"""Mutual TLS with certificates made by dispy-certs, on loopback."""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

import pytest

import dispy
from dispy.certs import make_certs

from . import jobs


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(str(tmp_path_factory.mktemp("certs")))


def client_tls(certs) -> dict:
    """The client's TLS options from a set of certificates."""
    return {"certfile": certs["client"], "keyfile": certs["client_key"], "cafile": certs["ca"]}


@pytest.fixture
def tls_node(node_factory, certs):
    return node_factory(
        cpus=1,
        secret="t",
        extra_args=(
            "--certfile",
            certs["node"],
            "--keyfile",
            certs["node_key"],
            "--cafile",
            certs["ca"],
        ),
    )


def test_certificates_are_written_privately(certs):
    for name in ("ca_key", "node_key", "client_key"):
        assert stat.S_IMODE(os.stat(certs[name]).st_mode) == 0o600


def test_mutual_tls_works(tls_node, certs):
    with dispy.JobCluster(
        jobs.double,
        nodes=[tls_node.address],
        secret="t",
        **client_tls(certs),
    ) as cluster:
        assert cluster.submit(21)(timeout=30) == 42


def test_client_certificate_from_another_ca_is_refused(tls_node, tmp_path):
    other = make_certs(str(tmp_path / "other"))
    with dispy.JobCluster(
        jobs.double,
        nodes=[tls_node.address],
        secret="t",
        **client_tls(other),
    ) as cluster:
        job = cluster.submit(1)
        assert job(timeout=30) is None
        assert job.status == dispy.DispyJob.Abandoned and "TLS" in job.exception


def test_plain_client_to_tls_node_gets_a_clear_error(node_factory, certs):
    n = node_factory(
        cpus=1,
        secret="t",
        extra_args=("--certfile", certs["node"], "--keyfile", certs["node_key"],
                    "--cafile", certs["ca"], "--handshake_timeout", "0.5"),
    )  # fmt: skip
    told = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if "if the node uses TLS" in record.getMessage():
                told.set()

    watch = Watch()
    logging.getLogger("dispy").addHandler(watch)
    try:
        with dispy.JobCluster(jobs.double, nodes=[n.address], secret="t") as cluster:
            job = cluster.submit(1)
            assert told.wait(30)  # the warning names the likely cause
            cluster.close(terminate=True)
    finally:
        logging.getLogger("dispy").removeHandler(watch)
    assert job.status != dispy.DispyJob.Finished


def test_tls_client_to_plain_node_gets_a_clear_error(node, certs):
    with dispy.JobCluster(
        jobs.double,
        nodes=[node.address],
        secret=node.secret,
        **client_tls(certs),
    ) as cluster:
        job = cluster.submit(1)
        assert job(timeout=30) is None
        assert "TLS" in job.exception


def test_dispy_style_single_self_signed_cert(node_factory, certs, tmp_path):
    # dispy's documented setup: one certificate (with its key in the same file) everywhere
    combined = tmp_path / "mycertkey.pem"
    combined.write_bytes(Path(certs["node"]).read_bytes() + Path(certs["node_key"]).read_bytes())
    # the node certificate is not self-signed: trust its CA on both sides
    n = node_factory(
        cpus=1, secret="t", extra_args=("--certfile", str(combined), "--cafile", certs["ca"])
    )
    with dispy.JobCluster(
        jobs.double, nodes=[n.address], secret="t", certfile=str(combined), cafile=certs["ca"]
    ) as cluster:
        assert cluster.submit(2)(timeout=30) == 4


def test_local_cluster_with_tls(certs):
    with dispy.JobCluster(
        jobs.double,
        nodes="local",
        certfile=certs["node"],  # the local node uses the client's certificate
        keyfile=certs["node_key"],
        cafile=certs["ca"],
    ) as cluster:
        assert cluster.submit(5)(timeout=30) == 10


def test_large_array_over_tls(tls_node, certs):
    import numpy as np

    arr = np.random.default_rng(2).random(3_000_000)
    with dispy.JobCluster(
        jobs.array_double,
        nodes=[tls_node.address],
        secret="t",
        **client_tls(certs),
    ) as cluster:
        out = cluster.submit(arr)(timeout=60)
    assert np.array_equal(out, arr * 2)
