"""dispyscheduler's durable state file and the core's ``adopt`` (no daemons)."""

from __future__ import annotations

import contextlib
import os
import stat
import time

import pytest

from dispy.core import jobstate
from dispy.core.queues import ClusterQueue
from dispy.core.scheduler import Scheduler
from dispyscheduler.state import SchedulerState, StateError


def test_state_survives_reopen_and_forgets_acknowledged_jobs(tmp_path):
    path = str(tmp_path / "scheduler.db")
    st = SchedulerState(path)
    st.save_comp("c1", {"name": "comp", "spec": b"\x00spec", "x": False})
    st.put_jobs("c1", [(1, [b"a", b"b"], None), (2, [b"c"], {"t": 5}), (3, [b"d"], None)])
    st.flush()
    assert st.drop_jobs("c1", [1]) == [1]  # written already: deleted by a queued write
    st.put_jobs("c1", [(4, [b"e"], None)])
    assert st.drop_jobs("c1", [4]) == []  # still queued: never written
    st.put_result("c2", 7, {"st": jobstate.Finished}, [b"r"])
    st.set_meta("nodes", [["10.0.0.2", 51348]])
    st.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    st = SchedulerState(path)
    comps, jobs, results, meta = st.load()
    assert comps["c1"][1] == {"name": "comp", "spec": b"\x00spec", "x": False}
    assert jobs["c1"] == [(2, [b"c"], {"t": 5}), (3, [b"d"], None)]
    assert results == {"c2": {7: ({"st": jobstate.Finished}, [b"r"])}}
    assert meta == {"nodes": [["10.0.0.2", 51348]]}
    st.drop_comp("c1")
    st.drop_results("c2", [7])
    st.flush()
    comps, jobs, results, _ = st.load()
    assert comps == {} and jobs == {} and results == {}
    st.close()


def test_expired_computations_are_dropped_at_load(tmp_path):
    st = SchedulerState(str(tmp_path / "s.db"), retention=0.05)
    st.save_comp("old", {"name": "old"})
    st.put_jobs("old", [(1, [b"x"], None)])
    st.flush()
    deadline = time.monotonic() + 5
    while time.time() - 0.05 <= _saved_at(st, "old") and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the clock past the retention, with a deadline
    comps, jobs, _, _ = st.load()
    assert comps == {} and jobs == {}
    st.close()


def _saved_at(st: SchedulerState, cid: str) -> float:
    st.flush()
    import sqlite3

    with contextlib.closing(sqlite3.connect(st.path)) as conn, conn:
        return conn.execute("SELECT updated FROM comps WHERE cid = ?", (cid,)).fetchone()[0]


def test_a_foreign_file_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "scheduler.db"
    path.write_bytes(b"not a database at all" * 10)
    with pytest.raises(StateError, match="--clean"):
        SchedulerState(str(path))


class J:
    def __init__(self, uid, cluster="c"):
        self._uid, self._pinned, self._node, self.status = uid, None, None, jobstate.Created
        self._cluster, self._seq, self._reentrant = cluster, None, False


def test_adopt_marks_queued_or_held_jobs_running_on_the_reporting_node():
    q = ClusterQueue("first")
    q.add_cluster("c")
    s = Scheduler(queue=q, eligible=lambda node, cluster: True)
    s.add_node("a", 1)
    queued, held = J(1), J(2)
    s.submit(queued)  # requeued after its node was lost, say
    assert s.adopt(queued, "a") and s.adopt(held, "a")  # held: restored, never queued
    assert queued.status == held.status == jobstate.Running
    assert len(q) == 0 and set(s.nodes["a"].running) == {1, 2}
    assert not s.adopt(queued, "a")  # running already: nothing changes
    assert not s.adopt(J(3), "unknown-node")
    assert s.ended(held, jobstate.FINISH) and set(s.nodes["a"].running) == {1}


def test_a_node_of_tiny_jobs_is_sent_more_ahead_and_of_long_ones_less():
    s = Scheduler()
    s.add_node("a", 2)
    for uid in range(60):
        s.submit(J(uid))
    ((node, batch),) = s.assign()
    assert len(batch) == 4  # 2 per CPU before any job time is known
    for job in batch:
        assert s.ended(job, jobstate.FINISH)
        s.observe("a", 0.00005)  # 50 us jobs: a round trip to the client is longer
    assert len(s.assign()[0][1]) == 32 and len(node.running) == 32  # 16 per CPU at most
    for job in list(node.running.values()):
        assert s.ended(job, jobstate.FINISH)
        s.observe("a", 0.5)  # long jobs now: no more ahead than before
    for _ in range(60):
        s.observe("a", 0.5)
    assert node.capacity == 4 and len(s.assign()[0][1]) == 4
    s.set_cpus("a", 2, limited=True)  # a limit is a limit, however short the jobs
    for _ in range(60):
        s.observe("a", 0.00005)
    assert node.capacity == 2
    shared = Scheduler(prefetch=8)  # a prefetch given is the least
    shared.add_node("b", 2)
    shared.observe("b", 0.5)
    assert shared.nodes["b"].capacity == 16
    s.observe("gone", 0.1)  # a node no longer known: nothing happens


def test_a_node_lost_before_it_confirmed_a_cancel_loses_only_its_open_jobs():
    s = Scheduler()
    s.add_node("a", 2, reports=True)
    for uid in range(3):
        s.submit(J(uid))
    ((_, batch),) = s.assign()
    running, waiting, other = batch
    assert [j.status for j in batch] == [jobstate.Created] * 3  # until the node says
    s.started("a", running._uid)
    assert running.status == jobstate.Running and waiting.status == jobstate.Created
    assert s.cancel_sent(waiting)  # Cancelled now; its place is kept until the node says
    lost = dict((j._uid, st) for j, st in s.remove_node("a"))
    assert lost == {running._uid: jobstate.Abandoned, other._uid: jobstate.Abandoned}
    assert waiting.status == jobstate.Cancelled
