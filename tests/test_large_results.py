"""A large result's custody on the node: the node's result store takes it once it
has been sent (its acknowledgment cannot come before), or once its client is gone
before it could be; never lost in between.  And what a client that comes back is
told of its jobs there.  Raw client connections to a real
``dispynode``, so that the test decides when to read, acknowledge or hang up."""

import os
import time

from dispy import serialize
from dispy.protocol import Kind

from .test_bad_input import authenticated, recv_messages

BIG = 9 << 20  # above the store's FILE_ABOVE: kept as a file of its own, which we can see
WAIT_S = 15.0


def _kept(node) -> list:
    folder = os.path.join(node.dest_path, "results.db.files")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.02)  # polling the node's folder for a condition, with a deadline


def _send(sock, conn, kind, ctl, payload=()):
    conn.send(kind, ctl, payload)
    sock.sendall(b"".join(bytes(b) for b in conn.take_output()))


def _set_up(sock, conn, cid: str) -> None:
    spec = serialize.package_computation(os.urandom).spec_bytes  # importable everywhere
    _send(sock, conn, Kind.COMPUTE, {"c": cid, "n": "urandom", "sa": 0}, [spec])
    [msg] = recv_messages(sock, conn)
    assert msg.kind == Kind.COMPUTE_REPLY and msg.ctl["ok"] is True, msg.ctl


def _job(sock, conn, cid: str, jid: int) -> None:
    segs = serialize.dumps_args((BIG,), {})
    _send(sock, conn, Kind.JOBS, {"c": cid, "j": [[jid, len(segs)]], "s": [len(s) for s in segs]},
          segs)  # fmt: skip


def _results(sock, conn):
    """The next RESULTS message that holds results (not only jobs' starts)."""
    while True:
        for msg in recv_messages(sock, conn):
            assert msg.kind == Kind.RESULTS
            if msg.ctl["r"]:
                return msg


def test_a_large_result_is_kept_once_sent_until_acknowledged(node_factory):
    node = node_factory(cpus=2)
    sock, conn = authenticated(node)
    with sock:
        _set_up(sock, conn, "big1")
        _job(sock, conn, "big1", 1)
        msg = _results(sock, conn)  # (after the frame that says the job started)
        assert [e["j"] for e in msg.ctl["r"]] == [1]
        assert len(msg.payload) >= BIG
        _until(lambda: len(_kept(node)) == 1, "the result sent, not acknowledged, on disk")
        _send(sock, conn, Kind.ACK, {"c": "big1", "j": [1]})
        _until(lambda: not _kept(node), "the acknowledged result gone from the disk")


def test_a_large_result_whose_client_hangs_up_while_it_is_sent_is_kept(node_factory):
    node = node_factory(cpus=2)
    sock, conn = authenticated(node)
    with sock:
        _set_up(sock, conn, "big2")
        _job(sock, conn, "big2", 7)
        got = 0  # its RESULTS frame has started (past the small one of its start) ...
        while got < 1 << 16:
            got += len(sock.recv(1 << 16)) or 1 << 16
        # ... and the rest is not read
    # the client is gone while the node still sends the result: the node keeps it
    _until(lambda: len(_kept(node)) == 1, "the result its client hung up on, on disk")
    sock, conn = authenticated(node)
    with sock:  # and gives it to the client that comes back for it
        _send(sock, conn, Kind.RESUME, {"c": "big2"})
        msgs = recv_messages(sock, conn, 2)
        resumed = next(m for m in msgs if m.kind == Kind.RESUMED)
        results = next(m for m in msgs if m.kind == Kind.RESULTS)
        assert resumed.ctl["done"] == [7] and [e["j"] for e in results.ctl["r"]] == [7]
        assert len(results.payload) >= BIG
        _send(sock, conn, Kind.ACK, {"c": "big2", "j": [7]})
        _until(lambda: not _kept(node), "the acknowledged result gone from the disk")


def test_the_node_daemon_receives_large_results_without_numpy(node):
    """A job's 8 MB result passes through the daemon in a buffer of its own
    (aligned, not zero-filled) without the daemon importing numpy: importing it
    cost a node's first large result 75 ms, and the daemon's memory more."""
    import dispy

    from . import jobs

    with dispy.JobCluster(jobs.big_bytes, nodes=[node.address], secret=node.secret) as cluster:
        for n in (8 << 20, 3 << 20):
            assert cluster.submit(n)(timeout=60) == b"\x07" * n
    with open(f"/proc/{node.proc.pid}/maps") as maps:
        loaded = maps.read()
    assert "numpy" not in loaded, "the node's daemon imported numpy"


def test_large_buffers_without_numpy_are_aligned_maps(monkeypatch):
    """Where numpy is not loaded, a large receive buffer is an anonymous map whose
    byte ``offset`` sits at an ALIGN boundary, writable, of the size asked."""
    import ctypes
    import sys

    from dispy.protocol import _framing

    monkeypatch.setitem(sys.modules, "numpy", None)  # (as in a process without it)
    for offset in (0, 1, 7, 63, 200):
        buf = _framing.aligned_buffer(_framing.EMPTY_MIN + 5, offset)
        assert buf.nbytes == _framing.EMPTY_MIN + 5 and not buf.readonly
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert (addr + offset) % _framing.ALIGN == 0
        buf[-1:] = b"x"
        assert isinstance(buf.obj, __import__("mmap").mmap)


def test_resume_says_which_of_the_jobs_there_started(daemon):
    """A client that comes back (RESUME) is told the jobs the node (or the
    scheduler) still has and, in ``run``, which of them started: one that started
    while the client was away is Running for it from then on, not only once it ends."""
    node = daemon
    sock, conn = authenticated(node)
    with sock:
        spec = serialize.package_computation(time.sleep).spec_bytes  # importable everywhere
        _send(sock, conn, Kind.COMPUTE, {"c": "rs1", "n": "sleep", "sa": 0}, [spec])
        [msg] = recv_messages(sock, conn)
        assert msg.kind == Kind.COMPUTE_REPLY and msg.ctl["ok"] is True, msg.ctl
        for jid in (1, 2, 3):  # two CPUs: 1 and 2 run, 3 waits
            segs = serialize.dumps_args((60,), {})
            _send(sock, conn, Kind.JOBS, {"c": "rs1", "j": [[jid, len(segs)]],
                                          "s": [len(s) for s in segs]}, segs)  # fmt: skip
        started: set = set()
        while started != {1, 2}:
            for m in recv_messages(sock, conn):
                started.update(m.ctl.get("g", {}).get("rs1", []))
    sock, conn = authenticated(node)  # (the first connection is gone; the jobs go on)
    with sock:
        _send(sock, conn, Kind.RESUME, {"c": "rs1"})
        resumed = None
        while resumed is None:  # (a scheduler's pulse may come first)
            resumed = next((m for m in recv_messages(sock, conn) if m.kind == Kind.RESUMED), None)
        assert sorted(resumed.ctl["jobs"]) == [1, 2, 3], resumed.ctl
        assert sorted(resumed.ctl["run"]) == [1, 2], resumed.ctl
