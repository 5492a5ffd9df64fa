"""The node protocol's conversation in tables (``dispy.protocol.conversation``):
what each side takes and how, which reply answers which request, a refused
request failing its waiter, and a computation's phases on the serving side."""

import asyncio

import pytest

from dispy.errors import ProtocolError
from dispy.protocol import Kind, Message
from dispy.protocol import conversation as cv
from dispy.protocol.conversation import CompPhase, Take, next_comp_phase
from dispy.runtime.link import LinkBase

PROCESS_KINDS = {k for k in Kind if k >= Kind.C_LOAD}  # daemon <-> its own processes


def test_every_kind_after_the_handshake_has_a_taker():
    spoken = set(Kind) - cv_handshake() - PROCESS_KINDS
    assert spoken == set(cv.TO_NODE) | set(cv.TO_CLIENT)
    # FILE goes both ways (a computation's files in, a job's files out); nothing else
    assert set(cv.TO_NODE) & set(cv.TO_CLIENT) == {Kind.FILE}


def cv_handshake():
    from dispy.protocol._messages import HANDSHAKE_KINDS

    return set(HANDSHAKE_KINDS)


def test_requests_that_wait_on_the_disk_go_in_order():
    in_order = {k for k, t in cv.TO_NODE.items() if t is Take.IN_ORDER}
    assert in_order == {Kind.FILE, Kind.COMPUTE, Kind.DATA, Kind.CLOSE, Kind.RESUME}
    for request, (reply, _names) in cv.REPLIES.items():
        assert request in cv.TO_NODE and cv.TO_CLIENT[reply] is Take.REPLY


@pytest.mark.parametrize("kind", [Kind.RESULTS, Kind.INFO, Kind.HELLO, Kind.W_JOB, 99])
def test_a_node_refuses_what_no_client_sends(kind):
    with pytest.raises(ProtocolError, match="unexpected message kind"):
        cv.taken_by_node(kind)


@pytest.mark.parametrize("kind", [Kind.JOBS, Kind.ACK, Kind.COMPUTE, Kind.AUTH, 99])
def test_a_client_refuses_what_no_node_sends(kind):
    with pytest.raises(ProtocolError, match="unexpected message kind"):
        cv.taken_by_client(kind)


@pytest.mark.parametrize(
    "request_kind, asked, reply_kind, reply",
    [
        (Kind.INFO_REQ, {"pulse": 2}, Kind.INFO, {"name": "n", "cpus": 2}),
        (Kind.COMPUTE, {"c": "c1", "n": "f"}, Kind.COMPUTE_REPLY, {"c": "c1", "ok": True}),
        (Kind.DATA, {"c": "c1", "t": "a:2"}, Kind.DATA_OK, {"c": "c1", "t": "a:2", "ok": 1}),
        (Kind.CLOSE, {"c": "c1", "t": False}, Kind.CLOSED, {"c": "c1", "r": ""}),
        (Kind.RESUME, {"c": "c1"}, Kind.RESUMED, {"c": "c1", "known": True}),
    ],
)
def test_a_reply_finds_its_request(request_kind, asked, reply_kind, reply):
    key = cv.request_key(request_kind, asked)
    assert cv.reply_key(reply_kind, reply) == key
    names = cv.REPLIES[request_kind][1]  # an ERROR repeats the same fields
    refused = {**{n: asked[n] for n in names}, "r": "why", "k": int(request_kind)}
    assert cv.reply_key(Kind.ERROR, refused) == key
    if "c" in asked:  # another computation's reply is not this one's
        assert cv.reply_key(reply_kind, {**reply, "c": "c2"}) != key


def test_an_error_naming_no_request_goes_to_nobody():
    assert cv.reply_key(Kind.ERROR, {"c": "c1", "r": "no"}) is None
    assert cv.reply_key(Kind.ERROR, {"c": "c1", "r": "no", "k": int(Kind.FILE)}) is None
    assert cv.reply_key(Kind.ERROR, {"c": "c1", "r": "no", "k": [1]}) is None


class _Chan:
    is_closed = False

    def __init__(self):
        self.sent = []

    def send(self, kind, ctl, payload=()):
        self.sent.append((kind, ctl))


class _Link(LinkBase):
    host, port = "n1", 9701


def _link():
    link = _Link()
    link._init_link(LinkBase._log)
    link.chan = _Chan()
    return link


def test_a_link_files_replies_and_streams_by_the_table():
    async def main():
        link = _link()
        streamed = []
        link._streams[Kind.RESULTS] = lambda ctl, payload: streamed.append(ctl)
        data = link.request(Kind.DATA, {"c": "c1", "t": "x:1"}, [b"obj"])
        resume = link.request(Kind.RESUME, {"c": "c1"})
        link.on_message(Message(Kind.DATA_OK, {"c": "c1", "t": "x:2", "ok": True}, b""))
        assert not data.done()  # another version's reply
        link.on_message(Message(Kind.RESULTS, {"r": []}, memoryview(b"")))
        link.on_message(Message(Kind.DATA_OK, {"c": "c1", "t": "x:1", "ok": True}, b""))
        assert data.result()["ok"] and streamed == [{"r": []}]
        # refused: the ERROR names the request, whose waiter fails with the reason
        link.on_message(Message(Kind.ERROR, {"c": "c1", "r": "disk full", "k": 34}, b""))
        with pytest.raises(ProtocolError, match="refused RESUME: disk full"):
            resume.result()
        with pytest.raises(ProtocolError, match="unexpected message kind"):
            link.on_message(Message(Kind.JOBS, {}, b""))
        assert [k for k, _ in link.chan.sent] == [Kind.DATA, Kind.RESUME]

    asyncio.run(main())


def test_the_life_of_a_computation_on_its_node():
    p = CompPhase.NEW
    for event, want in [
        ("setup", CompPhase.STARTING),
        ("set_up", CompPhase.READY),
        ("died", CompPhase.FAILED),
        ("close", CompPhase.CLOSED),
    ]:
        p = next_comp_phase(p, event)
        assert p is want
    assert next_comp_phase(CompPhase.STARTING, "failed") is CompPhase.FAILED
    assert all(next_comp_phase(q, "close") is CompPhase.CLOSED for q in CompPhase)


@pytest.mark.parametrize(
    "phase, event",
    [
        (CompPhase.READY, "setup"),  # set up once per connection's computation
        (CompPhase.FAILED, "setup"),
        (CompPhase.CLOSED, "set_up"),  # closed while its setup ran: stays closed
        (CompPhase.NEW, "set_up"),
        (CompPhase.STARTING, "died"),
    ],
)
def test_what_cannot_happen_to_a_computation_is_a_bug(phase, event):
    with pytest.raises(ValueError, match="cannot go from"):
        next_comp_phase(phase, event)
