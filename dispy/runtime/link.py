"""What a long-lived connection to a node needs, on either side that keeps one:
the client's link (``dispy.engine.link.NodeLink``) and the scheduler's
(``dispyscheduler.nodes.NodeLink``).

* what the node says, taken as the conversation's table says
  (``dispy.protocol.conversation.TO_CLIENT``, in ``on_message``): what comes
  unasked goes to the subclass's handler in ``_streams``, a reply to the request
  that waits for it;
* requests waiting for their reply (``request``), failed at once when the
  connection ends (``_fail_waiters``) or the node refuses them (an ERROR naming
  the request): a request in flight must not wait for ever;
* the pulse watchdog (``_watch``): a node silent for ``MISSED_PULSES`` pulses
  is cut off (a partition or a frozen host does not close a TCP connection);
* the liveness window after a lost connection (``_suspend``): the node's jobs
  stay put while it may come back; ``_declare_dead`` when the window passes
  (or the node process is known gone) calls the owner's ``_node_lost``.

A link's life is one ``Phase`` at a time, changed only through the
``TRANSITIONS`` table (``_to``), as a job's status is through
``dispy.core.jobstate``::

    DOWN --connected--> UP --set up--> READY --connection lost--+--> SUSPECT
      ^                  |                 |   (window left)    |       | connected: stays
      |<-----lost--------'                 |                    |       | back (RESUME said
      |<-----lost (no window left)---------'                    |       v  what it has): UP
      |<-----dead (the window passed, or no dispynode there)----'
    any --permanent error--> FAILED (the link stops)

Besides its phase a link has one intent, ``_closing`` (its owner closes it,
or it turned out not to be wanted: it stops once the connection ends).

Subclasses have ``host`` and ``port``, call ``_init_link()``, file their
handlers of RESULTS, STATUS and FILE in ``_streams``, and provide ``_session``, ``_lost``, ``_pulse_interval()`` and
``_node_lost()``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time

from ..errors import AuthenticationFailed, ConnectionClosed, IncompatibleVersion, ProtocolError
from ..protocol import IDS_PER_FRAME, Kind
from ..protocol.conversation import Take, reply_key, request_key, taken_by_client

#: Pulses a node may miss before it is cut off; also the liveness window.
MISSED_PULSES = 5
#: Longest wait between two attempts to connect to a node that does not answer;
#: a node's announcement (it started) ends the wait at once.
MAX_BACK_OFF = 10.0
#: Seconds from a result's arrival to its ACK (with the others that came meanwhile):
#: well under the node store's wait before writing a result (0.1 s), so an
#: acknowledged result is still never written there.
ACK_DELAY = 0.005


class Phase(enum.Enum):
    #: no connection in use: before the first, between attempts, or after the
    #: node's jobs were declared lost
    DOWN = "down"
    #: connected and authenticated, being set up: no jobs yet
    UP = "up"
    #: set up: it takes jobs
    READY = "ready"
    #: the connection was lost while ready; for the rest of the liveness window
    #: its jobs wait for it (also while it reconnects, until it says what it has)
    SUSPECT = "suspect"
    #: a permanent error (a wrong secret, an unknown host...): the link stopped
    FAILED = "failed"


# events
CONNECTED = "connected"  # a connection was made and authenticated
SET_UP = "set up"  # the node has what it needs: it may take jobs
SUSPEND = "suspend"  # the connection was lost while ready, within the window
LOST = "lost"  # the connection was lost (or never made); nothing waits for it
BACK = "back"  # reconnected within the window and told what it still has
DEAD = "dead"  # the window passed, or the node process is known gone
FAIL = "fail"  # a permanent error

TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.DOWN, CONNECTED): Phase.UP,
    (Phase.SUSPECT, CONNECTED): Phase.SUSPECT,
    (Phase.UP, SET_UP): Phase.READY,
    (Phase.READY, SUSPEND): Phase.SUSPECT,
    (Phase.READY, LOST): Phase.DOWN,
    (Phase.UP, LOST): Phase.DOWN,
    (Phase.DOWN, LOST): Phase.DOWN,
    (Phase.SUSPECT, LOST): Phase.SUSPECT,
    (Phase.SUSPECT, BACK): Phase.UP,
    (Phase.SUSPECT, DEAD): Phase.DOWN,
    **{(phase, FAIL): Phase.FAILED for phase in Phase},
}


def next_phase(phase: Phase, event: str) -> Phase:
    """The phase ``event`` leads to from ``phase``; a pair not in the table is a
    bug in the link (``RuntimeError``, never a silent change)."""
    try:
        return TRANSITIONS[(phase, event)]
    except KeyError:
        raise RuntimeError(f"node link: no transition from {phase.value} on {event!r}") from None


class NodeIds:
    """Which link has which node, by the run id a node gives in INFO: one link per
    node, however it was named or found (an address, a host name, discovery).
    The client's engine and the scheduler keep one each, over their links
    (``links``: key -> link)."""

    def __init__(self, links: dict) -> None:
        self.links = links
        self.nids: dict[str, tuple] = {}  # node run id -> link key

    def known(self, ip: str, port: int, nid) -> bool:
        """Whether discovery's node (``ip``, ``port``, run id ``nid``) has a link."""
        if nid in self.nids and self.nids[nid] in self.links:
            return True
        return any(lk.port == port and ip in (lk.host, lk.address) for lk in self.links.values())

    def claim(self, nid, link) -> bool:
        """``link`` learned its node's run id: False if another link in use has that
        node (not one that failed for good or is closing)."""
        if not isinstance(nid, str):
            return True
        other = self.links.get(self.nids.get(nid))
        if other is not None and other is not link:
            if other.phase is not Phase.FAILED and not other._closing:
                return False
        self.nids[nid] = link.key
        return True


def read_chunk(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


class LinkBase:
    #: bytes of a file per FILE message
    FILE_CHUNK = 1 << 20
    chan = None
    _log = logging.getLogger("dispy")
    #: errors after which reconnecting is pointless
    PERMANENT: tuple = (AuthenticationFailed, IncompatibleVersion)
    #: seconds before the second attempt to connect (then doubled, up to MAX_BACK_OFF)
    FIRST_BACK_OFF = 0.5

    def _init_link(self, log: logging.Logger) -> None:
        self._log = log
        self._closing = False
        self.phase = Phase.DOWN
        self.chan = None
        self._waiters: dict = {}
        self._grace: asyncio.TimerHandle | None = None
        self.last_heard = time.monotonic()
        self._wake = asyncio.Event()  # set: try to connect now, not after the back-off
        self._acks: dict[str, list[int]] = {}  # results received, to acknowledge, by cid
        self._ack_scheduled = False
        #: handlers of what the node sends unasked (kind -> fn(ctl, payload))
        self._streams: dict = {}

    def __repr__(self) -> str:
        return f"{self.host}:{self.port}"

    def _to(self, event: str) -> None:
        self.phase = next_phase(self.phase, event)

    @property
    def ready(self) -> bool:
        """Set up: it takes jobs."""
        return self.phase is Phase.READY

    @property
    def suspect(self) -> bool:
        """Lost while ready, within the liveness window: its jobs wait for it."""
        return self.phase is Phase.SUSPECT

    def _pulse_interval(self) -> float:
        raise NotImplementedError

    def _node_lost(self) -> None:
        raise NotImplementedError

    async def _session(self) -> None:
        """One connection: connect, set up, serve until it ends (raises when it fails)."""
        raise NotImplementedError

    def _lost(self) -> None:
        raise NotImplementedError

    def _permanent(self, exc: Exception) -> None:
        """A PERMANENT error: say so; the link stops."""
        self._log.error("node %r: %s", self, exc)

    def _refused_means_dead(self) -> bool:
        """A refused reconnection within the window: the node process is gone?"""
        return True

    async def run(self) -> None:
        """Connect, serve, and reconnect (with back-off) until closed or a permanent error.
        A connection that was in use is tried again at once."""
        delay = self.FIRST_BACK_OFF
        warned = False
        while not self._closing:
            live = False
            try:
                await self._session()
                delay = self.FIRST_BACK_OFF
            except self.PERMANENT as exc:
                if self.suspect:  # it will not come back for its jobs: they are lost now
                    self._declare_dead(f"it refuses this cluster now ({exc})")
                self._to(FAIL)
                self._permanent(exc)
                return
            except (OSError, ConnectionClosed, TimeoutError, ProtocolError) as exc:
                if self._closing:
                    return
                live = self.ready
                why = getattr(exc, "strerror", None) or exc
                if (
                    isinstance(exc, ConnectionRefusedError)
                    and self.suspect
                    and self._refused_means_dead()
                ):
                    # the host answers but no node listens: the node process is gone,
                    # and its running jobs with it
                    self._declare_dead("its dispynode is not running any more")
                elif live:
                    self._log.info("node %r: %s; reconnecting", self, why)
                elif not warned and not self.suspect:
                    self._log.warning(
                        "cannot use node %r: %s; is dispynode running there? retrying", self, why
                    )
                    warned = True
            finally:
                self._lost()
            if self._closing:
                return
            if live and self.suspect:
                continue
            await self._back_off(min(delay, 0.5) if self.suspect else delay)
            delay = min(delay * 2, MAX_BACK_OFF)

    async def _back_off(self, seconds: float) -> None:
        """Wait before connecting again: ``seconds``, or until ``wake()``."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    def wake(self) -> None:
        """The node announced itself (it started, or is free): connect now if waiting."""
        self._wake.set()

    # -- one connection -------------------------------------------------------------------
    def _attach(self, chan) -> asyncio.Future:
        """Use ``chan`` (just connected and authenticated) from now on; the future
        gets the reason once it closes, and its pending requests fail then."""
        self.chan = chan
        self._to(CONNECTED)
        self.last_heard = time.monotonic()
        closed = asyncio.get_running_loop().create_future()
        chan.on_message = self.on_message
        chan.on_close = lambda exc: (
            closed.done() or closed.set_result(exc),
            self.chan is chan and self._fail_waiters(),  # not a later connection's
        )
        chan.start()
        return closed

    async def _serve(self, chan, closed: asyncio.Future) -> None:
        """The node is ready: pulse it until the connection ends; raise
        ``ConnectionClosed`` unless the link is closing."""
        watchdog = asyncio.get_running_loop().create_task(self._watch(chan))
        try:
            exc = await closed
        finally:
            watchdog.cancel()
        if not self._closing:
            raise ConnectionClosed(f"connection to node {self!r} lost: {exc}")

    async def _send_file(self, cid: str, name: str, rel: str, path: str, mode: int) -> None:
        """Send the file at ``path`` as ``rel`` of computation ``cid``, in chunks."""
        size = os.path.getsize(path)
        offset = 0
        while True:
            chunk = await asyncio.to_thread(read_chunk, path, offset, self.FILE_CHUNK)
            self.chan.send(
                Kind.FILE, {"c": cid, "n": name, "p": rel, "o": offset, "m": mode}, [chunk]
            )
            await self.chan.drain()
            offset += len(chunk)
            if offset >= size or not chunk:
                return

    # -- acknowledgements ----------------------------------------------------------------
    def ack(self, cid: str, jid: int) -> None:
        """The result of job ``jid`` of ``cid`` is safe here: the node may forget it.
        Acks go out ACK_DELAY after the first, together (ACK frames of at most
        IDS_PER_FRAME ids): an ACK sent at once lay on the way of the next job
        (the node read it just before that job, or the client's loop sent it
        before the program's thread saw the result)."""
        self._acks.setdefault(cid, []).append(jid)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_later(ACK_DELAY, self._send_acks)

    def _send_acks(self) -> None:
        self._ack_scheduled = False
        acks, self._acks = self._acks, {}
        if self.chan is not None and not self.chan.is_closed:
            for cid, jids in acks.items():
                for i in range(0, len(jids), IDS_PER_FRAME):
                    self.chan.send(Kind.ACK, {"c": cid, "j": jids[i : i + IDS_PER_FRAME]})

    # -- requests -------------------------------------------------------------------------
    def request(self, kind, ctl: dict, payload=()) -> asyncio.Future:
        """Send a request; the future gets its reply's control part (see
        ``conversation.REPLIES``), or fails if the node refuses it or the
        connection ends first."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters[request_key(kind, ctl)] = fut
        self.chan.send(kind, ctl, payload)
        return fut

    def on_message(self, msg) -> None:
        self.last_heard = time.monotonic()
        kind, ctl = msg.kind, msg.ctl
        if taken_by_client(kind) is Take.STREAM:
            self._streams[kind](ctl, msg.payload)
            return
        fut = self._waiters.pop(reply_key(kind, ctl), None)
        if fut is not None and not fut.done():
            if kind == Kind.ERROR:
                what = Kind(ctl["k"]).name
                fut.set_exception(ProtocolError(f"node {self!r} refused {what}: {ctl.get('r')}"))
            else:
                fut.set_result(ctl)
        elif kind == Kind.ERROR:
            self._log.warning("node %r: %s", self, ctl.get("r"))
        # (else a reply nobody waits for any more, or a PONG to the watchdog's PING)

    def _fail_waiters(self) -> None:
        """The connection ended: requests waiting for a reply on it fail now."""
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed(f"node {self!r} disconnected"))
        self._waiters.clear()

    # -- liveness -------------------------------------------------------------------------
    async def _watch(self, chan) -> None:
        """Pulse the node; cut it off if it is silent for MISSED_PULSES intervals."""
        interval = self._pulse_interval()
        limit = interval * MISSED_PULSES
        while not chan.is_closed:
            await asyncio.sleep(interval)  # the pulse period
            silent = time.monotonic() - self.last_heard
            if silent > limit:
                self._log.warning(
                    "node %r silent for %.1f s (%d pulses): declared dead",
                    self, silent, MISSED_PULSES,
                )  # fmt: skip
                chan.abort()
                return
            try:
                chan.send(Kind.PING, {})
            except ConnectionClosed:
                return

    def _suspend(self, window: float) -> bool:
        """The connection was lost: keep the node's jobs for the rest of ``window``
        (counted from when it was last heard).  False if that is over already (or
        the link is closing): the node is lost now."""
        remaining = window - (time.monotonic() - self.last_heard)
        if self._closing or remaining <= 0:
            self._to(LOST)
            return False
        self._to(SUSPEND)
        self._grace = asyncio.get_running_loop().call_later(
            remaining, self._declare_dead, f"no connection for {window:g} s"
        )
        return True

    def _back(self) -> None:
        """Reconnected within the window, and the node said which jobs it still has."""
        self._end_grace()
        self._to(BACK)

    def _end_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _declare_dead(self, why: str) -> None:
        """The liveness window passed (or the node process is gone): its jobs are lost."""
        if not self.suspect:
            return
        self._end_grace()
        self._to(DEAD)
        self._log.warning("node %r declared dead: %s", self, why)
        self._node_lost()
