"""A job's way through the shared scheduler: from its client's JOBS into the
queue (or the restart's limbo), to a node by ``dispatch``, its end from the
node's RESULTS back to the client, and the client's ACK passed on to the node
once written down; cancels on the way.  The scheduler never unpickles: a job is
the client's bytes, a result the job process's."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from dispy._tasks import spawn
from dispy.core import job_end, jobstate
from dispy.errors import ProtocolError
from dispy.protocol import Kind, field, job_id, result_entries, split_segments, started_jobs

from .model import Comp, SJob

if TYPE_CHECKING:  # (annotations only: no import cycle)
    from .clients import ClientSession
    from .nodes import NodeLink

logger = logging.getLogger("dispyscheduler")


class JobRoute:
    """Mixed into ``SchedulerServer`` (its ``sched``, ``queue``, ``links``,
    ``comps``, ``state`` and the rest)."""

    def client_jobs(self, session: ClientSession, ctl: dict, payload) -> None:
        cid = field(ctl, "c", str)
        comp = session.comps.get(cid)
        segs = split_segments(payload, field(ctl, "s", list))
        pos = 0
        new = []
        for entry in field(ctl, "j", list):
            if not (isinstance(entry, list) and len(entry) in (2, 3)):
                raise ProtocolError("job entry must be [job id, segment count, (options)]")
            cjid, n = job_id(entry[0]), entry[1]
            opts = entry[2] if len(entry) == 3 else None
            if not isinstance(cjid, int) or not isinstance(n, int) or n < 1 or pos + n > len(segs):
                raise ProtocolError("bad job entry")
            part = segs[pos : pos + n]
            pos += n
            if comp is None or comp.spec is None:
                session.queue_result(
                    {"c": cid, "j": cjid, "n": 1, "st": jobstate.Terminated,
                     "x": "computation not set up on the scheduler"},
                    [b"N."],
                )  # fmt: skip
                continue
            old = comp.jobs.get(cjid)
            if old is not None and old.status not in jobstate.TERMINAL:
                continue  # sent again after a reconnection, and known here after all
            pin = None
            if isinstance(opts, dict) and "n" in opts:  # submit_node: which of our nodes
                opts = dict(opts)
                pin = self._find_link(opts.pop("n"))
                opts = opts or None
                if pin is None:
                    session.queue_result(
                        {"c": cid, "j": cjid, "n": 1, "st": jobstate.Abandoned,
                         "x": f"submit_node: the scheduler has no node {entry[2]['n']!r} "
                              f"(its nodes: {', '.join(sorted(self._node_names())) or 'none'})"},
                        [b"N."],
                    )  # fmt: skip
                    continue
            job = SJob(next(self.uids), comp, cjid, [bytes(p) for p in part], opts)
            comp.jobs[cjid] = job
            new.append(job)
            if comp.restored and not self.restored.is_set():
                self._limbo.append(job)
            elif pin is not None:
                self.sched.submit(job, pin)
            else:
                self.sched.submit(job)
        if new:
            self.state.put_jobs(cid, [(j.cjid, j.segs, j.opts) for j in new])
            self.stats["submitted"] += len(new)
        self.dispatch()

    def _find_link(self, name) -> tuple | None:
        """The key of the ready node ``name`` names (address, 'host:port', host, name)."""
        name = str(name)
        for key, lk in self.links.items():
            if lk.ready and name in (f"{lk.ip}:{lk.port}", f"{lk.host}:{lk.port}", lk.ip,
                                     lk.host, lk.name):  # fmt: skip
                return key
        return None

    def _node_names(self) -> set[str]:
        return {f"{lk.ip}:{lk.port}" for lk in self.links.values() if lk.ready}

    def dispatch(self) -> None:
        for node, batch in self.sched.assign():
            self.links[node.key].send_jobs(batch)

    def cancel(self, comp: Comp, cjid: int) -> None:
        job = comp.jobs.get(cjid)
        if job is None:
            return
        if job.status == jobstate.Created and job._node is None:  # here, not on a node
            try:
                self.queue.remove(job)
            except ValueError:
                if job not in self._limbo:
                    return
                self._limbo.remove(job)
            job.status = jobstate.next_status(job.status, jobstate.CANCEL)
            comp.deliver({"c": comp.cid, "j": cjid, "n": 1, "st": jobstate.Cancelled,
                          "x": "cancelled before it started"}, [b"N."])  # fmt: skip
        elif job._node in self.links:
            self.links[job._node].cancel(job)

    def node_results(self, link: NodeLink, ctl: dict, payload) -> None:
        for cid, jids in started_jobs(ctl).items():  # (read first: some ended since)
            comp = self.comps.get(cid)
            for jid in jids if comp is not None else ():
                job = comp.jobs.get(jid)
                if job is not None:
                    self.sched.started(link.key, job._uid)
                    if comp.session is not None:  # its client hears it too
                        comp.session.report_start(cid, jid)
        for entry, part in result_entries(ctl, payload):
            jid = field(entry, "j", int)
            cid = field(entry, "c", str)
            comp = self.comps.get(cid)
            if comp is None or comp.closed:
                link.ack(cid, jid)  # nobody wants it any more
                continue
            job = comp.jobs.get(jid)
            if job is None:  # not known here (came just before a restart): the client's
                job = comp.jobs[jid] = SJob(next(self.uids), comp, jid, None, None)
                self.sched.adopt(job, link.key)
            st = field(entry, "st", int)
            if st == jobstate.Created:  # handed back unstarted
                link.ack(cid, jid)
                if job._node == link.key and job.segs is not None:
                    self.sched.requeue(job)
                continue
            event = job_end.END_EVENT.get(st)
            elsewhere = job._node
            if event is None or not self.sched.ended(job, event):
                link.ack(cid, jid)
                continue
            if elsewhere is not None and elsewhere != link.key and elsewhere in self.links:
                self.links[elsewhere].cancel(job)  # a late result: its rerun is not needed
            job.segs = None
            job._node = link.key  # where its result waits for the client's ACK
            # the client reports the node that ran the job, not the scheduler
            entry["ip"] = link.ip
            job.comp.deliver(entry, part)
        self.dispatch()

    def _end(self, job: SJob, info: dict, segs) -> None:
        entry = dict(info)
        entry["c"], entry["j"], entry["n"] = job.comp.cid, job.cjid, len(segs)
        job._node = None
        job.comp.deliver(entry, segs)

    def job_ended(self, comp: Comp, entry: dict) -> None:
        self.stats["ended"] += 1
        job = comp.jobs.get(entry.get("j"))
        if job is not None and job._node is not None:
            self.done_on[job._node] += 1
        if entry.get("st") != jobstate.Finished:
            self.stats["failed"] += 1
            if job is not None:
                self.failures.append((job, comp, entry, time.time()))

    def client_acks(self, comp: Comp, cjids: list) -> None:
        """The client has these results: the nodes may forget them, but only once the
        jobs are gone from the state file too (else a restart would run them again)."""
        on_disk = set(self.state.drop_jobs(comp.cid, cjids))
        later = []
        for cjid in cjids:
            comp.owed.pop(cjid, None)
            job = comp.jobs.pop(cjid, None)
            if job is None or job._node is None:
                continue
            if cjid in on_disk:
                later.append((job._node, cjid))
            elif job._node in self.links:
                self.links[job._node].ack(comp.cid, cjid)
        if later:
            spawn(self._ack_when_written(comp.cid, later), "acknowledging written results", logger)

    async def _ack_when_written(self, cid: str, acks: list) -> None:
        # with the writer's next batch: a commit per client ACK would undo the batching
        await asyncio.to_thread(self.state.flush, None, False)
        for key, jid in acks:
            if key in self.links:
                self.links[key].ack(cid, jid)

    def forward_to_client(self, link: NodeLink, kind: Kind, ctl: dict, payload) -> None:
        comp = self.comps.get(ctl.get("c"))
        if comp is None or comp.session is None:
            return
        comp.session.forward(kind, ctl, [payload] if len(payload) else [])
