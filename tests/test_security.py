"""Security defaults: the key file, --insecure, secrets kept out of sight,
limits on unauthenticated connections, and files confined to a computation.

Raw peers use real sockets on 127.0.0.1 only; every one is closed.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess

import psutil
import pytest

import dispy
from dispy.keys import load_or_create_key, resolve_secret
from dispy.protocol import Connection, HandshakeComplete, Kind, derive_key

from . import jobs
from .installed import program


def cluster_ok(address, **kw) -> bool:
    with dispy.JobCluster(jobs.double, nodes=[address], **kw) as cluster:
        return cluster.submit(21)(timeout=30) == 42


# -- the key file ------------------------------------------------------------------


def test_key_file_is_created_private_and_reused(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "cluster.key"
    monkeypatch.setenv("DISPY_KEY_FILE", str(path))
    secret, source = resolve_secret()
    assert str(path) in source and len(secret) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(str(path)) == secret  # the same key next time


def test_node_and_client_agree_through_the_key_file_by_default(node_factory, tmp_path):
    node = node_factory(cpus=1, secret="")  # the node reads DISPY_KEY_FILE itself
    assert cluster_ok(node.address)  # and so does the client: no secret anywhere


def test_a_client_with_another_key_is_refused(node_factory, tmp_path, monkeypatch):
    node = node_factory(cpus=1, secret="")
    monkeypatch.setenv("DISPY_KEY_FILE", str(tmp_path / "other.key"))
    with dispy.JobCluster(jobs.double, nodes=[node.address]) as cluster:
        job = cluster.submit(1)
        assert job(timeout=30) is None and "secret" in job.exception


@pytest.mark.parametrize("addr", ["0.0.0.0", "10.231.9.9", "::"])
def test_insecure_node_refuses_addresses_beyond_loopback(addr):
    """#18 finding 8: no authentication and reachable from other machines is refused."""
    proc = subprocess.run(
        [*program("dispynode"), "--insecure", "-i", addr, "--daemon"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"--insecure with -i {addr}: whoever reaches that address could run any code" in (
        proc.stderr
    )


def test_insecure_node_binds_loopback_and_says_so(tmp_path):
    proc = subprocess.Popen(
        [*program("dispynode"), "--insecure", "--node_port", "0", "--daemon",
         "--dest_path", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ready = proc.stdout.readline()
        assert "addr=127.0.0.1:" in ready  # not 0.0.0.0: --insecure stays on this machine
        address = ready.split("addr=")[1].split()[0]
        assert cluster_ok(address, insecure=True)
        # a client that expects authentication does not talk to it by accident
        with dispy.JobCluster(jobs.double, nodes=[address]) as cluster:
            job = cluster.submit(1)
            assert job(timeout=30) is None and job.status == dispy.DispyJob.Abandoned
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "INSECURE" in err


def test_secret_never_reaches_logs_or_process_titles(node_factory, caplog):
    caplog.set_level(logging.DEBUG, logger="dispy")
    secret = "do-not-print-this-secret"
    node = node_factory(cpus=1, secret=secret, extra_args=("-d",))
    assert secret not in " ".join(psutil.Process(node.proc.pid).cmdline())  # passed by env
    assert cluster_ok(node.address, secret=secret)
    with dispy.JobCluster(jobs.double, nodes=[node.address], secret="wrong-one") as cluster:
        job = cluster.submit(1)
        job(timeout=30)
    node.stop()  # its debug log has been forwarded into caplog by now
    assert "authenticated" in caplog.text  # the node's log is there...
    assert secret not in caplog.text and "wrong-one" not in caplog.text  # ...secrets are not
    assert "wrong-one" not in (job.exception or "")


def test_secret_on_command_line_warns_and_secret_file_works(tmp_path):
    f = tmp_path / "s"
    f.write_text("from-a-file\n")
    f.chmod(0o600)
    for args, expect in (
        (["-s", "x"], "can be seen by other users"),
        (["--secret-file", str(f)], "secret file"),
    ):
        proc = subprocess.Popen(
            [*program("dispynode"), "-i", "127.0.0.1", "--node_port", "0",
             "--daemon", "--dest_path", str(tmp_path), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            ready = proc.stdout.readline()
            assert ready.startswith("dispynode ready")
            if "--secret-file" in args:
                address = ready.split("addr=")[1].split()[0]
                assert cluster_ok(address, secret="from-a-file")
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        assert expect in err
        assert "from-a-file" not in err


# -- limits -------------------------------------------------------------------------


def test_flood_of_silent_connections_is_bounded(node_factory):
    """300 silent connections from one address: that address gets a few slots of
    the 16 (--max_unauth 16: 4 per address), each new one closing its oldest; clients
    already in are served, and a new client from another address gets in during
    the flood (#18 finding 3: one host used to keep everyone out)."""
    node = node_factory(
        cpus=1, secret="f", extra_args=("--max_unauth", "16", "--handshake_timeout", "60")
    )
    rss0 = psutil.Process(node.proc.pid).memory_info().rss
    with dispy.JobCluster(jobs.double, nodes=[node.address], secret="f") as cluster:
        assert cluster.submit(1)(timeout=30) == 2  # connected before the flood
        socks = []
        try:
            for _ in range(300):
                socks.append(
                    socket.create_connection(
                        (node.ip_addr, node.port), timeout=5, source_address=("127.0.0.9", 0)
                    )
                )
            # the authenticated client is served during the flood
            assert [cluster.submit(i)(timeout=30) for i in range(5)] == [0, 2, 4, 6, 8]
            # and a new one, from another address, gets in
            assert cluster_ok(node.address, secret="f")
            # over the per-address limit, the oldest were closed by the node at once
            assert [_closed_by_peer(s) for s in socks] == [True] * 296 + [False] * 4
            rss = psutil.Process(node.proc.pid).memory_info().rss
            assert rss - rss0 < 40 << 20
        finally:
            for s in socks:
                s.close()
    assert cluster_ok(node.address, secret="f")


def _closed_by_peer(s: socket.socket) -> bool:
    """True if the peer closed ``s`` (after what it had sent), False if it is still open."""
    s.settimeout(2)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- files stay inside the computation's folder --------------------------------------------


class RawClient:
    """An authenticated raw peer (blocking socket) speaking the node protocol."""

    def __init__(self, port: int, secret: str, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.conn = Connection("client", derive_key(secret))
        while not self.conn.authenticated:
            for ev in self._recv():
                assert isinstance(ev, HandshakeComplete)
            self._flush()

    def _flush(self) -> None:
        for buf in self.conn.take_output():
            self.sock.sendall(buf)

    def _recv(self):
        data = self.sock.recv(65536)
        assert data, "node closed the connection"
        return self.conn.receive(data)

    def request(self, kind, ctl, payload=()):
        self.conn.send(kind, ctl, payload)
        self._flush()
        while True:
            for ev in self._recv():
                return ev

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("bad", ["../escape.txt", "/etc/escape.txt", "a/../../escape.txt", "x\0y"])
def test_file_paths_cannot_leave_the_computation(daemon, bad):
    peer = RawClient(daemon.port, daemon.secret, daemon.ip_addr)
    try:
        reply = peer.request(Kind.FILE, {"c": "abc123", "n": "comp", "p": bad, "o": 0}, [b"evil"])
        assert reply.kind == Kind.ERROR and "inside the computation" in reply.ctl["r"]
    finally:
        peer.close()
    # where an escaping path would land: the daemon's folder (the computation's
    # parent), its parent, or /etc; nothing was written anywhere below them
    dest = daemon.dest_path
    written = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs if "escape" in f]
    assert written == []
    assert not os.path.exists(os.path.join(os.path.dirname(dest), "escape.txt"))
    assert not os.path.exists("/etc/escape.txt")
    daemon.serves()


def test_symlinks_cannot_lead_files_out(node, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    peer = RawClient(node.port, node.secret, node.ip_addr)
    try:
        peer.conn.send(Kind.FILE, {"c": "lnk1", "n": "comp", "p": "first.txt", "o": 0}, [b"ok"])
        # requests are handled in order: once this one is refused, the first is written
        r0 = peer.request(Kind.FILE, {"c": "lnk1", "n": "comp", "p": "../no", "o": 0}, [b"x"])
        assert r0.kind == Kind.ERROR
        comp_dir = next(p for p in _node_dirs(node) if p.endswith("_lnk1"))
        os.symlink(outside, os.path.join(comp_dir, "dirlink"))  # as a job could
        os.symlink(outside / "target.txt", os.path.join(comp_dir, "filelink"))
        r1 = peer.request(
            Kind.FILE, {"c": "lnk1", "n": "comp", "p": "dirlink/x.txt", "o": 0}, [b"e"]
        )
        r2 = peer.request(Kind.FILE, {"c": "lnk1", "n": "comp", "p": "filelink", "o": 0}, [b"e"])
        assert r1.kind == Kind.ERROR and r2.kind == Kind.ERROR
    finally:
        peer.close()
    assert list(outside.iterdir()) == []


def _node_dirs(node):
    base = node._dir
    return [os.path.join(base, d) for d in os.listdir(base)]


def test_slowloris_peer_is_dropped_at_the_handshake_deadline(node_factory):
    node = node_factory(cpus=1, secret="sl", extra_args=("--handshake_timeout", "1"))
    with socket.create_connection((node.ip_addr, node.port), timeout=10) as s:
        s.recv(4096)  # the node's HELLO
        s.sendall(b"DSPY\x01\x02")  # a few bytes of a header, then nothing more
        s.settimeout(15)
        try:
            assert s.recv(4096) == b""  # closed by the node, well before our 15 s
        except ConnectionResetError:
            pass
    assert cluster_ok(node.address, secret="sl")


def test_a_secret_file_everyone_can_read_is_refused(tmp_path):
    """#18 finding 7: a secret others can read is no secret; the daemon says how to fix it."""
    f = tmp_path / "s"
    f.write_text("shared-by-all\n")
    f.chmod(0o644)
    proc = subprocess.run(
        [*program("dispynode"), "--secret_file", str(f), "--daemon"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"can be read by every user of this machine: chmod 600 {f}" in proc.stderr
    assert "shared-by-all" not in proc.stderr


def test_scheduler_reads_its_secrets_from_files(node_factory, tmp_path):
    """#18 finding 7: dispyscheduler's secrets need not be on its command line."""
    node = node_factory(cpus=1, secret="node-s")
    (tmp_path / "n").write_text("node-s\n")
    (tmp_path / "c").write_text("cluster-s\n")
    for name in ("n", "c"):
        (tmp_path / name).chmod(0o600)
    proc = subprocess.Popen(
        [*program("dispyscheduler"), "-i", "127.0.0.1", "-p", "0", "-n", node.address,
         "--node_secret_file", str(tmp_path / "n"), "--cluster_secret_file", str(tmp_path / "c"),
         "--dest_path", str(tmp_path / "sched"), "--daemon"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("dispyscheduler ready"), proc.stderr.read()
        port = int(ready.split("addr=")[1].split()[0].rsplit(":", 1)[1])
        with dispy.SharedJobCluster(
            jobs.double, scheduler_node="127.0.0.1", scheduler_port=port, secret="cluster-s",
            recover_file=False,
        ) as cluster:  # fmt: skip
            assert cluster.submit(21)(timeout=60) == 42
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "node-s" not in err and "cluster-s" not in err


def test_the_key_is_slow_to_guess_and_short_secrets_are_warned(caplog):
    """#18 finding 4: the cluster key is scrypt of the secret (not one SHA-256),
    so words cannot be tried offline at hundreds of thousands a second."""
    import hashlib

    from dispy.protocol import _connection as c

    word = b"guess-" + os.urandom(4).hex().encode()
    key = derive_key(word.decode())
    assert c.SCRYPT_N * c.SCRYPT_R >= 1 << 16  # 8 MiB of memory-hard work per guess
    assert key == hashlib.scrypt(
        word, salt=c._KEY_SALT, n=c.SCRYPT_N, r=c.SCRYPT_R, p=c.SCRYPT_P, dklen=32
    )
    assert key != hashlib.sha256(b"dispy-key-v1\0" + word).digest()
    resolve_secret("short")
    assert "is short, 5 characters" in caplog.text
    caplog.clear()
    resolve_secret("x" * 24)
    assert "is short" not in caplog.text
