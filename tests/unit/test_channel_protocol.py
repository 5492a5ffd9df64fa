"""``dispy.transport.ChannelProtocol``'s server side, fed bytes by hand."""

import asyncio

from dispy.protocol import Connection
from dispy.protocol._connection import derive_key
from dispy.transport import ChannelProtocol


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def get_extra_info(self, name, default=None):
        return {"peername": ("10.1.2.3", 40000), "socket": None}.get(name, default)

    def write(self, data) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def _feed(proto: ChannelProtocol, data: bytes) -> None:
    while data:
        buf = proto.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        del buf
        proto.buffer_updated(n)
        data = data[n:]


def test_a_wrong_secret_is_told_to_the_server_before_anything_else_runs():
    """The guess delay counts a failed handshake from the callback that read the
    wrong proof: the peer, told at once, may connect again before any task of the
    server runs (under uvloop it did, every time, and its next guess went unslowed)."""

    async def main():
        refused = []
        server = ChannelProtocol(
            Connection("server", derive_key("the node's secret")), refused=refused.append
        )
        transport = _Transport()
        server.connection_made(transport)  # the server speaks first: HELLO
        client = Connection("client", derive_key("a wrong guess"))
        client.receive(bytes(transport.out))  # HELLO read; AUTH queued
        transport.out.clear()
        _feed(server, b"".join(bytes(b) for b in client.take_output()))
        told_before_any_turn = list(refused)
        await asyncio.sleep(0)
        return told_before_any_turn, refused, transport

    told, refused, transport = asyncio.run(main())
    assert [p.peer_host for p in told] == ["10.1.2.3"]
    assert len(refused) == 1 and transport.closed
