"""One side of a dispy connection: handshake, then authenticated messages.

Theory of operation
-------------------
The server (the side that accepted the TCP connection) speaks first::

    server -> HELLO    {p: "dispy", v: [min, max], n: server nonce}
    client -> AUTH     {v: chosen version, n: client nonce,
                        m: HMAC(K, "dispy-client" | v | server nonce | client nonce)}
    server -> AUTH_OK  {m: HMAC(K, "dispy-server" | v | server nonce | client nonce)}
           or AUTH_FAIL {r: reason}, then the server closes

``K`` is derived from the shared secret (an empty secret goes through the
same steps).  Both nonces are fresh, so neither proof can be replayed on
another connection, and the two labels stop a proof from being reflected.
Each direction then gets its own key, derived from ``K`` and both nonces,
and every later frame carries a tag under it (see ``_framing``).

Until the handshake is complete the decoder accepts only small handshake
frames; nothing a peer sends is handed up as a ``Message`` before it has
authenticated, so nothing from an unauthenticated peer is ever unpickled.

This object does no I/O: feed it bytes with ``get_buffer``/``buffer_updated``
(or ``receive``), send what ``take_output()`` returns.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from .. import config
from ..errors import AuthenticationFailed, IncompatibleVersion, ProtocolError
from ._framing import Frame, FrameDecoder, FrameEncoder, FrameWriter
from ._messages import HANDSHAKE_KINDS, Kind, field, pack_ctl, unpack_ctl

#: Protocol versions this code speaks (lowest, highest).
PROTOCOL_VERSIONS = (1, 1)
NONCE_SIZE = 32


#: scrypt's cost for the cluster key: about 30 ms and 8 MiB once per process, so a
#: secret cannot be guessed from a recorded handshake at more than a few dozen
#: words a second per core (one SHA-256 allowed half a million).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 13, 8, 1
_KEY_SALT = b"dispy cluster key v2"


def derive_key(secret: str | bytes | None) -> bytes:
    """The 32-byte key that proves knowledge of ``secret`` (None counts as empty):
    scrypt, slow on purpose; worked out once per secret in a process."""
    if secret is None:
        secret = b""
    if isinstance(secret, str):
        secret = secret.encode()
    return _derive(bytes(secret))


@functools.lru_cache(maxsize=32)
def _derive(secret: bytes) -> bytes:
    return hashlib.scrypt(
        secret, salt=_KEY_SALT, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 << 20, dklen=32
    )


@dataclass(slots=True)
class HandshakeComplete:
    version: int


@dataclass(slots=True)
class Message:
    kind: int
    ctl: dict
    payload: memoryview


def _proof(key: bytes, label: bytes, version: int, ns: bytes, nc: bytes) -> bytes:
    return hmac.digest(key, label + struct.pack("!H", version) + ns + nc, "sha256")


class Connection:
    """Sans-IO dispy connection.

    ``role`` is ``"server"`` (accepted the connection) or ``"client"``.
    ``trusted=True`` builds a channel with no handshake and no tags, for the
    socket pairs between a node daemon and its own job processes only.
    """

    def __init__(
        self,
        role: str,
        key: bytes | None = None,
        *,
        max_frame: int = config.MAX_FRAME_SIZE,
        max_ctl: int = config.MAX_CONTROL_SIZE,
        versions: tuple[int, int] = PROTOCOL_VERSIONS,
        trusted: bool = False,
        limited: bool = False,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError("role must be 'client' or 'server'")
        if not trusted and (not isinstance(key, bytes) or len(key) != 32):
            raise ValueError("an untrusted connection needs a 32-byte key (see derive_key)")
        self.role = role
        self._key = key
        self._versions = versions
        self.trusted = trusted
        self.decoder = FrameDecoder(max_frame, max_ctl, trusted=trusted, limited=limited)
        self.encoder = FrameEncoder()
        self._out: list = []
        self._nonce = os.urandom(NONCE_SIZE)
        self._peer_nonce = b""
        self.version: int | None = PROTOCOL_VERSIONS[1] if trusted else None
        self.authenticated = trusted
        self.failed = False
        self._state = "open" if trusted else ("hello" if role == "client" else "start")

    # -- starting -----------------------------------------------------------
    def initiate(self) -> None:
        """Queue the first handshake frame (the server speaks first)."""
        if self._state == "start":
            self._send_raw(Kind.HELLO, {"p": "dispy", "v": list(self._versions), "n": self._nonce})
            self._state = "auth"

    # -- receiving ----------------------------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> list:
        """Bytes arrived in the last buffer; return the events they complete."""
        self.decoder.buffer_updated(nbytes)
        return self._drain()

    def receive(self, data) -> list:
        """Feed received bytes (copying); return the events they complete."""
        events = []
        data = memoryview(data).cast("B")
        while data:
            buf = self.get_buffer()
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            del buf  # see FrameDecoder.feed
            data = data[n:]
            events.extend(self.buffer_updated(n))
        return events

    def _drain(self) -> list:
        events = []
        try:
            while (frame := self.decoder.next_frame()) is not None:
                ev = self._handle(frame)
                if ev is not None:
                    events.append(ev)
        except (ProtocolError, AuthenticationFailed):
            self.failed = True
            raise
        return events

    def _handle(self, frame: Frame):
        if self.authenticated:
            if frame.kind in HANDSHAKE_KINDS:
                raise ProtocolError(f"handshake frame {Kind(frame.kind).name} after handshake")
            return Message(frame.kind, unpack_ctl(frame.ctl), frame.payload)
        if frame.kind not in HANDSHAKE_KINDS:
            raise ProtocolError(
                f"peer sent frame kind {frame.kind} before authenticating; "
                "it is not a dispy peer or does not follow the protocol"
            )
        if len(frame.payload):
            raise ProtocolError("handshake frame with a payload")
        ctl = unpack_ctl(frame.ctl)
        if frame.kind == Kind.AUTH_FAIL:
            reason = field(ctl, "r", str, default="no reason given")[:500]
            raise AuthenticationFailed(f"peer refused authentication: {reason}")
        if self.role == "client":
            return self._client_step(frame.kind, ctl)
        return self._server_step(frame.kind, ctl)

    def _client_step(self, kind: int, ctl: dict):
        if self._state == "hello" and kind == Kind.HELLO:
            if field(ctl, "p", str) != "dispy":
                raise ProtocolError("peer is not a dispy peer")
            vs = field(ctl, "v", list)
            if len(vs) != 2 or not all(type(v) is int for v in vs):  # bool is not int
                raise ProtocolError("bad version range in HELLO")
            lo, hi = max(vs[0], self._versions[0]), min(vs[1], self._versions[1])
            if lo > hi:
                raise IncompatibleVersion(
                    f"peer speaks protocol versions {vs[0]}-{vs[1]}, this side {self._versions[0]}-"
                    f"{self._versions[1]}: install the same dispy version on client and nodes"
                )
            self._peer_nonce = _nonce(ctl)
            self.version = hi
            proof = _proof(self._key, b"dispy-client", hi, self._peer_nonce, self._nonce)
            self._send_raw(Kind.AUTH, {"v": hi, "n": self._nonce, "m": proof})
            self._state = "wait_ok"
            return None
        if self._state == "wait_ok" and kind == Kind.AUTH_OK:
            expected = _proof(
                self._key, b"dispy-server", self.version, self._peer_nonce, self._nonce
            )
            if not hmac.compare_digest(expected, field(ctl, "m", bytes)):
                raise AuthenticationFailed(
                    "peer could not prove it holds the secret: it is not the node you meant, "
                    "or it uses another secret"
                )
            self._open(self._peer_nonce, self._nonce)
            return HandshakeComplete(self.version)
        raise ProtocolError(f"unexpected {Kind(kind).name} during handshake")

    def _server_step(self, kind: int, ctl: dict):
        if self._state == "auth" and kind == Kind.AUTH:
            version = field(ctl, "v", int)
            if not self._versions[0] <= version <= self._versions[1]:
                self._refuse(f"protocol version {version} not supported")
                raise IncompatibleVersion(f"peer chose unsupported protocol version {version}")
            self._peer_nonce = _nonce(ctl)
            expected = _proof(self._key, b"dispy-client", version, self._nonce, self._peer_nonce)
            if not hmac.compare_digest(expected, field(ctl, "m", bytes)):
                self._refuse("wrong secret: use the same secret on client and node")
                raise AuthenticationFailed("peer does not hold the secret (wrong secret)")
            self.version = version
            proof = _proof(self._key, b"dispy-server", version, self._nonce, self._peer_nonce)
            self._send_raw(Kind.AUTH_OK, {"m": proof})
            self._open(self._nonce, self._peer_nonce)
            return HandshakeComplete(version)
        raise ProtocolError(f"unexpected {Kind(kind).name} during handshake")

    def _refuse(self, reason: str) -> None:
        self._send_raw(Kind.AUTH_FAIL, {"r": reason})

    def _open(self, ns: bytes, nc: bytes) -> None:
        c2s = hmac.digest(self._key, b"dispy-c2s" + ns + nc, "sha256")
        s2c = hmac.digest(self._key, b"dispy-s2c" + ns + nc, "sha256")
        if self.role == "client":
            self.encoder.key, self.decoder.key = c2s, s2c
        else:
            self.encoder.key, self.decoder.key = s2c, c2s
        self.authenticated = True
        self._state = "open"

    # -- sending ------------------------------------------------------------
    def _send_raw(self, kind: int, ctl: dict) -> None:
        self._out.extend(self.encoder.encode(kind, pack_ctl(ctl)))

    def send(self, kind: int, ctl: dict, payload=()) -> None:
        """Queue one message; ``payload`` is a sequence of buffers (not copied)."""
        self._check_open()
        self._out.extend(self.encoder.encode(kind, pack_ctl(ctl), payload))

    def start_frame(self, kind: int, ctl: dict, payload_len: int) -> FrameWriter:
        """Begin a frame whose payload the caller streams itself (see FrameWriter)."""
        self._check_open()
        return self.encoder.start(kind, pack_ctl(ctl), payload_len)

    def take_output(self) -> list:
        """Buffers queued for sending, in order; the queue is emptied."""
        out, self._out = self._out, []
        return out

    def _check_open(self) -> None:
        if not self.authenticated:
            raise ProtocolError("cannot send messages before the handshake is complete")


def _nonce(ctl: dict) -> bytes:
    n = field(ctl, "n", bytes)
    if len(n) != NONCE_SIZE:
        raise ProtocolError("nonce of wrong size")
    return n
