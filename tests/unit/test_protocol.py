"""Unit tests of the sans-IO wire protocol (``dispy.protocol``).

No sockets, no sleeps, no network: bytes move between ``Connection`` objects
by hand, the way a transport would move them.
"""

from __future__ import annotations

import array
import functools
import hmac
import os
import pickle
import random
import struct
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dispy.errors import (
    AuthenticationFailed,
    FrameTooLarge,
    IncompatibleVersion,
    ProtocolError,
)
from dispy.protocol import (
    PROTOCOL_VERSIONS,
    Connection,
    FrameDecoder,
    FrameEncoder,
    HandshakeComplete,
    Kind,
    Message,
    _framing,
    derive_key,
    field,
    join_segments,
    pack_ctl,
    split_segments,
    unpack_ctl,
)
from dispy.protocol._connection import NONCE_SIZE
from dispy.protocol._framing import (
    ALIGN,
    BIG_BODY,
    HEADER,
    HEADER_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    POLY_BODY,
    STAGING_SIZE,
    TAG_SIZE,
)
from dispy.protocol._messages import HANDSHAKE_KINDS

KEY = derive_key("s3cret")
OTHER_KEY = derive_key("not the s3cret")
SERVER_NONCE = bytes(range(NONCE_SIZE))
CLIENT_NONCE = bytes(range(100, 100 + NONCE_SIZE))
ALLOWED_ERRORS = (ProtocolError, AuthenticationFailed)


# -- helpers ------------------------------------------------------------------
def wire(bufs) -> bytes:
    """The bytes a list of output buffers puts on the wire."""
    return b"".join(bufs)


def pump(src: Connection, dst: Connection) -> list:
    """Move everything ``src`` queued into ``dst``, buffer by buffer (as sendmsg would)."""
    events = []
    for buf in src.take_output():
        events.extend(dst.receive(buf))
    return events


def feed(conn, data, chunks=(1 << 30,)) -> list:
    """Feed ``data`` through ``get_buffer``/``buffer_updated`` like ``recv_into`` would.

    ``chunks`` are the successive read sizes (cycled).  Works on a ``Connection``
    (returns events) and on a ``FrameDecoder`` (returns frames).
    """
    out = []
    data = memoryview(data).cast("B")
    pos, i = 0, 0
    while pos < len(data):
        buf = conn.get_buffer()
        assert len(buf) > 0, "get_buffer() returned an empty buffer: a reader would spin"
        n = min(len(buf), len(data) - pos, chunks[i % len(chunks)])
        i += 1
        buf[:n] = data[pos : pos + n]
        pos += n
        if isinstance(conn, FrameDecoder):
            conn.buffer_updated(n)
            while (f := conn.next_frame()) is not None:
                out.append(f)
        else:
            out.extend(conn.buffer_updated(n))
    return out


def feed_collect(conn, data, chunks=(1,)):
    """Feed until the first error; return (events, error or None)."""
    events = []
    data = memoryview(data).cast("B")
    pos, i = 0, 0
    try:
        while pos < len(data):
            n = chunks[i % len(chunks)]
            i += 1
            events.extend(feed(conn, data[pos : pos + n]))
            pos += n
    except ALLOWED_ERRORS as exc:
        return events, exc
    return events, None


def handshake(server_key=KEY, client_key=KEY, **kw):
    server = Connection("server", server_key, **kw)
    client = Connection("client", client_key, **kw)
    server.initiate()
    assert pump(server, client) == []  # HELLO in, AUTH queued
    assert pump(client, server) == [HandshakeComplete(PROTOCOL_VERSIONS[1])]
    assert pump(server, client) == [HandshakeComplete(PROTOCOL_VERSIONS[1])]
    return server, client


def fixed(role: str, key=KEY, *, initiate=True, **kw) -> Connection:
    """A connection with a fixed nonce, so that a recorded stream can be replayed to it.

    A server has sent its HELLO already (unless ``initiate=False``); it is discarded.
    """
    conn = Connection(role, key, **kw)
    conn._nonce = SERVER_NONCE if role == "server" else CLIENT_NONCE
    if role == "server" and initiate:
        conn.initiate()
        conn.take_output()
    return conn


def one_frame(kind, ctl, payload=(), ctl_raw=None) -> bytes:
    """An untagged frame, as an unauthenticated peer (or anyone with no key) builds it."""
    return wire(FrameEncoder().encode(kind, pack_ctl(ctl) if ctl_raw is None else ctl_raw, payload))


def decode_one(data: bytes):
    frames = FrameDecoder(1 << 20, 1 << 16).feed(data)
    assert len(frames) == 1
    return frames[0].kind, unpack_ctl(frames[0].ctl)


def norm(ev):
    if isinstance(ev, Message):
        return ("msg", ev.kind, ev.ctl, bytes(ev.payload))
    return ev


def proof(key, label, version, ns, nc) -> bytes:
    """The handshake proof, recomputed independently of the code under test."""
    return hmac.digest(key, label + struct.pack("!H", version) + ns + nc, "sha256")


def hello(nonce=SERVER_NONCE, versions=(1, 1)) -> bytes:
    return one_frame(Kind.HELLO, {"p": "dispy", "v": list(versions), "n": nonce})


def client_after_hello(**kw) -> tuple[Connection, dict]:
    """A real client that got a fake server's HELLO; returns it and its AUTH control map."""
    client = fixed("client", **kw)
    assert client.receive(hello()) == []
    kind, auth = decode_one(wire(client.take_output()))
    assert kind == Kind.AUTH
    return client, auth


@dataclass
class Session:
    s2c: list  # frames the server sent, in order (handshake first)
    c2s: list
    at_client: list  # normalized events the client got
    at_server: list


C2S_MESSAGES = [
    (Kind.INFO_REQ, {}, []),
    (Kind.JOBS, {"ids": [1, 2], "s": [3, 4]}, [b"abc", b"defg"]),
    (Kind.PING, {"t": 1.5}, []),
    (Kind.FILE, {"name": "data.bin"}, [bytes(range(256)) * 2]),
]
S2C_MESSAGES = [
    (Kind.INFO, {"name": "node-1", "cpus": 4}, []),
    (Kind.RESULTS, {"s": [5]}, [b"hello"]),
    (Kind.PONG, {}, []),
]


def record_session(c2s_messages, s2c_messages) -> Session:
    """Run a whole session between fixed-nonce peers and record every frame."""
    server, client = fixed("server", initiate=False), fixed("client")
    server.initiate()
    s2c = [wire(server.take_output())]
    c2s = []
    at_client, at_server = [], []
    at_client += client.receive(s2c[0])
    c2s.append(wire(client.take_output()))
    at_server += server.receive(c2s[0])
    s2c.append(wire(server.take_output()))
    at_client += client.receive(s2c[1])
    for kind, ctl, payload in c2s_messages:
        client.send(kind, ctl, payload)
        c2s.append(wire(client.take_output()))
        at_server += server.receive(c2s[-1])
    for kind, ctl, payload in s2c_messages:
        server.send(kind, ctl, payload)
        s2c.append(wire(server.take_output()))
        at_client += client.receive(s2c[-1])
    return Session(s2c, c2s, [norm(e) for e in at_client], [norm(e) for e in at_server])


@functools.cache
def small_session() -> Session:
    return record_session(C2S_MESSAGES, S2C_MESSAGES)


@functools.cache
def big_session() -> Session:
    rng = np.random.default_rng(7)
    big1 = rng.random((BIG_BODY // 8) + 1)  # just above BIG_BODY
    big2 = rng.random(STAGING_SIZE // 8 + 1000)  # larger than the staging buffer
    c2s = [
        (Kind.JOBS, {"s": [big1.nbytes]}, [memoryview(big1)]),
        (Kind.PING, {}, []),
        (Kind.JOBS, {"s": [3, big2.nbytes]}, [b"hdr", memoryview(big2)]),
        (Kind.PING, {"n": 2}, []),
        (Kind.FILE, {}, [bytes(BIG_BODY - 1)]),  # body exactly BIG_BODY: small path
    ]
    s2c = [(Kind.RESULTS, {"s": [big1.nbytes]}, [memoryview(big1)]), (Kind.PONG, {}, [])]
    return record_session(c2s, s2c)


# -- handshake and messages ----------------------------------------------------
def test_handshake_then_messages_both_ways():
    server, client = handshake()
    assert server.authenticated and client.authenticated
    assert server.version == client.version == PROTOCOL_VERSIONS[1]
    assert not server.failed and not client.failed

    lens, bufs = join_segments([[b"pickle-stream"], [b"oob-1", bytearray(b"oob-22")]])
    client.send(Kind.JOBS, {"jobs": [1, 2, 3], "s": lens, "name": "job"}, bufs)
    client.send(Kind.PING, {})
    (jobs, ping) = pump(client, server)
    assert jobs.kind == Kind.JOBS and jobs.ctl == {"jobs": [1, 2, 3], "s": lens, "name": "job"}
    assert [bytes(s) for s in split_segments(jobs.payload, jobs.ctl["s"])] == [
        b"pickle-stream",
        b"oob-1",
        b"oob-22",
    ]
    assert ping == Message(Kind.PING, {}, ping.payload) and len(ping.payload) == 0

    server.send(Kind.RESULTS, {"ok": True, "s": [2, 0, 3]}, [b"ab", b"", memoryview(b"cde")])
    (res,) = pump(server, client)
    assert res.kind == Kind.RESULTS and res.ctl == {"ok": True, "s": [2, 0, 3]}
    assert bytes(res.payload) == b"abcde"
    # many messages in one buffer arrive in order
    for i in range(20):
        client.send(Kind.ACK, {"i": i}, [bytes([i]) * i])
    events = server.receive(wire(client.take_output()))
    assert [(e.ctl["i"], bytes(e.payload)) for e in events] == [
        (i, bytes([i]) * i) for i in range(20)
    ]


def test_big_numpy_payload_is_sent_without_copy_and_received_in_its_own_buffer():
    server, client = handshake()
    arr = np.random.default_rng(1).random(512 * 1024)  # 4 MiB of float64
    view = memoryview(arr)
    lens, bufs = join_segments([[b"meta"], [view]])
    ctl = {"s": lens}
    client.send(Kind.JOBS, ctl, bufs)
    out = client.take_output()
    assert any(b.obj is arr for b in out if isinstance(b, memoryview))  # not copied on send
    events = []
    for buf in out:
        events += server.receive(buf)
    (msg,) = events
    body_size = len(pack_ctl(ctl)) + sum(abs(n) for n in lens)
    assert isinstance(msg.payload, memoryview)
    # received into a buffer of its own (body size + alignment slack), payload aligned
    assert isinstance(msg.payload.obj, np.ndarray)
    assert body_size <= len(msg.payload.obj) <= body_size + ALIGN
    meta, data = split_segments(msg.payload, msg.ctl["s"])
    assert np.frombuffer(data, dtype=np.float64).ctypes.data % ALIGN == 0
    assert bytes(meta) == b"meta"
    assert bytes(data) == arr.tobytes()
    np.testing.assert_array_equal(np.frombuffer(data, dtype=np.float64), arr)

    # and the other way, streamed through a FrameWriter
    back = arr[::-1].copy()
    w = server.start_frame(Kind.RESULTS, {"n": 1}, back.nbytes)
    parts = [w.head]
    for i in range(0, back.nbytes, 1 << 20):
        chunk = memoryview(back).cast("B")[i : i + (1 << 20)]
        w.update(chunk)
        parts.append(chunk)
    parts.append(w.tag())
    (msg,) = feed(client, wire(parts), chunks=(65536, 1000, 7, 300000))
    assert msg.ctl == {"n": 1}
    np.testing.assert_array_equal(np.frombuffer(msg.payload, dtype=np.float64), back)


def test_payload_buffers_of_any_item_size_are_counted_in_bytes():
    # a numpy array or an array.array passed as it is (not as a memoryview)
    server, client = handshake()
    arr2d = np.arange(12.0).reshape(3, 4)
    arr = array.array("d", [1.0, 2.0, 3.0])
    client.send(Kind.JOBS, {}, [arr2d, arr, b"x"])
    (msg,) = pump(client, server)
    assert bytes(msg.payload) == arr2d.tobytes() + arr.tobytes() + b"x"


def test_send_before_handshake_is_refused():
    for conn in (Connection("client", KEY), Connection("server", KEY)):
        conn.initiate()
        with pytest.raises(ProtocolError, match="before the handshake"):
            conn.send(Kind.JOBS, {})
        with pytest.raises(ProtocolError, match="before the handshake"):
            conn.start_frame(Kind.JOBS, {}, 10)


def test_constructor_checks():
    with pytest.raises(ValueError, match="role"):
        Connection("peer", KEY)
    with pytest.raises(ValueError, match="32-byte key"):
        Connection("client", None)
    with pytest.raises(ValueError, match="32-byte key"):
        Connection("client", b"short")
    with pytest.raises(ValueError, match="32-byte key"):
        Connection("client", "s3cret")
    assert Connection("client", None, trusted=True).authenticated


def test_initiate_only_on_server_and_only_once():
    client = Connection("client", KEY)
    client.initiate()
    assert client.take_output() == []
    server = Connection("server", KEY)
    server.initiate()
    server.initiate()
    kind, ctl = decode_one(wire(server.take_output()))
    assert kind == Kind.HELLO and ctl["p"] == "dispy" and len(ctl["n"]) == NONCE_SIZE


def test_nonces_are_fresh():
    a, b = Connection("server", KEY), Connection("server", KEY)
    a.initiate()
    b.initiate()
    assert decode_one(wire(a.take_output()))[1]["n"] != decode_one(wire(b.take_output()))[1]["n"]


def test_recorded_session_replays_to_fixed_nonce_peers():
    sess = small_session()
    assert sess.at_client[0] == sess.at_server[0] == HandshakeComplete(1)
    assert len(sess.at_server) == 1 + len(C2S_MESSAGES)
    assert len(sess.at_client) == 1 + len(S2C_MESSAGES)
    assert [norm(e) for e in fixed("client").receive(wire(sess.s2c))] == sess.at_client
    assert [norm(e) for e in fixed("server").receive(wire(sess.c2s))] == sess.at_server


# -- authentication ------------------------------------------------------------
def test_wrong_secret_is_refused_with_a_reason():
    server, client = Connection("server", KEY), Connection("client", OTHER_KEY)
    server.initiate()
    pump(server, client)
    with pytest.raises(AuthenticationFailed):
        pump(client, server)
    assert server.failed and not server.authenticated
    refusal = wire(server.take_output())
    kind, ctl = decode_one(refusal)
    assert kind == Kind.AUTH_FAIL and "secret" in ctl["r"]
    with pytest.raises(AuthenticationFailed, match="secret") as info:
        client.receive(refusal)
    assert "refused" in str(info.value)
    assert client.failed and not client.authenticated


@pytest.mark.parametrize("forgery", ["wrong-key", "reflected", "random", "empty", "replayed"])
def test_client_refuses_a_server_that_does_not_know_the_secret(forgery):
    client, auth = client_after_hello()
    good = proof(KEY, b"dispy-server", 1, SERVER_NONCE, CLIENT_NONCE)
    m = {
        "wrong-key": proof(OTHER_KEY, b"dispy-server", 1, SERVER_NONCE, CLIENT_NONCE),
        "reflected": auth["m"],  # the client's own proof sent back
        "random": os.urandom(32),
        "empty": b"",
        # a genuine proof, but from a session with another client nonce
        "replayed": proof(KEY, b"dispy-server", 1, SERVER_NONCE, os.urandom(32)),
    }[forgery]
    assert m != good
    with pytest.raises(AuthenticationFailed, match="could not prove"):
        client.receive(one_frame(Kind.AUTH_OK, {"m": m}))
    assert not client.authenticated and client.failed


def test_client_accepts_an_independently_computed_proof():
    # control for the test above: the fake server's proof recipe is the right one
    client, auth = client_after_hello()
    assert auth["v"] == 1 and auth["n"] == CLIENT_NONCE
    assert auth["m"] == proof(KEY, b"dispy-client", 1, SERVER_NONCE, CLIENT_NONCE)
    ok = proof(KEY, b"dispy-server", 1, SERVER_NONCE, CLIENT_NONCE)
    assert client.receive(one_frame(Kind.AUTH_OK, {"m": ok})) == [HandshakeComplete(1)]


def test_server_refuses_a_replayed_auth():
    old_client = fixed("client")
    old_client.receive(hello())
    old_auth = wire(old_client.take_output())  # valid for SERVER_NONCE only
    fresh = Connection("server", KEY)
    fresh.initiate()
    with pytest.raises(AuthenticationFailed):
        fresh.receive(old_auth)


def test_server_refuses_a_reflected_server_proof():
    server = fixed("server")
    m = proof(KEY, b"dispy-server", 1, SERVER_NONCE, CLIENT_NONCE)
    with pytest.raises(AuthenticationFailed):
        server.receive(one_frame(Kind.AUTH, {"v": 1, "n": CLIENT_NONCE, "m": m}))


def test_empty_secret_still_runs_the_handshake():
    assert derive_key("") == derive_key(None) == derive_key(b"")
    assert len(derive_key(None)) == 32 and derive_key("") != derive_key(" ")
    assert derive_key("abc") == derive_key(b"abc")
    server, client = handshake(derive_key(None), derive_key(""))
    client.send(Kind.PING, {"x": 1})
    assert [norm(e) for e in pump(client, server)] == [("msg", Kind.PING, {"x": 1}, b"")]
    # and an empty secret is not the same as another one
    server, client = Connection("server", derive_key("")), Connection("client", KEY)
    server.initiate()
    pump(server, client)
    with pytest.raises(AuthenticationFailed):
        pump(client, server)


def test_auth_fail_reason():
    client = Connection("client", KEY)
    with pytest.raises(AuthenticationFailed, match="no reason given"):
        client.receive(one_frame(Kind.AUTH_FAIL, {}))
    with pytest.raises(AuthenticationFailed) as info:
        Connection("client", KEY).receive(one_frame(Kind.AUTH_FAIL, {"r": "x" * 4000}))
    assert len(str(info.value)) < 600
    with pytest.raises(ProtocolError, match="'r'"):
        Connection("client", KEY).receive(one_frame(Kind.AUTH_FAIL, {"r": 5}))


# -- versions ------------------------------------------------------------------
def test_version_mismatch_client_side():
    server = Connection("server", KEY, versions=(2, 3))
    client = Connection("client", KEY, versions=(1, 1))
    server.initiate()
    with pytest.raises(IncompatibleVersion) as info:
        pump(server, client)
    msg = str(info.value)
    assert "2-3" in msg and "1-1" in msg and "same dispy version" in msg
    assert isinstance(info.value, ProtocolError) and client.failed
    assert client.take_output() == []  # no AUTH sent


def test_version_mismatch_server_side():
    server = fixed("server", versions=(1, 2))
    m = proof(KEY, b"dispy-client", 9, SERVER_NONCE, CLIENT_NONCE)
    with pytest.raises(IncompatibleVersion, match="version 9"):
        server.receive(one_frame(Kind.AUTH, {"v": 9, "n": CLIENT_NONCE, "m": m}))
    kind, ctl = decode_one(wire(server.take_output()))
    assert kind == Kind.AUTH_FAIL and "version 9 not supported" in ctl["r"]
    assert server.failed and not server.authenticated


def test_version_negotiation_picks_the_highest_common_version():
    server = Connection("server", KEY, versions=(1, 3))
    client = Connection("client", KEY, versions=(2, 5))
    server.initiate()
    pump(server, client)
    assert pump(client, server) == [HandshakeComplete(3)]
    assert pump(server, client) == [HandshakeComplete(3)]
    assert server.version == client.version == 3


# -- malformed handshakes ---------------------------------------------------------
N32 = b"n" * 32


@pytest.mark.parametrize(
    "ctl",
    [
        {},
        {"p": "other", "v": [1, 1], "n": N32},
        {"v": [1, 1], "n": N32},
        {"p": "dispy", "v": 1, "n": N32},
        {"p": "dispy", "v": [1, 1, 1], "n": N32},
        {"p": "dispy", "v": [1], "n": N32},
        {"p": "dispy", "v": ["1", 1], "n": N32},
        {"p": "dispy", "v": [1.0, 1.0], "n": N32},
        {"p": "dispy", "v": [True, True], "n": N32},  # bool is not a version
        {"p": "dispy", "v": [1, 1]},
        {"p": "dispy", "v": [1, 1], "n": b"short"},
        {"p": "dispy", "v": [1, 1], "n": "n" * 32},
        {"p": b"dispy", "v": [1, 1], "n": N32},
    ],
)
def test_bad_hello(ctl):
    client = Connection("client", KEY)
    with pytest.raises(ProtocolError):
        client.receive(one_frame(Kind.HELLO, ctl))
    assert client.take_output() == [] and client.failed


@pytest.mark.parametrize(
    "ctl, error",
    [
        ({}, ProtocolError),
        ({"n": CLIENT_NONCE, "m": N32}, ProtocolError),
        ({"v": True, "n": CLIENT_NONCE, "m": N32}, ProtocolError),
        ({"v": "1", "n": CLIENT_NONCE, "m": N32}, ProtocolError),
        ({"v": 1, "n": b"short", "m": N32}, ProtocolError),
        ({"v": 1, "m": N32}, ProtocolError),
        ({"v": 1, "n": CLIENT_NONCE}, ProtocolError),
        ({"v": 1, "n": CLIENT_NONCE, "m": "m" * 32}, ProtocolError),
        ({"v": 1, "n": CLIENT_NONCE, "m": N32}, AuthenticationFailed),
        ({"v": 2**64 - 1, "n": CLIENT_NONCE, "m": N32}, IncompatibleVersion),
        ({"v": -1, "n": CLIENT_NONCE, "m": N32}, IncompatibleVersion),
    ],
)
def test_bad_auth(ctl, error):
    server = fixed("server")
    with pytest.raises(error):
        server.receive(one_frame(Kind.AUTH, ctl))
    assert server.failed and not server.authenticated


@pytest.mark.parametrize(
    "role, frames",
    [
        ("client", [one_frame(Kind.AUTH, {})]),
        ("client", [one_frame(Kind.AUTH_OK, {"m": N32})]),  # AUTH_OK before HELLO
        ("client", [hello(), hello()]),  # HELLO twice
        ("server", [one_frame(Kind.HELLO, {"p": "dispy", "v": [1, 1], "n": N32})]),
        ("server", [one_frame(Kind.AUTH_OK, {"m": N32})]),
        ("server-not-initiated", [one_frame(Kind.AUTH, {"v": 1, "n": N32, "m": N32})]),
    ],
)
def test_unexpected_handshake_frame(role, frames):
    conn = fixed("client") if role == "client" else Connection("server", KEY)
    if role == "server":
        conn.initiate()
    with pytest.raises(ProtocolError, match="unexpected"):
        for f in frames:
            conn.receive(f)


def test_handshake_frame_with_payload():
    client = Connection("client", KEY)
    f = wire(
        FrameEncoder().encode(Kind.HELLO, pack_ctl({"p": "dispy", "v": [1, 1], "n": N32}), [b"x"])
    )
    with pytest.raises(ProtocolError, match="payload"):
        client.receive(f)
    assert client.take_output() == []


@pytest.mark.parametrize("kind", sorted(HANDSHAKE_KINDS))
def test_handshake_frame_after_handshake(kind):
    server, client = handshake()
    client.send(kind, {"p": "dispy", "v": [1, 1], "n": N32, "m": N32, "r": "no"})
    with pytest.raises(ProtocolError, match="after handshake"):
        pump(client, server)


# -- nothing before authentication -----------------------------------------------
@pytest.mark.parametrize("role", ["server", "client"])
@pytest.mark.parametrize("kind", [Kind.JOBS, Kind.INFO, Kind.COMPUTE, Kind.W_JOB, 0, 15, 200, 255])
def test_no_message_before_authentication(role, kind):
    conn = Connection(role, KEY)
    conn.initiate()
    events, err = feed_collect(conn, one_frame(kind, {"s": [3]}, [b"abc"]))
    assert events == []
    assert isinstance(err, ProtocolError) and "before authenticating" in str(err)


class _CreatesFile:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_never_unpickled(tmp_path):
    # the payload is armed: unpickling it does create its file
    armed = tmp_path / "armed"
    with pickle.loads(pickle.dumps(_CreatesFile(armed))):
        pass
    assert armed.exists()

    target = tmp_path / "pwned"
    bomb = pickle.dumps(_CreatesFile(target))
    ctl = {"s": [len(bomb)]}

    # 1. as a JOBS frame before authenticating
    for role in ("server", "client"):
        conn = Connection(role, KEY)
        conn.initiate()
        events, err = feed_collect(conn, one_frame(Kind.JOBS, ctl, [bomb]))
        assert events == [] and isinstance(err, ProtocolError)

    # 2. after authenticating, but with a bad tag
    server, client = handshake()
    client.send(Kind.JOBS, ctl, [bomb])
    frame = bytearray(wire(client.take_output()))
    frame[-1] ^= 0x01
    events, err = feed_collect(server, frame)
    assert events == [] and isinstance(err, ProtocolError)
    assert "failed authentication" in str(err)

    # 3. with a good tag it is delivered, still as bytes
    server, client = handshake()
    client.send(Kind.JOBS, ctl, [bomb])
    (msg,) = pump(client, server)
    assert bytes(msg.payload) == bomb
    assert not target.exists()


# -- malformed frames ------------------------------------------------------------
def header(magic=MAGIC, version=LAYOUT_VERSION, kind=Kind.HELLO, flags=0, ctl_len=1, body_len=1):
    return HEADER.pack(magic, version, kind, flags, ctl_len, body_len)


@pytest.mark.parametrize(
    "head, message",
    [
        (header(magic=b"HTTP"), "not a dispy peer"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n", "not a dispy peer"),
        (header(version=0), "layout version 0"),
        (header(version=2), "layout version 2"),
        (header(flags=1), "flags 0x0001"),
        (header(flags=0x8000), "flags 0x8000"),
        (header(ctl_len=10, body_len=9), "longer than body"),
    ],
)
@pytest.mark.parametrize("authenticated", [False, True])
def test_bad_header(head, message, authenticated):
    if authenticated:
        conn, _ = handshake()
    else:
        conn = Connection("server", KEY)
        conn.initiate()
    with pytest.raises(ProtocolError, match=message):
        conn.receive(head[:HEADER_SIZE])  # the header alone is enough to fail
    assert conn.failed


def test_frame_larger_than_max_frame():
    server, client = handshake(max_frame=1 << 20)
    w = client.start_frame(Kind.JOBS, {}, 1 << 20)  # body: 1-byte control part + 1 MiB
    with pytest.raises(FrameTooLarge, match=f"exceeds the limit of {1 << 20} bytes"):
        server.receive(w.head)
    # exactly at the limit: accepted, waits for the body
    server, client = handshake(max_frame=1 << 20)
    w = client.start_frame(Kind.JOBS, {}, (1 << 20) - 1)
    assert server.receive(w.head) == []
    assert not server.failed


def test_trusted_frame_larger_than_max_frame():
    conn = Connection("server", None, trusted=True, max_frame=1000)
    with pytest.raises(FrameTooLarge):
        conn.receive(header(kind=Kind.W_JOB, ctl_len=0, body_len=1001))


@pytest.mark.parametrize("authenticated", [False, True])
def test_control_part_larger_than_max_ctl(authenticated):
    if authenticated:
        server, client = handshake(max_ctl=100)
        client.send(Kind.JOBS, {"x": "y" * 200})
        data = wire(client.take_output())
    else:
        server = Connection("server", KEY, max_ctl=100)
        server.initiate()
        data = one_frame(Kind.AUTH, {"v": 1, "n": N32, "m": N32, "pad": "y" * 200})
    with pytest.raises(FrameTooLarge, match="control part of .* exceeds the limit of 100"):
        server.receive(data)


def test_oversized_frame_before_authentication():
    conn = Connection("server", KEY)  # max_frame is 4 GiB, but not before auth
    conn.initiate()
    with pytest.raises(
        FrameTooLarge, match="4097 bytes exceeds the limit of 4096 bytes before auth"
    ):
        conn.receive(header(kind=Kind.AUTH, ctl_len=1, body_len=4097))
    conn = Connection("client", KEY)
    with pytest.raises(FrameTooLarge, match="before authentication"):
        conn.receive(header(kind=Kind.HELLO, ctl_len=0, body_len=2**64 - 1))
    conn = Connection("client", KEY)
    assert conn.receive(header(kind=Kind.HELLO, ctl_len=1, body_len=4096)) == []  # at the limit


BAD_MSGPACK = [
    b"\xc1",  # never used
    b"\x81",  # map with its entry missing
    pack_ctl({"a": 1}) + b"\x00",  # trailing bytes
    b"\x81\xa1\xff\x01",  # key is not UTF-8
    msgpack.packb({1: 2}),  # integer key
    msgpack.packb({(1, 2): 2}),  # array key
    b"\xdd\xff\xff\xff\xff",  # array announcing 4G items
]


@pytest.mark.parametrize("ctl_raw", BAD_MSGPACK)
def test_control_part_not_msgpack(ctl_raw):
    client = Connection("client", KEY)
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        client.receive(one_frame(Kind.HELLO, None, ctl_raw=ctl_raw))
    # from an authenticated peer too
    server, client = handshake()
    w = client.encoder.start(Kind.JOBS, ctl_raw, 0)
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        server.receive(w.head + w.tag())


@pytest.mark.parametrize("value", [[1, 2], 7, "dispy", None, b"\x80", 1.5, True])
def test_control_part_not_a_map(value):
    raw = msgpack.packb(value, use_bin_type=True)
    client = Connection("client", KEY)
    with pytest.raises(ProtocolError, match="expected a map"):
        client.receive(one_frame(Kind.HELLO, None, ctl_raw=raw))
    server, client = handshake()
    w = client.encoder.start(Kind.JOBS, raw, 0)
    with pytest.raises(ProtocolError, match="expected a map"):
        server.receive(w.head + w.tag())


def test_empty_control_part_is_an_empty_map():
    server, client = handshake()
    w = client.encoder.start(Kind.PING, b"", 0)
    (msg,) = server.receive(w.head + w.tag())
    assert msg.ctl == {} and msg.kind == Kind.PING


@pytest.mark.parametrize("role", ["client", "server"])
def test_truncated_stream_waits_then_completes(role):
    sess = small_session()
    stream = wire(sess.s2c if role == "client" else sess.c2s)
    expected = sess.at_client if role == "client" else sess.at_server
    for cut in range(len(stream) + 1):
        conn = fixed(role)
        first = [norm(e) for e in conn.receive(stream[:cut])]
        assert first == expected[: len(first)]
        rest = [norm(e) for e in conn.receive(stream[cut:])]
        assert first + rest == expected


def test_truncated_frame_after_auth_yields_nothing_until_complete():
    def pair_and_frame():
        s, c = handshake()
        c.send(Kind.JOBS, {"s": [10]}, [b"0123456789"])
        return s, wire(c.take_output())

    size = len(pair_and_frame()[1])
    assert size == HEADER_SIZE + len(pack_ctl({"s": [10]})) + 10 + TAG_SIZE
    for cut in range(size):
        s, frame = pair_and_frame()
        assert s.receive(frame[:cut]) == []
        assert not s.failed
        (msg,) = s.receive(frame[cut:])
        assert bytes(msg.payload) == b"0123456789"
        assert s.decoder.buffered == 0


@pytest.mark.parametrize("where", ["kind", "ctl", "payload", "tag-first", "tag-last"])
def test_tampered_frame_after_auth(where):
    server, client = handshake()
    client.send(Kind.JOBS, {"s": [4]}, [b"data"])
    frame = bytearray(wire(client.take_output()))
    pos = {
        "kind": 5,
        "ctl": HEADER_SIZE,
        "payload": len(frame) - TAG_SIZE - 1,
        "tag-first": len(frame) - TAG_SIZE,
        "tag-last": len(frame) - 1,
    }[where]
    frame[pos] ^= 0x20
    events, err = feed_collect(server, frame, chunks=(3,))
    assert events == []
    assert isinstance(err, ProtocolError) and "failed authentication" in str(err)


@pytest.mark.parametrize("where", ["body-start", "body-middle", "body-end", "tag"])
@pytest.mark.parametrize("size", [2 * BIG_BODY, POLY_BODY + 4096])  # HMAC; Poly1305 within
def test_tampered_big_frame_after_auth(where, size):
    server, client = handshake()
    payload = bytes(range(256)) * (size // 256)
    client.send(Kind.JOBS, {"s": [len(payload)]}, [payload])
    frame = bytearray(wire(client.take_output()))
    body_end = len(frame) - TAG_SIZE
    pos = {
        "body-start": HEADER_SIZE,
        "body-middle": body_end // 2,
        "body-end": body_end - 1,
        "tag": body_end + 5,
    }[where]
    frame[pos] ^= 0xFF
    with pytest.raises(ProtocolError, match="failed authentication"):
        feed(server, frame, chunks=(4096, 65536, 10, 100000))


@pytest.mark.parametrize("size", [POLY_BODY - 100, POLY_BODY])
def test_a_frame_tag_as_documented(size):
    """Bodies below POLY_BODY: HMAC-SHA256 over sequence, header and body; from it
    on, the body's Poly1305 tag (under a key for that frame) stands in for it."""
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    key = bytes(range(32))
    enc = FrameEncoder()
    enc.key = key
    enc.encode(Kind.PING, b"", [])  # frame 0: the next is frame 1
    ctl = pack_ctl({"s": [size - 12]})
    payload = bytes(size - len(ctl))
    frame = wire(bytes(b) for b in enc.encode(Kind.JOBS, ctl, [payload]))
    header, body, tag = frame[:HEADER_SIZE], frame[HEADER_SIZE:-TAG_SIZE], frame[-TAG_SIZE:]
    assert len(body) == size
    seq = struct.pack("!Q", 1)
    if size < POLY_BODY:
        want = hmac.digest(key, seq + header + body, "sha256")
    else:
        once = hmac.digest(key, b"dispy-poly1305" + seq, "sha256")
        want = hmac.digest(key, seq + header + Poly1305.generate_tag(once, body), "sha256")
    assert tag == want


def test_replayed_frame():
    server, client = handshake()
    client.send(Kind.JOBS, {"i": 1}, [b"x"])
    frame = wire(client.take_output())
    assert len(server.receive(frame)) == 1
    with pytest.raises(ProtocolError, match="frame 1 failed authentication"):
        server.receive(frame)
    assert server.failed


def test_reordered_and_dropped_frames():
    server, client = handshake()
    frames = []
    for i in range(3):
        client.send(Kind.JOBS, {"i": i})
        frames.append(wire(client.take_output()))
    f0, f1, f2 = frames
    events, err = feed_collect(server, f1 + f0, chunks=(7,))
    assert events == [] and "frame 0 failed authentication" in str(err)
    # frames of another session (same key, other nonces) fail as well
    server2, _ = handshake()
    with pytest.raises(ProtocolError, match="failed authentication"):
        server2.receive(f0)
    # a dropped frame: the first message, then the third
    sess = small_session()
    server3 = fixed("server")
    assert server3.receive(sess.c2s[0]) == [HandshakeComplete(1)]
    assert len(server3.receive(sess.c2s[1])) == 1
    with pytest.raises(ProtocolError, match="frame 1 failed"):
        server3.receive(sess.c2s[3])


def test_reflected_frame_fails():
    # a frame the server sent, bounced back to it: each direction has its own key
    server, client = handshake()
    server.send(Kind.RESULTS, {"x": 1})
    with pytest.raises(ProtocolError, match="failed authentication"):
        server.receive(wire(server.take_output()))


def test_untagged_frame_after_auth_fails():
    server, client = handshake()
    with pytest.raises(ProtocolError):
        feed(server, one_frame(Kind.JOBS, {}) + bytes(TAG_SIZE))


# -- decoder buffer interface ----------------------------------------------------
def make_frames(rng: random.Random, n: int, key=None, max_payload=2000, big_every=0):
    enc = FrameEncoder()
    enc.key = key
    frames, expected = [], []
    for i in range(n):
        kind = rng.choice([int(k) for k in Kind] + [0, 255])
        ctl = pack_ctl({"i": i, "pad": "z" * rng.randrange(0, 40)}) if rng.random() < 0.9 else b""
        size = (
            BIG_BODY + rng.randrange(1, 3 * STAGING_SIZE)
            if big_every and i % big_every == 1
            else rng.randrange(0, max_payload)
        )
        payload = rng.randbytes(size)
        frames.append(wire(enc.encode(kind, ctl, [payload])))
        expected.append((kind, ctl, payload))
    return frames, expected


def frames_equal(got, expected):
    assert [(f.kind, bytes(f.ctl), bytes(f.payload)) for f in got] == expected


@pytest.mark.parametrize("key", [None, KEY], ids=["untagged", "tagged"])
def test_decoder_many_small_frames_one_byte_at_a_time(key):
    frames, expected = make_frames(random.Random(1), 60, key, max_payload=200)
    stream = wire(frames)
    dec = FrameDecoder(1 << 20, 1 << 16, trusted=key is None)
    dec.key = key
    frames_equal(feed(dec, stream, chunks=(1,)), expected)
    assert dec.bytes_received == len(stream) and dec.buffered == 0


@pytest.mark.parametrize("key", [None, KEY], ids=["untagged", "tagged"])
def test_decoder_many_small_frames_random_chunks(key):
    rng = random.Random(2)
    frames, expected = make_frames(rng, 1500, key)  # ~1.5 MB: the staging buffer wraps
    stream = wire(frames)
    assert len(stream) > 2 * STAGING_SIZE
    for chunks in ([len(stream)], [rng.randrange(1, 5000) for _ in range(50)], [STAGING_SIZE]):
        dec = FrameDecoder(1 << 20, 1 << 16, trusted=key is None)
        dec.key = key
        frames_equal(feed(dec, stream, chunks=chunks), expected)
        assert dec.buffered == 0
    # the convenience feed() gives the same frames
    dec = FrameDecoder(1 << 20, 1 << 16, trusted=key is None)
    dec.key = key
    frames_equal(dec.feed(stream), expected)


@pytest.mark.parametrize("key", [None, KEY], ids=["untagged", "tagged"])
def test_decoder_mixed_small_and_big_frames(key):
    rng = random.Random(3)
    frames, expected = make_frames(rng, 12, key, big_every=3)
    # a frame with a body of exactly BIG_BODY and one just above, with a tiny neighbour
    enc = FrameEncoder()
    enc.key = key
    enc.seq = len(frames)
    for size in (BIG_BODY - 1, BIG_BODY, 0):
        payload = rng.randbytes(size)
        frames.append(wire(enc.encode(Kind.FILE, b"\x80", [payload])))
        expected.append((Kind.FILE, b"\x80", payload))
    stream = wire(frames)
    sizes = [1, 5, 19, 20, 21, 31, 32, 33, 1000, 65536, 200000, STAGING_SIZE, 3 * STAGING_SIZE]
    for chunks in ([len(stream)], [rng.choice(sizes) for _ in range(40)], [65536], [333333]):
        dec = FrameDecoder(1 << 24, 1 << 16, trusted=key is None)
        dec.key = key
        got = feed(dec, stream, chunks=chunks)
        frames_equal(got, expected)
        assert dec.buffered == 0 and dec.bytes_received == len(stream)


def test_big_body_is_received_in_place():
    enc = FrameEncoder()
    enc.key = KEY
    body = os.urandom(1 << 20)
    frame = wire(enc.encode(Kind.RESULTS, b"\x80", [body]))
    dec = FrameDecoder(1 << 24, 1 << 16)
    dec.key = KEY
    first = HEADER_SIZE + 100
    buf = dec.get_buffer()
    buf[:first] = frame[:first]
    dec.buffer_updated(first)
    assert dec.next_frame() is None
    target = dec.get_buffer()
    assert isinstance(target.obj, bytearray | np.ndarray)
    assert len(body) + 1 <= len(target.obj) <= len(body) + 1 + ALIGN
    assert len(target) == len(body) + 1 - 100  # the rest of the body, straight into place
    pos = first
    body_end = len(frame) - TAG_SIZE
    while pos < body_end:
        buf = dec.get_buffer()
        assert buf.obj is target.obj
        n = min(len(buf), 300_000, body_end - pos)
        buf[:n] = frame[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        assert dec.next_frame() is None
    for piece in (frame[pos : pos + 10], frame[pos + 10 :]):  # the tag, in two reads
        assert dec.next_frame() is None
        buf = dec.get_buffer()
        assert buf.obj is not target.obj
        buf[: len(piece)] = piece
        dec.buffer_updated(len(piece))
    f = dec.next_frame()
    assert f.payload.obj is target.obj and bytes(f.payload) == body and f.ctl == b"\x80"
    assert dec.next_frame() is None and dec.buffered == 0


@pytest.mark.parametrize("role", ["client", "server"])
def test_big_session_any_chunking(role):
    sess = big_session()
    stream = wire(sess.s2c if role == "client" else sess.c2s)
    expected = sess.at_client if role == "client" else sess.at_server
    rng = random.Random(4)
    for chunks in ([len(stream)], [1, 2, 3, 100], [rng.randrange(1, 200_000) for _ in range(20)]):
        conn = fixed(role)
        assert [norm(e) for e in feed(conn, stream, chunks=chunks)] == expected


def test_trusted_mode():
    a, b = Connection("server", None, trusted=True), Connection("client", None, trusted=True)
    assert a.authenticated and b.authenticated and a.version == PROTOCOL_VERSIONS[1]
    a.initiate()
    assert a.take_output() == []
    arr = np.arange(100_000, dtype=np.float64)  # 800 kB: a big frame
    a.send(Kind.W_JOB, {"s": [arr.nbytes]}, [memoryview(arr)])
    a.send(Kind.C_LOAD, {"x": 1})
    out = a.take_output()
    ctl_len = len(pack_ctl({"s": [arr.nbytes]}))
    assert len(wire(out)) == 2 * HEADER_SIZE + ctl_len + arr.nbytes + len(pack_ctl({"x": 1}))
    events = feed(b, wire(out), chunks=(70000,))
    assert [e.kind for e in events] == [Kind.W_JOB, Kind.C_LOAD]
    np.testing.assert_array_equal(np.frombuffer(events[0].payload, dtype=np.float64), arr)
    assert isinstance(events[0].payload.obj, bytearray)
    b.send(Kind.W_RESULT, {"ok": 1}, [b"r" * 10_000])  # > 4096: no pre-auth limit here
    (msg,) = pump(b, a)
    assert msg.ctl == {"ok": 1} and bytes(msg.payload) == b"r" * 10_000
    with pytest.raises(ProtocolError, match="after handshake"):
        a.receive(one_frame(Kind.HELLO, {}))


def test_encoder_checks_kind():
    for kind in (-1, 256):
        with pytest.raises(ValueError, match="out of range"):
            FrameEncoder().encode(kind, b"")


# -- message helpers -------------------------------------------------------------
def test_kinds():
    assert all(k < 16 for k in HANDSHAKE_KINDS)
    assert all(k >= 16 for k in Kind if k not in HANDSHAKE_KINDS)
    assert all(0 <= k <= 255 for k in Kind)


@pytest.mark.parametrize(
    "value, types, ok",
    [
        (1, int, True),
        (True, int, False),  # bool is not int
        (False, int, False),
        (True, bool, True),
        (True, (int, bool), True),
        (1, (int, float), True),
        (True, (int, float), False),
        (1.5, int, False),
        ("x", str, True),
        (b"x", str, False),
        (b"x", bytes, True),
        ([1], list, True),
        ((1,), list, False),
        (None, int, False),
        ({"a": 1}, dict, True),
    ],
)
def test_field_types(value, types, ok):
    ctl = {"f": value}
    if ok:
        assert field(ctl, "f", types) is value
    else:
        with pytest.raises(ProtocolError, match="field 'f' has type"):
            field(ctl, "f", types)


def test_field_missing_and_default():
    with pytest.raises(ProtocolError, match="lacks field 'f'"):
        field({}, "f", int)
    assert field({}, "f", int, default=7) == 7
    assert field({}, "f", int, default=None) is None
    with pytest.raises(ProtocolError):
        field({"f": "x"}, "f", int, default=7)  # a default does not excuse a wrong type


def test_join_and_split_segments_round_trip():
    arr = np.arange(24, dtype=np.float32).reshape(4, 6)
    parts = [[b"abc", bytearray(b"")], [memoryview(b"0123456789")[2:5], arr], [b"z"]]
    lens, bufs = join_segments(parts)
    assert lens == [3, 0, 3, arr.nbytes, 1]
    assert all(isinstance(b, memoryview) and b.ndim == 1 and b.itemsize == 1 for b in bufs)
    assert join_segments([]) == ([], [])
    payload = memoryview(wire(bufs))
    segs = split_segments(payload, lens)
    assert [bytes(s) for s in segs] == [b"abc", b"", b"234", arr.tobytes(), b"z"]
    assert all(s.obj is payload.obj for s in segs)  # views, not copies
    np.testing.assert_array_equal(np.frombuffer(segs[3], dtype=np.float32).reshape(4, 6), arr)
    assert split_segments(memoryview(b""), []) == []


@pytest.mark.parametrize(
    "lens",
    [
        [1, 2],
        [1, 2, 3, 4],
        [],
        [7, -1],
        (1, 2, 3),
        [1.0, 2, 3],
        [True, 5],
        [None],
        "123",
        None,
        {"a": 6},
    ],
)
def test_split_segments_errors(lens):
    with pytest.raises(ProtocolError, match="segment lengths"):
        split_segments(memoryview(b"abcdef"), lens)


def test_pack_unpack_ctl():
    ctl = {"s": [1, 2], "b": b"\x00\xff", "t": "text", "f": 1.5, "n": None, "d": {"x": [True]}}
    assert unpack_ctl(pack_ctl(ctl)) == ctl
    assert unpack_ctl(b"") == {}
    with pytest.raises(ProtocolError):
        unpack_ctl(b"\x92\x01")


# -- fuzzing ---------------------------------------------------------------------
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ctl_keys = st.sampled_from(["p", "v", "n", "m", "r", "s"]) | st.text(max_size=3)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.integers(-2, 3)
    | st.floats()
    | st.text(max_size=8)
    | st.just("dispy")
    | st.binary(max_size=40)
    | st.binary(min_size=32, max_size=32)
)
values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(ctl_keys, children, max_size=3)
    ),
    max_leaves=8,
)
hello_like = st.fixed_dictionaries(
    {
        "p": st.just("dispy"),
        "v": st.sampled_from([[1, 1], [0, 3]])
        | st.lists(st.integers(-1, 3), min_size=2, max_size=2),
        "n": st.binary(min_size=32, max_size=32),
    }
)
auth_like = st.fixed_dictionaries(
    {
        "v": st.just(1) | st.integers(0, 2),
        "n": st.binary(min_size=32, max_size=32),
        "m": st.binary(min_size=32, max_size=32),
    }
)
ctl_bytes = st.one_of(
    st.dictionaries(ctl_keys, values, max_size=5).map(pack_ctl),
    hello_like.map(pack_ctl),
    auth_like.map(pack_ctl),
    values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.binary(max_size=40),
)
kinds = st.sampled_from(sorted(int(k) for k in Kind)) | st.integers(0, 255)
encoded_frames = st.builds(
    lambda kind, ctl, payload: one_frame(kind, None, [payload] if payload else [], ctl_raw=ctl),
    st.sampled_from(sorted(int(k) for k in HANDSHAKE_KINDS)) | kinds,
    ctl_bytes,
    st.just(b"") | st.binary(max_size=8),
)
raw_frames = st.builds(
    lambda h, rest: h + rest,
    st.builds(
        HEADER.pack,
        st.sampled_from([MAGIC, b"DSPZ", b"\0\0\0\0"]),
        st.sampled_from([LAYOUT_VERSION, 0, 2, 255]),
        kinds,
        st.sampled_from([0, 0, 1, 0x8000]),
        st.integers(0, 64) | st.integers(0, 2**32 - 1),
        st.integers(0, 4200) | st.integers(0, 2**64 - 1),
    ),
    st.binary(max_size=64),
)
auth_ok_like = st.fixed_dictionaries({"m": st.binary(min_size=32, max_size=32)})
handshake_frames = st.builds(
    one_frame,
    st.sampled_from(sorted(HANDSHAKE_KINDS)),
    st.one_of(hello_like, auth_like, auth_ok_like, st.dictionaries(ctl_keys, values, max_size=3)),
)
garbage_streams = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(encoded_frames, raw_frames, st.binary(max_size=5)), max_size=5).map(wire),
)


@st.composite
def garbage_cases(draw):
    """(role, bytes): garbage, or a plausible handshake from a peer that lacks the key."""
    role = draw(st.sampled_from(["server", "client"]))
    if draw(st.booleans()):
        return role, draw(garbage_streams)
    # well-formed handshake frames up to the proof, so the proof check is what fails
    if role == "client":
        first = [one_frame(Kind.HELLO, draw(hello_like))]
        first.append(one_frame(Kind.AUTH_OK, draw(auth_ok_like | auth_like)))
    else:
        first = [one_frame(Kind.AUTH, draw(auth_like))]
    rest = draw(st.lists(handshake_frames | encoded_frames | raw_frames, max_size=3))
    return role, wire(first + rest)


chunkings = st.lists(st.integers(1, 300), min_size=1, max_size=8)


def check_events(events):
    """No Message ever comes before HandshakeComplete, and at most one HandshakeComplete."""
    done = [i for i, e in enumerate(events) if isinstance(e, HandshakeComplete)]
    assert len(done) <= 1
    first_msg = next((i for i, e in enumerate(events) if isinstance(e, Message)), None)
    if first_msg is not None:
        assert done and done[0] < first_msg
    assert all(isinstance(e, (Message, HandshakeComplete)) for e in events)


def run_fuzz(conn: Connection, data: bytes, chunks) -> list:
    """Feed ``data``: only dispy's protocol errors may come out (anything else propagates)."""
    events, err = feed_collect(conn, data, chunks)
    check_events(events)
    if err is not None:
        assert conn.failed
    event(f"{type(err).__name__}, {len(events)} events")
    return events


@FUZZ
@given(case=garbage_cases(), chunks=chunkings)
def test_fuzz_unauthenticated_garbage(case, chunks):
    role, data = case
    conn = Connection(role, KEY)
    conn.initiate()
    events = run_fuzz(conn, data, chunks)
    assert events == []  # nothing can complete a handshake without the key
    assert not conn.authenticated


@st.composite
def mutated_sessions(draw):
    role = draw(st.sampled_from(["server", "client"]))
    sess = small_session()
    frames = list(sess.s2c if role == "client" else sess.c2s)
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["drop", "dup", "swap"]))
        i = draw(st.integers(0, len(frames) - 1))
        j = draw(st.integers(0, len(frames) - 1))
        if op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "dup":
            frames.insert(j, frames[i])
        else:
            frames[i], frames[j] = frames[j], frames[i]
    data = bytearray(wire(frames))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "copy", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "copy":
            src = draw(st.integers(0, len(data)))
            data[pos:pos] = data[src : src + draw(st.integers(1, 200))]
        elif op == "truncate":
            del data[pos:]
    expected = sess.at_client if role == "client" else sess.at_server
    return role, bytes(data), expected


@FUZZ
@given(case=mutated_sessions(), chunks=chunkings)
def test_fuzz_mutated_authenticated_stream(case, chunks):
    role, data, expected = case
    # a bounded max_frame: a mutated length field must not make the test allocate 4 GiB
    conn = fixed(role, max_frame=1 << 20)
    got = [norm(e) for e in run_fuzz(conn, data, chunks)]
    # tags chain every frame to its place in the stream: whatever is delivered is
    # exactly what the real peer sent, in order (a prefix of the expected events)
    assert got == expected[: len(got)]


def test_large_segments_are_padded_to_an_aligned_offset_and_padding_is_skipped():
    small, big = b"x" * 5, bytes(range(256)) * 8  # 2048 bytes: aligned
    lens, flat = join_segments([[small, big], [small]])
    assert lens == [5, -(ALIGN - 5), 2048, 5]
    payload = memoryview(b"".join(bytes(b) for b in flat))
    assert [bytes(s) for s in split_segments(payload, lens)] == [small, big, small]
    with pytest.raises(ProtocolError):
        split_segments(payload, [5, -ALIGN, 2048, 5])  # padding is never a whole ALIGN


def test_unauthenticated_connection_buffers_little_until_the_handshake():
    server, client = Connection("server", KEY), Connection("client", KEY)
    assert len(server.decoder._buf) <= 16 * 1024
    server.initiate()
    for buf in server.take_output():
        client.receive(buf)
    for buf in client.take_output():
        server.receive(buf)
    assert server.authenticated and len(server.decoder._buf) == _framing.AUTH_STAGING_SIZE
    # a small frame larger than that grows it to STAGING_SIZE, and arrives
    for buf in server.take_output():
        client.receive(buf)
    client.send(Kind.JOBS, {"s": [100_000]}, [b"j" * 100_000])
    (msg,) = feed(server, wire(client.take_output()), chunks=(7000,))
    assert bytes(msg.payload) == b"j" * 100_000 and len(server.decoder._buf) == STAGING_SIZE


# -- a large frame's buffer grows as its bytes arrive (#18 finding 6) ---------------------
def test_huge_frame_header_reserves_only_what_has_arrived(monkeypatch):
    """A peer announcing a 4 GiB body and sending 3 MiB gets a buffer of about
    that, not 4 GiB (the old decoder reserved the whole body on the header's word)."""
    monkeypatch.setattr(_framing, "GROW_ABOVE", 1 << 20)
    server, client = handshake()
    enc = client.encoder
    writer = enc.start(Kind.JOBS, b"\x80", (4 << 30) - 1)
    dec = server.decoder
    server.receive(writer.head)
    sent = 0
    chunk = bytes(256 << 10)
    while sent < (3 << 20):
        server.receive(chunk)
        sent += len(chunk)
        assert dec.reserved <= max(1 << 20, 2 * sent)
    assert (3 << 20) <= dec.reserved <= (6 << 20)


@pytest.mark.parametrize("hold_views", [False, True])
def test_growing_frame_arrives_whole_aligned_and_tagged(monkeypatch, hold_views):
    """A body above GROW_ABOVE, fed in uneven pieces, arrives byte for byte with its
    payload aligned, its tag checked; with views of the buffer still held (so it
    cannot be resized in place) it is copied into a larger one instead."""
    monkeypatch.setattr(_framing, "GROW_ABOVE", 1 << 20)
    server, client = handshake()
    arr = np.random.default_rng(7).random((5 << 20) // 8 + 3)
    lens, bufs = join_segments([[b"m" * 5], [memoryview(arr)]])
    client.send(Kind.JOBS, {"s": lens}, bufs)
    stream = memoryview(wire(client.take_output()))
    dec, held, events, pos = server.decoder, [], [], 0
    rng = random.Random(3)
    while pos < len(stream):
        buf = dec.get_buffer()
        n = min(len(buf), rng.randrange(1, 700_000), len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        if hold_views:
            held.append(buf)
        else:
            del buf
        events += server.buffer_updated(n)
        pos += n
        if dec._big is not None:
            big = dec._big
    assert isinstance(big, _framing.GrowingBuffer) and big.capacity == big.size
    # grown in place (mremap) when no view is left alive; copied when one is
    assert (big.copies > 0) if hold_views else (big.copies == 0)
    (msg,) = events
    meta, data = split_segments(msg.payload, msg.ctl["s"])
    assert bytes(meta) == b"m" * 5
    got = np.frombuffer(data, dtype=np.float64)
    assert got.ctypes.data % ALIGN == 0
    np.testing.assert_array_equal(got, arr)
    # a flipped byte in the body still fails the tag
    server2, client2 = handshake()
    client2.send(Kind.JOBS, {"s": lens}, bufs)
    bad = bytearray(wire(client2.take_output()))
    bad[HEADER_SIZE + (3 << 20)] ^= 1
    with pytest.raises(ProtocolError, match="failed authentication"):
        feed(server2, bad, chunks=(300_000,))


# -- a job's long texts travel as segments (#18 finding 6) --------------------------------
def test_long_texts_travel_as_segments_and_come_back_whole():
    from dispy.protocol import texts_in, texts_out
    from dispy.protocol._messages import INLINE_TEXT, result_entries

    long_out = "é\ud800" + "x" * (3 << 20)  # a lone surrogate, as print() lets a job write
    entry = {"c": "cid", "j": 7, "n": 1, "st": 5, "o": long_out, "e": b"E" * 5000, "x": "short"}
    sent, segs = texts_out(entry, [b"RESULT"])
    assert entry["o"] == long_out  # the caller's entry is left alone
    assert sent["tx"] == {"o": 1, "e": 0} and "o" not in sent and sent["x"] == "short"
    ctl = pack_ctl(sent)
    assert len(ctl) < 200  # the control part stays small however much the job printed
    small = {"c": "cid", "j": 8, "n": 1, "o": "o" * INLINE_TEXT}
    assert texts_out(small, [b"R2"]) == (small, [b"R2"])
    lens, flat = join_segments([segs, [b"R2"]])
    payload = memoryview(b"".join(bytes(b) for b in flat))
    got = list(result_entries({"r": [unpack_ctl(ctl), small], "s": lens}, payload))
    (e1, s1), (e2, s2) = got
    assert e1 == entry and [bytes(s) for s in s1] == [b"RESULT"]
    assert e2 == small and [bytes(s) for s in s2] == [b"R2"]
    assert texts_in(small, [b"R2"]) == (small, [b"R2"])


@pytest.mark.parametrize(
    "tx", [[1], {"q": 1}, {"o": 2}, {"o": 1, "e": 1, "x": 1, "y": 0}, {"o": 1, "e": 1}]
)
def test_bad_text_fields_are_protocol_errors(tx):
    from dispy.protocol._messages import result_entries

    ctl = {"r": [{"c": "c", "j": 1, "n": 0, "tx": tx}], "s": [3]}
    with pytest.raises(ProtocolError):
        list(result_entries(ctl, memoryview(b"abc")))


def test_results_batches_are_cut_to_keep_control_parts_small():
    from dispy.protocol import RESULTS_CTL_BYTES, RESULTS_PER_FRAME
    from dispy.runtime.session import _result_frames

    out = [({"c": "c" * 32, "j": i, "n": 1, "o": "p" * 100}, [b"N."], None) for i in range(20_000)]
    frames = list(_result_frames(out))
    assert sum(len(f) for f in frames) == 20_000
    assert [e["j"] for f in frames for e, _, _ in f] == list(range(20_000))
    for f in frames:
        assert len(f) <= RESULTS_PER_FRAME
        assert (
            len(pack_ctl({"r": [e for e, _, _ in f], "s": [2] * len(f)})) <= RESULTS_CTL_BYTES * 1.2
        )


def test_control_part_budget_of_containers():
    from dispy.protocol._messages import MAX_CONTAINERS

    # the outer map and list count too
    ok = pack_ctl({"r": [{} for _ in range(MAX_CONTAINERS - 2)]})
    assert len(unpack_ctl(ok)["r"]) == MAX_CONTAINERS - 2
    with pytest.raises(ProtocolError, match="maps and arrays"):
        unpack_ctl(pack_ctl({"r": [[] for _ in range(MAX_CONTAINERS - 1)]}))


def test_job_ids_are_checked():
    """Found by fuzzing (#18): a job id SQLite cannot store (2**63), or one that is
    not a number, broke the daemons' stores; refused as protocol errors."""
    from dispy.protocol import job_id, job_ids

    assert job_id(0) == 0 and job_id((1 << 63) - 1) == (1 << 63) - 1
    assert job_ids({"j": [1, 2, 3]}) == [1, 2, 3]
    for bad in (-1, 1 << 63, True, 1.0, "1", [1], {"a": 1}, None):
        with pytest.raises(ProtocolError, match="job id"):
            job_ids({"j": [1, bad]})
