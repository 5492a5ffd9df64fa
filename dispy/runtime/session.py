"""What a daemon's session with one authenticated client needs, on either daemon
that serves clients with the node protocol (``dispynode``, and
``dispyscheduler``, which clients take for a node):

* every message is taken as the conversation's table says
  (``dispy.protocol.conversation.TO_NODE``, in ``on_message``): the requests
  that touch the disk or wait on others (FILE, COMPUTE, CLOSE, DATA, RESUME)
  run one at a time in arrival order (``_ops``, ``_handle_op``), the others at
  once by the handler the subclass files in ``_at_once``;
* a refused request is answered with the reason (``_reply_error``), the
  session goes on;
* results are batched: every result queued in one loop turn goes out in one
  RESULTS frame (``queue_result``);
* the pulses to the client (``_pulses``, started by ``_start_pulses``): the
  daemon's ``pulse()`` every pulse interval, and a client silent for the
  daemon's zombie interval (``_zombie_interval()``) is dropped.

Subclasses call ``_init_session()``, file their handlers of JOBS, ACK, INFO_REQ
and CANCEL in ``_at_once``, then ``chan.start()``, and provide
``on_close``, ``pulse``, ``_zombie_interval`` and the handlers ``_file``,
``_compute``, ``_close_comp``, ``_data`` and ``_resume`` (with ``_take_over`` and
``_resumed``); their computations have ``cid``, ``session`` and ``detached_at``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from .. import config
from ..errors import ConnectionClosed, ProtocolError
from ..protocol import RESULTS_CTL_BYTES, RESULTS_PER_FRAME, Kind, join_segments, texts_out
from ..protocol.conversation import Take, taken_by_node

#: A job's start is said at most this long after it, in the RESULTS frame of its
#: end if it ends by then: a tiny job's start then costs no frame of its own (a
#: frame more per job: a wake-up more of the client, and of this daemon).
START_REPORT_DELAY = 0.002


class SessionBase:
    #: errors that refuse one request (logged as a warning, answered with the reason)
    REFUSED: tuple = (ProtocolError, ValueError)

    def _init_session(self, chan, log: logging.Logger, pulse_interval: float) -> None:
        """Set up; the subclass starts the channel (``chan.start()``) once its own
        fields are set."""
        self.chan = chan
        self.peer = chan.peer
        self._log = log
        self.pulse_interval = pulse_interval
        self.last_heard = time.monotonic()
        self._pulse_task: asyncio.Task | None = None
        chan.on_message = self.on_message
        chan.on_close = self.on_close
        self._out: list = []
        self._starts: dict[str, list] = {}  # jobs started since the last RESULTS, per computation
        self._flush_scheduled = False
        self._start_timer: asyncio.TimerHandle | None = None  # a starts-only flush, later
        self._ops: asyncio.Queue = asyncio.Queue()
        self._current = None  # the request being handled
        self._stop_after = False  # stop once the request being handled is done
        self._ops_task = asyncio.get_running_loop().create_task(self._run_ops())
        #: handlers of the messages taken at once (kind -> fn(ctl, payload))
        self._at_once: dict = {Kind.PING: self._ping}
        self._in_order: dict = {
            Kind.FILE: self._file,
            Kind.COMPUTE: self._compute,
            Kind.CLOSE: self._close_comp,
            Kind.DATA: self._data,
            Kind.RESUME: self._resume,
        }

    # -- messages from the client -------------------------------------------------------
    def on_message(self, msg) -> None:
        self.last_heard = time.monotonic()
        if taken_by_node(msg.kind) is Take.IN_ORDER:
            self._queue_op(msg.kind, msg.ctl, msg.payload)
        else:
            self._at_once[msg.kind](msg.ctl, msg.payload)

    def _ping(self, ctl: dict, payload) -> None:
        self.chan.send(Kind.PONG, {})

    # -- pulses -----------------------------------------------------------------------
    def _start_pulses(self) -> None:
        if self._pulse_task is None:
            self._pulse_task = asyncio.get_running_loop().create_task(self._pulses())

    def _stop_pulses(self) -> None:
        if self._pulse_task is not None:
            self._pulse_task.cancel()

    async def _pulses(self) -> None:
        """``pulse()`` every pulse interval; drop a client silent for the zombie
        interval (its computations close, or wait for it to come back)."""
        while not self.chan.is_closed:
            await asyncio.sleep(self.pulse_interval)  # a period, not a wait for a condition
            silent = time.monotonic() - self.last_heard
            if silent > self._zombie_interval():
                self._log.warning(
                    "client %s silent for %.0f s (zombie interval): dropped", self.peer, silent
                )
                self.chan.abort()
                return
            self.pulse()

    async def _handle_op(self, kind, ctl: dict, payload) -> None:
        await self._in_order[kind](ctl, payload)

    # -- RESUME -----------------------------------------------------------------------
    def _take_over(self, comp) -> None:
        """A resumed computation belongs to this connection now (its old one may have
        died unnoticed)."""
        old = comp.session
        if old is not None and old is not self:
            old.comps.pop(comp.cid, None)
        comp.session = self
        comp.detached_at = None
        self.comps[comp.cid] = comp

    def _resumed(self, cid: str, known: bool, jobs: list, owed: dict, running=()) -> None:
        """Answer a RESUME: whether the computation is set up, the jobs still here
        (``running``: those of them that started, ``run``), the results not
        acknowledged (``owed``: job id -> (entry, segments)), sent again now."""
        if self.chan.is_closed:
            return
        ctl = {"c": cid, "known": known, "jobs": jobs, "done": list(owed)}
        if running:
            ctl["run"] = list(running)
        self.chan.send(Kind.RESUMED, ctl)
        for entry, segs in list(owed.values()):
            self.queue_result(entry, segs)

    def _queue_op(self, kind, ctl, payload) -> None:
        if self._ops.qsize() >= config.MAX_PENDING_OPS:
            raise ProtocolError(f"more than {config.MAX_PENDING_OPS} pending requests")
        self._ops.put_nowait((kind, ctl, payload))

    async def _run_ops(self) -> None:
        while not self._stop_after:
            kind, ctl, payload = await self._ops.get()
            self._current = kind
            try:
                await self._handle_op(kind, ctl, payload)
            except self.REFUSED as exc:
                self._log.warning("request from %s refused: %s", self.peer, exc)
                self._reply_error(kind, ctl, str(exc))
            except ConnectionClosed:
                return
            except Exception as exc:
                self._log.exception("request %s from %s failed", kind, self.peer)
                self._reply_error(kind, ctl, f"{type(exc).__name__}: {exc}")
            finally:
                self._current = None
                # not kept while waiting for the next request: a DATA or FILE
                # payload may be hundreds of MB (the received frame's buffer)
                kind = ctl = payload = None

    def _reply_error(self, kind, ctl, reason: str) -> None:
        if self.chan.is_closed:
            return
        cid = ctl.get("c", "") if isinstance(ctl, dict) and isinstance(ctl.get("c"), str) else ""
        if kind == Kind.COMPUTE:
            self.chan.send(Kind.COMPUTE_REPLY, {"c": cid, "ok": False, "r": reason})
        elif kind == Kind.DATA:
            self.chan.send(Kind.DATA_OK, {"c": cid, "t": ctl.get("t"), "ok": False, "r": reason})
        else:  # naming the request, so that a client waiting for its reply stops
            error = {"c": cid, "r": reason}
            if isinstance(kind, int):
                error["k"] = int(kind)
            self.chan.send(Kind.ERROR, error)

    # -- results to the client --------------------------------------------------------
    def queue_result(self, entry: dict, segs, sent=None, now: bool = False) -> None:
        """Send a job's end in this loop turn's RESULTS frame (``now``: at once, with
        those queued before it); ``sent()`` (if given) once that frame is handed to
        the connection, or it ended first."""
        if self.chan.is_closed:
            if sent is not None:
                sent()
            return
        self._out.append((entry, segs, sent))
        if now:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def report_start(self, cid: str, jid) -> None:
        """Job ``jid`` of ``cid`` started: said in the next RESULTS frame (``g``), at
        most START_REPORT_DELAY from now."""
        if self.chan.is_closed:
            return
        self._starts.setdefault(cid, []).append(jid)
        if not self._flush_scheduled and self._start_timer is None:
            self._start_timer = asyncio.get_running_loop().call_later(
                START_REPORT_DELAY, self._starts_due
            )

    def _starts_due(self) -> None:
        # (not cancelled by the flushes before it: a job's end usually says its start
        # first; one timer then serves the starts of many short jobs)
        self._start_timer = None
        if self._starts:
            self._flush()

    def say_starts(self) -> None:
        """Send the starts not said yet, now: before what shows a job started (its
        provisional result, a file it sent)."""
        if self._starts:  # (waiting for the timer, or for this turn's flush)
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        starts, self._starts = self._starts, {}
        frames = list(_result_frames(out))
        if starts and not frames:
            frames = [[]]  # starts only: a frame without results
        for batch in frames:
            told = [sent for _, _, sent in batch if sent is not None]
            if self.chan.is_closed:
                for sent in told:
                    sent()
                continue
            lens, flat = join_segments(segs for _, segs, _ in batch)
            ctl = {"r": [e for e, _, _ in batch], "s": lens}
            if starts:
                ctl["g"], starts = starts, None
            if told:
                self.chan.send(Kind.RESULTS, ctl, flat, sent=functools.partial(_tell, told))
            else:
                self.chan.send(Kind.RESULTS, ctl, flat)
        if frames and not self.chan.is_closed:
            self.chan.flush()  # (this turn's results are all in: no need to wait for its end)


def _tell(told: list) -> None:
    for sent in told:
        sent()


def _result_frames(out: list):
    """Job ends as they go on the wire (long texts as segments), in frames whose
    control part stays well under the peer's limit."""
    batch: list = []
    size = 0
    for entry, segs, sent in out:
        entry, segs = texts_out(entry, segs)
        # about its msgpack size: texts left inline are short, the rest is small
        cost = 16 + sum(len(v) + 2 if isinstance(v, str | bytes) else 9 for v in entry.values())
        if batch and (len(batch) >= RESULTS_PER_FRAME or size + cost > RESULTS_CTL_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((entry, segs, sent))
        size += cost
    if batch:
        yield batch
