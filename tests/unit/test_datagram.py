"""Unit tests of the discovery datagram codec (``dispy.protocol._datagram``).

No sockets and no clock: every call gets its ``now``.  Datagrams with a
correct tag but a bad layout or body are built here independently of the
code under test, so the checks behind the tag are reached.
"""

from __future__ import annotations

import hmac
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dispy.protocol
from dispy.errors import AuthenticationFailed, ProtocolError
from dispy.protocol import (
    DatagramDecoder,
    DatagramKind,
    ReplayCache,
    ReplayedDatagram,
    datagram_key,
    derive_key,
    encode_datagram,
)
from dispy.protocol._datagram import HEADER_SIZE, MIN_SIZE, NONCE_SIZE, TAG_SIZE

KEY = derive_key("s3cret")
OTHER_KEY = derive_key("not the s3cret")
NOW = 1_700_000_000.0
NONCE = bytes(range(NONCE_SIZE))
BODY = {"name": "node-1", "port": 51348, "cpus": 8, "addrs": ["10.0.0.5"], "k": b"\x00\xff"}
ALLOWED = (ProtocolError, AuthenticationFailed)


# -- helpers ------------------------------------------------------------------
def dkey(key=KEY) -> bytes:
    """The datagram key, recomputed independently of the code under test."""
    return hmac.digest(key, b"dispy-datagram-key-v1", "sha256")


def build(
    kind=1,
    body=b"\x80",
    *,
    ts_ms=int(NOW * 1000),
    nonce=NONCE,
    magic=b"DSPYD",
    version=1,
    key=KEY,
) -> bytes:
    """A datagram laid out by hand, with a correct tag over whatever is given."""
    if isinstance(body, dict):
        body = msgpack.packb(body, use_bin_type=True)
    signed = magic + struct.pack("!BBQ", version, kind, ts_ms) + nonce + body
    return signed + hmac.digest(dkey(key), signed, "sha256")


def nonce(i: int) -> bytes:
    return i.to_bytes(NONCE_SIZE, "big")


def decoder(**kw) -> DatagramDecoder:
    return DatagramDecoder(KEY, **kw)


# -- round trip and layout ------------------------------------------------------
@pytest.mark.parametrize("kind", list(DatagramKind))
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_round_trip(kind, wrap):
    data = encode_datagram(kind, BODY, KEY, now=NOW)
    got_kind, body = decoder().decode(wrap(data), NOW)
    assert got_kind is kind and isinstance(got_kind, DatagramKind)
    assert body == BODY


def test_empty_body_round_trips_at_the_minimum_size():
    data = encode_datagram(DatagramKind.DISCOVER, {}, KEY, now=NOW)
    assert len(data) == MIN_SIZE == HEADER_SIZE + 1 + TAG_SIZE
    assert decoder().decode(data, NOW) == (DatagramKind.DISCOVER, {})


def test_layout_is_the_documented_one():
    data = encode_datagram(DatagramKind.ANNOUNCE, BODY, KEY, now=NOW + 0.0126, nonce=NONCE)
    assert data == build(2, BODY, ts_ms=int(NOW * 1000) + 13)
    assert data[:5] == b"DSPYD" and data[5] == 1 and data[6] == 2
    assert struct.unpack("!Q", data[7:15])[0] == int(NOW * 1000) + 13
    assert data[15:31] == NONCE
    assert msgpack.unpackb(data[31:-32]) == BODY


def test_kinds():
    assert [(k.name, int(k)) for k in DatagramKind] == [
        ("DISCOVER", 1),
        ("ANNOUNCE", 2),
        ("RELAY", 3),
    ]


def test_exports_and_error_classes():
    for name in (
        "DatagramDecoder",
        "DatagramKind",
        "ReplayCache",
        "ReplayedDatagram",
        "datagram_key",
        "encode_datagram",
    ):
        assert name in dispy.protocol.__all__
    assert issubclass(ReplayedDatagram, AuthenticationFailed)
    assert not issubclass(ReplayedDatagram, ProtocolError)


def test_datagram_key_is_separate_from_the_tcp_key():
    assert datagram_key(KEY) == dkey() != KEY
    assert datagram_key(OTHER_KEY) != datagram_key(KEY)
    assert len(datagram_key(KEY)) == 32
    with pytest.raises(ValueError):
        datagram_key(KEY[:31])
    with pytest.raises(ValueError):
        datagram_key("s3cret")


def test_nonces_are_fresh():
    a = encode_datagram(1, {}, KEY, now=NOW)
    b = encode_datagram(1, {}, KEY, now=NOW)
    assert a[15:31] != b[15:31]
    dec = decoder()
    dec.decode(a, NOW)
    dec.decode(b, NOW)  # same body, same millisecond: both accepted


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"kind": 0}, ValueError),
        ({"kind": 4}, ValueError),
        ({"body": [1, 2]}, TypeError),
        ({"body": {1: "x"}}, TypeError),
        ({"body": {"f": object()}}, TypeError),
        ({"key": b"short"}, ValueError),
        ({"now": -1.0}, ValueError),
        ({"now": float("nan")}, ValueError),
        ({"now": float("inf")}, ValueError),
        ({"now": 2.0**64}, ValueError),
        ({"now": "0"}, ValueError),
        ({"nonce": b"x" * 15}, ValueError),
        ({"nonce": "x" * 16}, ValueError),
        ({"body": {"x": b"a" * 1400}}, ValueError),
        ({"body": {"x": b"a" * 100}, "max_size": 150}, ValueError),
    ],
)
def test_encode_checks_its_arguments(kwargs, error):
    args = {"kind": 1, "body": {}, "key": KEY, "now": NOW, **kwargs}
    with pytest.raises(error):
        encode_datagram(args.pop("kind"), args.pop("body"), args.pop("key"), **args)


def test_encode_fills_max_size_exactly():
    overhead = len(encode_datagram(1, {"x": b""}, KEY, now=NOW)) - 2  # bin 8 header is 2 bytes
    body = {"x": b"a" * (1400 - overhead - 3)}  # bin 16 header is 3 bytes
    data = encode_datagram(1, body, KEY, now=NOW)
    assert len(data) == 1400
    assert decoder().decode(data, NOW)[1] == body
    with pytest.raises(ValueError):
        encode_datagram(1, {"x": b"a" * (1400 - overhead - 2)}, KEY, now=NOW)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"key": b"x" * 32 + b"y"},
        {"window": 0},
        {"window": -1},
        {"window": float("nan")},
        {"cache_size": 0},
        {"cache_size": 1.5},
        {"max_size": MIN_SIZE - 1},
    ],
)
def test_decoder_checks_its_arguments(kwargs):
    with pytest.raises(ValueError):
        DatagramDecoder(kwargs.pop("key", KEY), **kwargs)


def test_decode_checks_its_arguments():
    with pytest.raises(TypeError):
        decoder().decode("DSPYD" * 20, NOW)
    with pytest.raises(ValueError):
        decoder().decode(build(), float("nan"))


# -- malformed datagrams -----------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 5, HEADER_SIZE, HEADER_SIZE + TAG_SIZE, MIN_SIZE - 1])
def test_short(size):
    data = build()[:size]
    with pytest.raises(ProtocolError, match="too short"):
        decoder().decode(data, NOW)


def test_header_and_tag_alone_is_short():
    data = build(body=b"")
    assert len(data) == MIN_SIZE - 1
    with pytest.raises(ProtocolError, match="too short"):
        decoder().decode(data, NOW)


@pytest.mark.parametrize("magic", [b"DSPYE", b"DSPY\x00", b"\x00" * 5, b"dspyd"])
def test_bad_magic(magic):
    with pytest.raises(ProtocolError, match="not a dispy datagram"):
        decoder().decode(build(magic=magic), NOW)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_bad_version(version):
    with pytest.raises(ProtocolError, match="layout version"):
        decoder().decode(build(version=version), NOW)


def test_oversized():
    dec = decoder()
    big = build(body={"x": b"a" * 1400})
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.decode(big, NOW)
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.decode(bytes(1401), NOW)  # checked before anything else
    fits = build(body={"x": b"a" * 1000})
    small = decoder(max_size=len(fits) - 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        small.decode(fits, NOW)
    big_ok = decoder(max_size=4000)
    assert big_ok.decode(big, NOW)[1] == {"x": b"a" * 1400}


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never used in msgpack
        b"\x81",  # a map that lacks its entry
        b"\x81\xa1x",  # ... its value
        b"\xdb\xff\xff\xff\xff",  # a string longer than the datagram
        b"\x81\xa1x\xc4\x01\xff\x00",  # a map, then trailing bytes
        b"\x80\x80",  # two maps
        b"\x81\xa2\xff\xfe\x01",  # a key that is not UTF-8
    ],
)
def test_body_not_msgpack_with_a_correct_tag(body):
    dec = decoder()
    with pytest.raises(ProtocolError, match="not valid msgpack") as info:
        dec.decode(build(body=body), NOW)
    assert not isinstance(info.value, AuthenticationFailed)
    assert len(dec.cache) == 0  # not accepted, so not remembered


@pytest.mark.parametrize("value", [[], [1, 2], 7, "dispy", None, b"\x00", 1.5, True])
def test_body_not_a_map_with_a_correct_tag(value):
    with pytest.raises(ProtocolError, match="expected a map"):
        decoder().decode(build(body=msgpack.packb(value, use_bin_type=True)), NOW)


@pytest.mark.parametrize("key", [1, b"bytes", 1.5, None])
def test_body_keys_must_be_strings(key):
    body = msgpack.packb({key: 1}, use_bin_type=True)
    with pytest.raises(ProtocolError):
        decoder().decode(build(body=body), NOW)


def test_nested_keys_and_ext_types_are_data():
    body = msgpack.packb({"m": {b"k": 1}, "e": msgpack.ExtType(5, b"zz")}, use_bin_type=True)
    assert decoder().decode(build(body=body), NOW)[1] == {
        "m": {b"k": 1},
        "e": msgpack.ExtType(5, b"zz"),
    }


def test_deep_nesting_is_a_protocol_error():
    body = b"\x81\xa1x" + b"\x91" * 1300 + b"\xc0"
    with pytest.raises(ProtocolError):
        decoder().decode(build(body=body), NOW)


@pytest.mark.parametrize("kind", [0, 4, 255])
def test_unknown_kind_with_a_correct_tag(kind):
    dec = decoder()
    with pytest.raises(ProtocolError, match="unknown datagram kind"):
        dec.decode(build(kind=kind), NOW)
    assert len(dec.cache) == 0


def test_wrong_key():
    data = encode_datagram(1, BODY, OTHER_KEY, now=NOW)
    with pytest.raises(AuthenticationFailed, match="failed authentication") as info:
        decoder().decode(data, NOW)
    assert not isinstance(info.value, ReplayedDatagram)


def test_a_datagram_tagged_with_the_tcp_key_fails():
    signed = build()[:-TAG_SIZE]
    data = signed + hmac.digest(KEY, signed, "sha256")
    with pytest.raises(AuthenticationFailed):
        decoder().decode(data, NOW)


def test_flipped_bit_anywhere():
    data = encode_datagram(DatagramKind.ANNOUNCE, BODY, KEY, now=NOW, nonce=NONCE)
    dec = decoder()
    for pos in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            with pytest.raises(ALLOWED) as info:
                dec.decode(bytes(bad), NOW)
            if pos < 6:  # magic, version: not a dispy datagram of this layout
                assert type(info.value) is ProtocolError
            else:  # kind, timestamp, nonce, body, tag: all under the tag
                assert type(info.value) is AuthenticationFailed
    assert len(dec.cache) == 0
    assert dec.decode(data, NOW)[1] == BODY  # the original is still fresh


def test_tag_is_verified_before_the_body_is_parsed(monkeypatch):
    calls = []
    unpackb = msgpack.unpackb

    def spy(*args, **kw):
        calls.append(args)
        return unpackb(*args, **kw)

    monkeypatch.setattr(msgpack, "unpackb", spy)
    bad = bytearray(build(body=b"\xc1\xc1\xc1"))
    bad[-1] ^= 1
    with pytest.raises(AuthenticationFailed):
        decoder().decode(bytes(bad), NOW)
    assert calls == []
    with pytest.raises(AuthenticationFailed):
        decoder().decode(build(body=b"\xc1", key=OTHER_KEY), NOW)
    assert calls == []
    decoder().decode(build(), NOW)
    assert len(calls) == 1


# -- replay protection ------------------------------------------------------------
def test_replay_is_refused():
    data = encode_datagram(1, BODY, KEY, now=NOW)
    dec = decoder()
    assert dec.decode(data, NOW)[1] == BODY
    with pytest.raises(ReplayedDatagram, match="replayed"):
        dec.decode(data, NOW)
    with pytest.raises(ReplayedDatagram):
        dec.decode(bytearray(data), NOW + 30)
    assert len(dec.cache) == 1


def test_replay_with_another_body_or_kind_needs_the_key():
    """Reusing the nonce of an accepted datagram in a forged one fails its tag."""
    dec = decoder()
    dec.decode(build(1, {"a": 1}), NOW)
    forged = bytearray(build(1, {"a": 2}))
    forged[-TAG_SIZE:] = build(1, {"a": 1})[-TAG_SIZE:]
    with pytest.raises(AuthenticationFailed):
        dec.decode(bytes(forged), NOW)
    with pytest.raises(ReplayedDatagram):  # the key holder reusing a nonce: refused too
        dec.decode(build(2, {"a": 2}), NOW)


@pytest.mark.parametrize("skew", [-60.001, 60.001, -3600, 3600, -NOW])
def test_stale_and_future_timestamps(skew):
    data = encode_datagram(1, BODY, KEY, now=NOW + skew)
    dec = decoder()
    with pytest.raises(ReplayedDatagram, match="outside the window"):
        dec.decode(data, NOW)
    assert len(dec.cache) == 0


@pytest.mark.parametrize("skew", [-60.0, -59.999, 0.0, 59.999, 60.0])
def test_timestamps_within_the_window(skew):
    data = encode_datagram(1, BODY, KEY, now=NOW + skew)
    assert decoder().decode(data, NOW)[1] == BODY


def test_custom_window():
    dec = decoder(window=5)
    dec.decode(encode_datagram(1, {}, KEY, now=NOW - 5), NOW)
    with pytest.raises(ReplayedDatagram):
        dec.decode(encode_datagram(1, {}, KEY, now=NOW - 5.01), NOW)


def test_timestamp_at_the_edges_of_u64():
    with pytest.raises(ReplayedDatagram):
        decoder().decode(build(ts_ms=2**64 - 1), NOW)
    with pytest.raises(ReplayedDatagram):
        decoder().decode(build(ts_ms=0), NOW)
    assert decoder().decode(build(ts_ms=0), 30.0)[0] is DatagramKind.DISCOVER


def test_cache_is_bounded():
    size, extra = 64, 500
    dec = decoder(cache_size=size)
    sent = []
    for i in range(size + extra):
        data = build(body={"i": i}, nonce=nonce(i), ts_ms=int(NOW * 1000) + i)
        assert dec.decode(data, NOW)[1] == {"i": i}
        assert len(dec.cache) <= size
        assert len(dec.cache._heap) == len(dec.cache._seen) == len(dec.cache)
        sent.append(data)
    assert len(dec.cache) == size
    # evicted or not, every one of them is refused a second time
    for data in sent:
        with pytest.raises(ReplayedDatagram):
            dec.decode(data, NOW)
    assert len(dec.cache) == size


def test_cache_forgets_what_left_the_window():
    dec = decoder(cache_size=100)
    for i in range(10):
        dec.decode(build(nonce=nonce(i)), NOW)
    assert len(dec.cache) == 10
    dec.decode(build(nonce=nonce(99), ts_ms=int((NOW + 61) * 1000)), NOW + 61)
    assert len(dec.cache) == 1
    dec.cache.prune(NOW + 200)
    assert len(dec.cache) == 0


def test_replay_after_the_clock_steps_back():
    """A nonce forgotten because it left the window stays refused if the clock goes back."""
    dec = decoder()
    old = build(nonce=nonce(1))
    dec.decode(old, NOW)
    dec.decode(build(nonce=nonce(2), ts_ms=int((NOW + 100) * 1000)), NOW + 100)
    assert nonce(1) not in dec.cache
    with pytest.raises(ReplayedDatagram, match="older than"):
        dec.decode(old, NOW)


def test_a_full_cache_evicts_the_oldest_timestamp_first():
    dec = decoder(cache_size=3)
    ms = int(NOW * 1000)
    for i, ts in enumerate([ms + 30, ms + 10, ms + 20]):
        dec.decode(build(nonce=nonce(i), ts_ms=ts), NOW)
    dec.decode(build(nonce=nonce(3), ts_ms=ms + 5), NOW)  # evicts ms + 10, not ms + 30
    assert nonce(1) not in dec.cache and nonce(0) in dec.cache
    assert dec.cache.floor == ms + 10
    with pytest.raises(ReplayedDatagram):  # older than the floor: refused though never seen
        dec.decode(build(nonce=nonce(9), ts_ms=ms + 10), NOW)
    dec.decode(build(nonce=nonce(9), ts_ms=ms + 11), NOW)


def test_replay_cache_checks_its_arguments():
    with pytest.raises(ValueError):
        ReplayCache(0)
    with pytest.raises(ValueError):
        ReplayCache(10, window=0)
    cache = ReplayCache(2, window=1)
    cache.add(nonce(1), 1000, 1.0)
    with pytest.raises(ReplayedDatagram):
        cache.add(nonce(1), 1000, 1.0)


# -- property tests -------------------------------------------------------------------
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALID = [
    encode_datagram(k, b, KEY, now=NOW, nonce=nonce(i))
    for i, (k, b) in enumerate(
        [
            (DatagramKind.DISCOVER, {}),
            (DatagramKind.ANNOUNCE, BODY),
            (DatagramKind.RELAY, {"via": "10.0.0.1", "inner": [1, {"x": None}], "t": 1.5}),
        ]
    )
]


@FUZZ
@given(
    data=st.binary(max_size=1500) | st.builds(lambda t: b"DSPYD\x01" + t, st.binary(max_size=200))
)
def test_fuzz_random_bytes(data):
    with pytest.raises(ALLOWED):
        decoder().decode(data, NOW)


@st.composite
def mutated(draw):
    original = draw(st.sampled_from(VALID))
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xC1, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 40))]
        elif op == "truncate":
            del data[pos:]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=1400))
    return original, bytes(data)


@FUZZ
@given(case=mutated())
def test_fuzz_mutated_datagrams(case):
    original, data = case
    dec = decoder()
    try:
        kind, body = dec.decode(data, NOW)
    except ALLOWED:
        return
    # only the unchanged datagram can pass its tag
    assert data == original
    assert isinstance(kind, DatagramKind) and isinstance(body, dict)


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=8,
)


@settings(FUZZ, max_examples=100)  # drawing nested bodies is slow; 100 cover the shapes
@given(
    kind=st.sampled_from(list(DatagramKind)),
    body=st.dictionaries(st.text(max_size=10), json_like, max_size=6),
    skew=st.floats(-60, 60),
)
def test_fuzz_round_trip(kind, body, skew):
    try:
        data = encode_datagram(kind, body, KEY, now=NOW + skew)
    except ValueError:
        assert len(msgpack.packb(body, use_bin_type=True)) > 1400 - MIN_SIZE + 1
        return
    assert len(data) <= 1400
    assert decoder().decode(data, NOW) == (kind, body)


@FUZZ
@given(
    capacity=st.integers(1, 8),
    steps=st.lists(
        st.tuples(st.sampled_from(["new", "replay"]), st.integers(-70, 70), st.integers(0, 200)),
        max_size=60,
    ),
)
def test_fuzz_accepted_at_most_once(capacity, steps):
    """Whatever the clock does and however small the cache, no datagram is accepted twice."""
    dec = decoder(cache_size=capacity, window=10)
    sent, accepted = [], set()
    for i, (op, ts_offset, now_offset) in enumerate(steps):
        now = NOW + now_offset
        if op == "replay" and sent:
            data = sent[ts_offset % len(sent)]
        else:
            data = build(body={"i": i}, nonce=nonce(i), ts_ms=int((now + ts_offset / 7) * 1000))
            sent.append(data)
        try:
            dec.decode(data, now)
        except ReplayedDatagram:
            continue
        assert data not in accepted
        accepted.add(data)
        assert len(dec.cache) <= capacity
