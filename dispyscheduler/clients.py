"""The scheduler's session with one client (``SharedJobCluster``): to the
client the scheduler is one big node, speaking the node protocol."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from dispy import transport
from dispy._paths import safe_relpath, write_chunk
from dispy.core import jobstate
from dispy.errors import ProtocolError
from dispy.protocol import Kind, field, job_ids
from dispy.runtime.session import SessionBase

from .model import Comp

if TYPE_CHECKING:  # (annotations only: no import cycle)
    from .server import SchedulerServer

logger = logging.getLogger("dispyscheduler")

#: Seconds a client's COMPUTE waits for a node to set the computation up.
SETUP_WAIT_S = 120


class ClientSession(SessionBase):
    """One authenticated client (SharedJobCluster) connection."""

    def __init__(self, server: SchedulerServer, chan: transport.Channel) -> None:
        self.server = server
        self.comps: dict[str, Comp] = {}
        self._init_session(chan, logger, server.pulse_interval)
        self._at_once.update(
            {Kind.JOBS: self._jobs, Kind.ACK: self._ack, Kind.INFO_REQ: self._info,
             Kind.CANCEL: self._cancel}
        )  # fmt: skip
        chan.start()

    # -- messages from the client: what the conversation's table takes at once ----------
    def _jobs(self, ctl: dict, payload) -> None:
        self.server.client_jobs(self, ctl, payload)

    def _ack(self, ctl: dict, payload) -> None:
        cid = field(ctl, "c", str)
        comp = self.comps.get(cid)
        if comp is not None:
            self.server.client_acks(comp, job_ids(ctl))
        elif cid in self.server.retired:
            self.server.retired_acks(cid, job_ids(ctl))

    def _cancel(self, ctl: dict, payload) -> None:
        comp = self.comps.get(field(ctl, "c", str))
        if comp is not None:
            for cjid in job_ids(ctl):
                self.server.cancel(comp, cjid)

    def _info(self, ctl: dict, payload) -> None:
        pulse = field(ctl, "pulse", (int, float), default=0)
        if pulse:
            self.pulse_interval = max(0.2, float(pulse))
        self._start_pulses()
        self.chan.send(Kind.INFO, self.server.info())

    REFUSED = (ProtocolError, ValueError, OSError)

    def _comp(self, cid: str, name: str) -> Comp:
        comp = self.comps.get(cid)
        if comp is None:
            comp = self.server.comps.get(cid)
            if comp is None or comp.closed:
                comp = Comp(self.server, self, cid, name)
                self.server.add_comp(comp)
            comp.session = self
            self.comps[cid] = comp
        return comp

    async def _file(self, ctl: dict, payload) -> None:
        comp = self._comp(field(ctl, "c", str), field(ctl, "n", str, default="computation"))
        rel = safe_relpath(field(ctl, "p", str))
        offset = field(ctl, "o", int, default=0)
        if offset < 0:
            raise ProtocolError(f"file {rel!r}: negative offset {offset}")
        mode = field(ctl, "m", int, default=0o644) & 0o777
        if offset + len(payload) > self.server.max_file_size:
            raise ValueError(f"file {rel!r} exceeds the scheduler's limit (--max_file_size)")
        # kept private here (0600); the nodes get the client's mode
        await asyncio.to_thread(write_chunk, comp.dir, rel, offset, bytes(payload), 0o600)
        comp.files[rel] = mode

    async def _compute(self, ctl: dict, payload) -> None:
        cid = field(ctl, "c", str)
        comp = self._comp(cid, field(ctl, "n", str))
        nargs = field(ctl, "sa", int, default=0)
        if not 0 <= nargs <= len(payload):
            raise ProtocolError("bad setup arguments length")
        comp.spec = bytes(payload[: len(payload) - nargs])
        comp.setup_args = bytes(payload[len(payload) - nargs :])
        comp.exclusive = bool(ctl.get("x", False))
        comp.reentrant = bool(ctl.get("r", False))
        patterns = ctl.get("np") or ["*"]
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ProtocolError("node patterns must be a list of strings")
        comp.patterns = patterns
        comp.compute_reply = asyncio.get_running_loop().create_future()
        self.server.setup_everywhere(comp)
        try:  # a node whose setup hangs must not hold up the client for ever
            ok, why = await asyncio.wait_for(asyncio.shield(comp.compute_reply), SETUP_WAIT_S)
        except TimeoutError:
            logger.warning("computation %s: no node finished its setup in %d s; its jobs "
                           "wait for one", comp.name, SETUP_WAIT_S)  # fmt: skip
            ok, why = True, ""
        if ok:  # on disk before the client is told: a restarted scheduler knows it
            await self.server.save_comp(comp)
        if not self.chan.is_closed:
            reply = {"c": cid, "ok": ok}
            if not ok:
                reply["r"] = why
            self.chan.send(Kind.COMPUTE_REPLY, reply)

    async def _data(self, ctl: dict, payload) -> None:
        cid = field(ctl, "c", str)
        comp = self.comps.get(cid)
        if comp is None or comp.spec is None:
            raise ValueError(f"computation {cid} is not set up on this scheduler")
        name = field(ctl, "n", str)
        version = field(ctl, "v", int)
        lens = field(ctl, "s", list)
        comp.data[name] = (version, lens, bytes(payload))
        await self.server.save_comp(comp)
        links = [self.server.links[k] for k in list(comp.ready_on) if k in self.server.links]
        results = await asyncio.gather(
            *(lk.put_data(comp, name) for lk in links), return_exceptions=True
        )
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        if not self.chan.is_closed:
            reply = {"c": cid, "t": ctl.get("t"), "ok": not errors}
            if errors:
                reply["r"] = "; ".join(errors)
            self.chan.send(Kind.DATA_OK, reply)

    async def _close_comp(self, ctl: dict, payload) -> None:
        cid = field(ctl, "c", str)
        comp = self.comps.pop(cid, None)
        error = ""
        if comp is not None:
            error = await self.server.close_comp(comp, bool(ctl.get("t", False)))
        elif cid in self.server.retired:  # recover_jobs is done with it
            self.server.forget_retired(cid)
        if not self.chan.is_closed:
            self.chan.send(Kind.CLOSED, {"c": cid, "r": error or ""})

    async def _resume(self, ctl: dict, payload) -> None:
        """The client reconnected (or ``recover_jobs`` runs).  Its jobs the scheduler
        does not list are not anywhere: the client sends them again.  After a restart,
        the answer waits until the nodes said which jobs they have."""
        cid = field(ctl, "c", str)
        server = self.server
        if cid in server.retired:  # a zombie's results, kept for recover_jobs
            self._resumed(cid, False, [], server.retired[cid])
            return
        comp = server.comps.get(cid)
        if comp is not None and comp.restored:
            await server.restored.wait()
        if comp is None or comp.closed:
            self._resumed(cid, False, [], {})
            return
        self._take_over(comp)
        jobs = [jid for jid in comp.jobs if jid not in comp.owed]
        running = [jid for jid in jobs if comp.jobs[jid].status == jobstate.Running]
        self._resumed(cid, comp.spec is not None, jobs, comp.owed, running)

    # -- to the client ----------------------------------------------------------------
    def forward(self, kind: Kind, ctl: dict, payload=()) -> None:
        """A node's STATUS (provisional result) or FILE for this client's job: after
        the starts not said yet (the job's among them)."""
        if not self.chan.is_closed:
            self.say_starts()
            self.chan.send(kind, ctl, payload)

    def _zombie_interval(self) -> float:
        return self.server.zombie_interval

    def pulse(self) -> None:
        """What the scheduler's nodes have free, as clients see it (one big node)."""
        if not self.chan.is_closed:
            self.chan.send(Kind.STATUS, self.server.status_for_clients())

    def on_close(self, exc) -> None:
        if exc is not None:
            logger.info("client %s disconnected: %s", self.peer, exc)
        self._ops_task.cancel()
        self._stop_pulses()
        for comp in self.comps.values():
            if comp.session is self:
                comp.session = None
                comp.detached_at = self.last_heard
        self.comps = {}
        self.server.sessions.discard(self)
