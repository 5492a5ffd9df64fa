"""Atheris target: bytes from the network into dispy's frame layer.

Feeds the stream part of the input (layout in ``_common.py``) to a server
``Connection``, a client ``Connection`` (both with fixed nonces, so the seed
corpus holds real recorded sessions that get past the handshake), and bare
``FrameDecoder``s (with a key, trusted, and before authentication), through
``get_buffer``/``buffer_updated`` in read sizes taken from the input.

A crash is:

* any exception but ``ProtocolError``/``AuthenticationFailed`` (and their
  subclasses);
* an empty buffer from ``get_buffer`` (a reader would spin);
* a ``Connection`` that delivers anything but a prefix of what the real
  peer sent (the tags must make forgeries, replays and reorderings fail);
* a bare decoder that disagrees with ``reference_parse``, a plain reading of
  the documented frame layout: same frames, and an error exactly when the
  stream is malformed.

Run through ``run.py``; alone:
``python fuzz/fuzz_frames.py [libFuzzer flags] [corpus dir or crash file]``.
"""

from __future__ import annotations

import hmac
import struct
import sys

import atheris

with atheris.instrument_imports(include=["dispy"]):
    import _common as C

    from dispy.protocol import FrameDecoder

C2S, S2C, AT_SERVER, AT_CLIENT = C.record_session()
MAX_BODY_UNAUTH = 4096  # FrameDecoder's default

# the layout as _framing's docstring states it, written out again
_HEADER = struct.Struct("!4sBBHIQ")


class EmptyBuffer(AssertionError):
    pass


class Undelivered(AssertionError):
    """Something came out that the real peer did not send."""


class Disagreement(AssertionError):
    """The decoder and the reference parser read the stream differently."""


def reference_parse(stream: bytes, key: bytes | None, max_body: int, max_ctl: int):
    """(frames, malformed): the complete frames before the first error, and whether
    there is one.  An incomplete last frame is no error."""
    frames, pos, seq = [], 0, 0
    tag_size = 32 if key is not None else 0
    while len(stream) - pos >= _HEADER.size:
        header = stream[pos : pos + _HEADER.size]
        magic, version, kind, flags, ctl_len, body_len = _HEADER.unpack(header)
        if magic != b"DSPY" or version != 1 or flags != 0:
            return frames, True
        if body_len > max_body or ctl_len > body_len or ctl_len > max_ctl:
            return frames, True
        end = pos + _HEADER.size + body_len
        if len(stream) < end + tag_size:
            return frames, False
        body = stream[pos + _HEADER.size : end]
        if key is not None:
            mac = hmac.new(key, struct.pack("!Q", seq) + header + body, "sha256")
            if not hmac.compare_digest(mac.digest(), stream[end : end + tag_size]):
                return frames, True
        frames.append((kind, body[:ctl_len], body[ctl_len:]))
        seq += 1
        pos = end + tag_size
    return frames, False


def read_sizes(raw: bytes) -> list[int]:
    return [0 if b == 0 else 1 + b * b // 8 for b in raw]


def feed(target, stream: memoryview, sizes: list[int]):
    """Feed ``stream`` like recv_into would; return what came out before the first
    error, and the error (or None)."""
    out = []
    pos, i = 0, 0
    is_conn = not isinstance(target, FrameDecoder)
    try:
        while pos < len(stream):
            buf = target.get_buffer(-1)
            if len(buf) == 0:
                raise EmptyBuffer(f"get_buffer() returned an empty buffer at offset {pos}")
            n = min(len(buf), len(stream) - pos)
            if i < C.MAX_READS and sizes[i % len(sizes)]:
                n = min(n, sizes[i % len(sizes)])
            i += 1
            buf[:n] = stream[pos : pos + n]
            pos += n
            if is_conn:
                out.extend(C.norm(e) for e in target.buffer_updated(n))
            else:
                target.buffer_updated(n)
                while (f := target.next_frame()) is not None:
                    out.append((f.kind, f.ctl, bytes(f.payload)))
    except C.ALLOWED as exc:
        if is_conn and not target.failed:
            raise AssertionError("a Connection raised but is not marked failed") from None
        return out, exc
    return out, None


def check_prefix(got: list, expected: list, who: str) -> None:
    if got != expected[: len(got)]:
        raise Undelivered(f"{who} delivered {got!r}, not a prefix of {expected!r}")


def check_decoder(dec: FrameDecoder, stream: memoryview, sizes, key, limit: int, who: str):
    got, err = feed(dec, stream, sizes)
    frames, malformed = reference_parse(bytes(stream), key, limit, C.MAX_CTL)
    if got != frames or (err is not None) != malformed:
        raise Disagreement(
            f"{who}: decoder gave {len(got)} frames and {err!r}, the reference "
            f"{len(frames)} frames and {'an error' if malformed else 'no error'}"
        )
    return got


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    selector, nsizes = data[0], (data[1] & 7) + 1
    sizes = read_sizes(data[2 : 2 + nsizes])
    if len(sizes) < nsizes:
        return
    stream = memoryview(data)[2 + nsizes :]
    which = selector & 7
    every = which >= C.ALL
    C.set_geometry(small=bool(selector & C.SMALL))
    try:
        if every or which == C.SERVER:
            check_prefix(feed(C.connection("server"), stream, sizes)[0], AT_SERVER, "server")
        if every or which == C.CLIENT:
            check_prefix(feed(C.connection("client"), stream, sizes)[0], AT_CLIENT, "client")
        if every or which == C.DECODER:
            dec = FrameDecoder(C.MAX_FRAME, C.MAX_CTL)
            dec.key = C.DECODER_KEY
            check_decoder(dec, stream, sizes, C.DECODER_KEY, C.MAX_FRAME, "keyed")
        if every or which == C.TRUSTED:
            dec = FrameDecoder(C.MAX_FRAME, C.MAX_CTL, trusted=True)
            check_decoder(dec, stream, sizes, None, C.MAX_FRAME, "trusted")
        if every or which == C.UNKEYED:
            dec = FrameDecoder(C.MAX_FRAME, C.MAX_CTL, max_body_unauth=MAX_BODY_UNAUTH)
            check_decoder(dec, stream, sizes, None, MAX_BODY_UNAUTH, "unauthenticated")
    finally:
        C.set_geometry(small=False)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
