"""The node link's phases (``dispy.runtime.link``): one transition table, as
``jobstate`` is for jobs."""

import asyncio
import logging
import time

import pytest

from dispy.protocol import Kind
from dispy.runtime import link
from dispy.runtime.link import Phase, next_phase


def test_the_life_of_a_link():
    p = Phase.DOWN
    for event, want in [
        (link.CONNECTED, Phase.UP),
        (link.SET_UP, Phase.READY),
        (link.SUSPEND, Phase.SUSPECT),  # lost while ready: its jobs wait
        (link.CONNECTED, Phase.SUSPECT),  # reconnected, not yet told what it has
        (link.BACK, Phase.UP),
        (link.SET_UP, Phase.READY),
        (link.LOST, Phase.DOWN),  # lost with no window left: its jobs are lost now
        (link.CONNECTED, Phase.UP),
        (link.LOST, Phase.DOWN),  # lost while being set up
    ]:
        p = next_phase(p, event)
        assert p is want, event
    assert next_phase(Phase.SUSPECT, link.DEAD) is Phase.DOWN
    assert all(next_phase(q, link.FAIL) is Phase.FAILED for q in Phase)


@pytest.mark.parametrize(
    "phase, event",
    [
        (Phase.DOWN, link.SET_UP),  # set up without a connection
        (Phase.SUSPECT, link.SET_UP),  # jobs given before the node said what it has
        (Phase.READY, link.CONNECTED),  # a second connection while one is in use
        (Phase.UP, link.SUSPEND),  # only a ready node has jobs to wait for
        (Phase.READY, link.DEAD),
        (Phase.FAILED, link.CONNECTED),  # a failed link stays stopped
    ],
)
def test_what_cannot_happen_is_a_bug_not_a_silent_change(phase, event):
    with pytest.raises(RuntimeError, match="no transition"):
        next_phase(phase, event)


class _Link:
    def __init__(self, host, port, address=None, phase=Phase.READY, closing=False):
        self.host, self.port, self.key = host, port, (host, port)
        self.address = address or host
        self.phase, self._closing = phase, closing


def test_one_link_per_node_by_its_run_id():
    links = {}
    ids = link.NodeIds(links)
    a = links[("n1", 51348)] = _Link("n1", 51348, address="10.0.0.1")
    assert ids.claim("run-1", a)
    # found again by discovery, by address or by run id: known already
    assert ids.known("10.0.0.1", 51348, "other") and ids.known("n1", 51348, None)
    assert ids.known("10.9.9.9", 51348, "run-1")
    assert not ids.known("10.0.0.1", 4000, "run-2")
    # the same node named another way: refused while the first link is in use
    b = links[("10.0.0.1", 51348)] = _Link("10.0.0.1", 51348)
    assert not ids.claim("run-1", b)
    assert ids.claim(None, b)  # a node that gives no run id (an old one): allowed
    for phase, closing in ((Phase.FAILED, False), (Phase.READY, True)):
        a.phase, a._closing = phase, closing  # failed for good, or closing: b may take it
        assert ids.claim("run-1", b)
        ids.nids["run-1"] = a.key


class _RecordingChannel:
    is_closed = False

    def __init__(self) -> None:
        self.sent = []
        self.arrived = asyncio.Event()

    def send(self, kind, ctl, payload=()) -> None:
        self.sent.append((kind, ctl))
        self.arrived.set()


def test_acks_wait_ack_delay_then_go_out_together():
    """A result's ACK is not sent in the loop turn after it came (the node read it
    just before the next job, or the client's loop wrote it before the program saw
    the result): the acks of ACK_DELAY go out in one message.  Also: ACK_DELAY
    stays well under the node store's wait, so an acknowledged result is never
    written there."""
    from dispynode.store import WRITE_DELAY

    assert link.ACK_DELAY * 10 <= WRITE_DELAY

    async def main():
        lk = link.LinkBase()
        lk._init_link(logging.getLogger("test"))
        lk.chan = chan = _RecordingChannel()
        start = time.monotonic()
        for jid in (1, 2, 3):
            lk.ack("c1", jid)
        await asyncio.sleep(0)  # one loop turn
        await asyncio.sleep(0)
        assert chan.sent == []
        await asyncio.wait_for(chan.arrived.wait(), 10)
        assert time.monotonic() - start >= link.ACK_DELAY * 0.9
        lk.ack("c1", 4)  # a later result: its own ACK_DELAY
        chan.arrived.clear()
        await asyncio.wait_for(chan.arrived.wait(), 10)
        return chan.sent

    assert asyncio.run(main()) == [(Kind.ACK, {"c": "c1", "j": [1, 2, 3]}),
                                   (Kind.ACK, {"c": "c1", "j": [4]})]  # fmt: skip
