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


def test_certificates_are_private_even_over_old_files(tmp_path):
    """#18 finding 7: an existing key file keeps no wider mode, and a symlink put
    where a key goes is replaced, never written through."""
    d = tmp_path / "certs"
    d.mkdir()
    (d / "node.key").write_text("old")
    (d / "node.key").chmod(0o644)
    victim = tmp_path / "victim"
    victim.write_text("not a key")
    (d / "client.key").symlink_to(victim)
    paths = make_certs(str(d))
    assert stat.S_IMODE(os.stat(paths["node_key"]).st_mode) == 0o600
    assert not os.path.islink(paths["client_key"])
    assert victim.read_text() == "not a key"


def test_scheduler_checks_certificates_against_the_cluster_ca(tls_node, certs, tmp_path):
    """#18 finding 7: dispyscheduler takes dispy-certs' CA (--node_cafile,
    --cluster_cafile), so nodes and clients may each have their own certificate."""
    import subprocess

    from .installed import program

    proc = subprocess.Popen(
        [*program("dispyscheduler"), "-i", "127.0.0.1", "-p", "0", "-n", tls_node.address,
         "--node_certfile", certs["client"], "--node_keyfile", certs["client_key"],
         "--node_cafile", certs["ca"], "--cluster_certfile", certs["node"],
         "--cluster_keyfile", certs["node_key"], "--cluster_cafile", certs["ca"],
         "--dest_path", str(tmp_path / "sched"), "--daemon"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, DISPY_SECRET="t"),
    )  # fmt: skip
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("dispyscheduler ready"), proc.stderr.read()
        port = int(ready.split("addr=")[1].split()[0].rsplit(":", 1)[1])
        with dispy.SharedJobCluster(
            jobs.double, scheduler_node="127.0.0.1", scheduler_port=port, secret="t",
            recover_file=False, **client_tls(certs),
        ) as cluster:  # fmt: skip
            assert cluster.submit(21)(timeout=60) == 42
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_each_node_can_have_its_own_key_and_the_ca_key_stays_apart(node_factory, tmp_path):
    """#18 finding 7: dispy-certs --node NAME gives each node a key of its own
    (one stolen node key is not every node's), and the CA's key is kept in a
    private folder, not beside the files that go to the nodes."""
    import subprocess

    from cryptography import x509

    from .installed import program

    d = tmp_path / "certs"
    proc = subprocess.run(
        [*program("dispy-certs"), str(d), "--node", "n1", "--node", "10.231.7.7"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "keep " in proc.stdout and "private/ca.key off the nodes" in proc.stdout
    assert not (d / "ca.key").exists() and (d / "private" / "ca.key").exists()
    assert stat.S_IMODE((d / "private").stat().st_mode) == 0o700
    keys = {(d / f"{n}.key").read_bytes() for n in ("node", "node-n1", "node-10.231.7.7")}
    assert len(keys) == 3
    cert = x509.load_pem_x509_certificate((d / "node-n1.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "n1" in san.get_values_for_type(x509.DNSName)
    node = node_factory(
        cpus=1, secret="t",
        extra_args=("--certfile", str(d / "node-n1.pem"), "--keyfile", str(d / "node-n1.key"),
                    "--cafile", str(d / "ca.pem")),
    )  # fmt: skip
    tls = {"certfile": str(d / "client.pem"), "keyfile": str(d / "client.key"),
           "cafile": str(d / "ca.pem")}  # fmt: skip
    with dispy.JobCluster(jobs.double, nodes=[node.address], secret="t", **tls) as cluster:
        assert cluster.submit(4)(timeout=60) == 8
