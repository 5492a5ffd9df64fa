"""What the shared scheduler keeps across its own restart (its state file,
``state.py``): computations and their jobs restored at start and matched with
what the nodes still run (``_restore``, ``_end_restore``), and the results of a
client gone for good (a zombie), kept for ``recover_jobs`` (``retire``)."""

from __future__ import annotations

import asyncio
import logging
import time

from dispy.core import jobstate

from .model import Comp, SJob

logger = logging.getLogger("dispyscheduler")


class Durable:
    """Mixed into ``SchedulerServer`` (its ``state``, ``comps``, ``retired``,
    ``_limbo``, ``sched`` and the rest)."""

    def _restore(self) -> list[tuple[str, int]]:
        """Runs in a thread at start: computations, jobs and zombie results from the
        state file.  Returns the nodes the scheduler used before."""
        comps, jobs, results, meta = self.state.load()
        for cid, (_updated, m) in comps.items():
            if m.get("retired"):
                self.retired[cid] = results.get(cid, {})
                continue
            comp = Comp.from_meta(self, cid, m)
            self.add_comp(comp)
            self._restored_cids.add(cid)
            for jid, segs, opts in jobs.get(cid, []):
                job = SJob(next(self.uids), comp, jid, segs, opts)
                comp.jobs[jid] = job
                self._limbo.append(job)
        nodes = [tuple(n) for n in meta.get("nodes", [])]
        self._known_nodes = set(nodes)
        if comps:
            logger.info(
                "restored %d computation(s) with %d job(s) and %d kept result(s); "
                "asking nodes %s for their jobs",
                len(comps), len(self._limbo), sum(len(r) for r in self.retired.values()),
                ", ".join(f"{h}:{p}" for h, p in nodes) or "(none known)",
            )  # fmt: skip
        return nodes

    def _end_restore(self) -> None:
        """Restored jobs no node runs are queued again; clients' RESUMEs get answered."""
        if self.restored.is_set():
            return
        limbo, self._limbo = self._limbo, []
        queued = 0
        for job in limbo:
            if job.status == jobstate.Created and job._node is None and not job.comp.closed:
                self.sched.submit(job)
                queued += 1
        logger.info("restart: %d job(s) on nodes again, %d queued again",
                    len(limbo) - queued, queued)  # fmt: skip
        self._waiting_links = set()
        self.restored.set()
        self.dispatch()

    async def save_comp(self, comp: Comp) -> None:
        self.state.save_comp(comp.cid, comp.meta())
        await asyncio.to_thread(self.state.flush)

    async def retire(self, comp: Comp) -> None:
        """Its client is gone for good (a zombie): close it on the nodes, keep its
        results (jobs still running end Terminated) for ``recover_jobs``."""
        why = (f"its client was gone for over {self.zombie_interval:.0f} s (zombie_interval): "
               "the computation was closed")  # fmt: skip
        results = dict(comp.owed)
        for jid in comp.jobs:
            if jid not in results:
                entry = {"c": comp.cid, "j": jid, "n": 1, "st": jobstate.Terminated, "x": why}
                results[jid] = (entry, [b"N."])
        for jid, (entry, segs) in results.items():
            self.state.put_result(comp.cid, jid, entry, segs)
        self.state.drop_jobs(comp.cid, list(comp.jobs))
        self.state.save_comp(comp.cid, {**comp.meta(), "retired": True, "spec": b"", "data": {}})
        await asyncio.to_thread(self.state.flush)
        self.retired[comp.cid] = results
        await self.close_comp(comp, terminate=True, forget=False)
        logger.warning("computation %s (%s): %s; %d result(s) kept for recover_jobs",
                       comp.name, comp.cid, why, len(results))  # fmt: skip

    def retired_acks(self, cid: str, jids: list) -> None:
        results = self.retired.get(cid, {})
        for jid in jids:
            results.pop(jid, None)
        self.state.drop_results(cid, jids)

    def forget_retired(self, cid: str) -> None:
        self.retired.pop(cid, None)
        self.state.drop_comp(cid)

    async def _reap(self) -> None:
        period = max(0.5, min(60.0, self.zombie_interval / 4))
        while True:
            await asyncio.sleep(period)  # housekeeping period
            now = time.monotonic()
            for comp in list(self.comps.values()):
                if comp.session is None and comp.detached_at is not None:
                    if now - comp.detached_at > self.zombie_interval and not comp.closed:
                        await self.retire(comp)
