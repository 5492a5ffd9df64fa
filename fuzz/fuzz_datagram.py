"""Atheris target: discovery datagrams into ``DatagramDecoder.decode``.

The input is up to 8 records (layout in ``_common.py``), decoded in turn
by one decoder with a 4-nonce replay cache, each at a ``now`` taken from
the input (a fixed time, plus or minus 64 s), so replays, the window, the
eviction of nonces and the cache's floor are all reached.

A crash is any exception but ``ProtocolError``/``AuthenticationFailed``
(and their subclasses), a datagram accepted that is not byte for byte one
that was encoded with the key (a forgery), one accepted twice, or a cache
over its size.

Run through ``run.py``; alone: ``python fuzz/fuzz_datagram.py [libFuzzer flags] [corpus dir or crash file]``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["dispy"]):
    import _common as C

    from dispy.protocol import DatagramDecoder
    from dispy.protocol._datagram import WINDOW

KNOWN = C.datagrams()


def test_one_input(data: bytes) -> None:
    dec = DatagramDecoder(C.KEY, cache_size=C.CACHE_SIZE)
    accepted = set()
    for now, gram in C.parse_datagram_input(data):
        try:
            kind, body = dec.decode(gram, now)
        except C.ALLOWED:
            pass
        else:
            offset, expected = KNOWN.get(gram, (None, None))
            if expected != (kind, body):
                raise AssertionError(f"accepted a datagram that was never sent: {gram!r}")
            if abs(C.NOW + offset - now) > WINDOW:
                raise AssertionError(f"accepted a datagram stamped {offset} s off at {now}")
            if gram in accepted:
                raise AssertionError(f"accepted a datagram twice: {gram!r}")
            accepted.add(gram)
        if len(dec.cache) > C.CACHE_SIZE:
            raise AssertionError(f"replay cache holds {len(dec.cache)} nonces")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
