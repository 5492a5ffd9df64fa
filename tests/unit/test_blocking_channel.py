"""The job processes' blocking local channel, over a real socket pair."""

from __future__ import annotations

import socket
import threading

import pytest

from dispy.protocol import Kind
from dispy.transport import BlockingChannel


@pytest.mark.parametrize("payload", [[b""], [b"", b""], [b"x", b""], [b"", b"y" * 100_000]])
def test_send_with_empty_segments_completes(payload):
    """An empty file sent with dispy_send_file is an empty segment: the send used
    to spin for ever once only empty buffers were left (found by the seed 6.7
    example: two jobs with the same n, one truncating the file the other sent)."""
    a, b = socket.socketpair()
    with a, b:
        sender, receiver = BlockingChannel(a), BlockingChannel(b)
        done = threading.Event()

        def send():
            sender.send(Kind.W_SENDFILE, {"j": 1, "p": "f.dat"}, payload)
            done.set()

        t = threading.Thread(target=send, daemon=True)
        t.start()
        msg = receiver.recv()
        t.join(10)
        assert done.is_set(), "send() did not return"
        assert msg.kind == Kind.W_SENDFILE and msg.ctl["p"] == "f.dat"
        assert bytes(msg.payload) == b"".join(payload)


def test_recv_nowait_returns_what_is_there_and_never_waits():
    a, b = socket.socketpair()
    with a, b:
        sender, receiver = BlockingChannel(a), BlockingChannel(b)
        assert receiver.recv_nowait() == []  # nothing sent: returns at once
        for jid in (1, 2, 3):
            sender.send(Kind.W_JOB, {"j": jid, "s": [0]}, [b""])
        assert receiver.recv().ctl["j"] == 1  # (2 and 3 may be read and held already)
        assert [m.ctl["j"] for m in receiver.recv_nowait()] == [2, 3]
        assert receiver.recv_nowait() == []
        a.close()
        with pytest.raises(Exception, match="closed"):
            receiver.recv_nowait()
