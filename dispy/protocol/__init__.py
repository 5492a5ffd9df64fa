"""The dispy wire protocol, without I/O: frames, handshake, message kinds.

Everything that parses bytes from the network lives in this package, so it
can be tested and fuzzed with no sockets.
"""

from ._connection import (
    PROTOCOL_VERSIONS,
    Connection,
    HandshakeComplete,
    Message,
    derive_key,
)
from ._datagram import (
    DatagramDecoder,
    DatagramKind,
    ReplayCache,
    ReplayedDatagram,
    datagram_key,
    encode_datagram,
)
from ._framing import Frame, FrameDecoder, FrameEncoder, FrameWriter
from ._messages import (
    Kind,
    field,
    join_segments,
    pack_ctl,
    result_entries,
    split_segments,
    unpack_ctl,
)

__all__ = [
    "PROTOCOL_VERSIONS",
    "Connection",
    "DatagramDecoder",
    "DatagramKind",
    "Frame",
    "FrameDecoder",
    "FrameEncoder",
    "FrameWriter",
    "HandshakeComplete",
    "Kind",
    "Message",
    "ReplayCache",
    "ReplayedDatagram",
    "datagram_key",
    "derive_key",
    "encode_datagram",
    "field",
    "join_segments",
    "pack_ctl",
    "result_entries",
    "split_segments",
    "unpack_ctl",
]
