"""dispynode's service hours (--service_start/--service_stop/--service_end), with
a fake clock: a real node server and its real job processes, in this process so
that the test sets the node's time of day; a real client connects to it.

At stop the node takes no new jobs and hands its queued ones back; running jobs
go on.  At end it also stops the running ones and hands them back.  Its clients
send it nothing meanwhile and run everything once it serves again: no job is
lost, each finishes once with its result."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading

import pytest

import dispy
from dispy.core import jobstate
from dispynode.server import NodeServer
from dispynode.service import ServiceHours

from . import jobs
from .test_recovery_netns import wait_until
from .test_shared import NODE_SECRET, Scheduler

SECRET = NODE_SECRET  # the node's: a dispyscheduler in front of it uses the same


class FakeClock:
    def __init__(self, hhmm: str) -> None:
        self.set(hhmm)

    def set(self, hhmm: str, day: int = 4) -> None:
        h, m = map(int, hhmm.split(":"))
        self.now = dt.datetime(2026, 12, day, h, m)

    def __call__(self) -> dt.datetime:
        return self.now


class InProcessNode:
    """A NodeServer on its own event loop thread, its clock the test's."""

    def __init__(self, tmp_path, clock: FakeClock, service: ServiceHours, cpus: int = 1) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="dispy-loop-test-node", daemon=True
        )
        self.thread.start()

        async def make():
            return NodeServer(
                ip_addrs=["127.0.0.61"], port=0, secret=SECRET, cpus=cpus,
                dest_path=str(tmp_path / "node"), service=service, clock=clock, discover=False,
            )  # fmt: skip

        self.node = self.call(make())
        self.call(self.node.start())
        host, port = self.node.bound[0][:2]
        self.address = f"{host}:{port}"

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def tick(self) -> None:
        """Let the node look at its clock now (it would within a minute anyway)."""

        async def tick():
            self.node.service_tick()

        self.call(tick())

    def stop(self) -> None:
        self.call(self.node.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def clock():
    return FakeClock("10:00")


@pytest.fixture
def node(tmp_path, clock):
    n = InProcessNode(tmp_path, clock, ServiceHours.from_options("9:00", "17:00", "18:00"))
    yield n
    n.stop()


def runs(folder, i) -> int:
    try:
        with open(os.path.join(folder, str(i))) as f:
            return len(f.read().split())
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("via", ["client", "dispyscheduler"])
def test_stop_hands_back_queued_jobs_and_end_stops_running_ones(node, clock, tmp_path, via):
    """Directly from a JobCluster, and through a dispyscheduler (which holds the
    jobs back for its clients)."""
    folder = str(tmp_path / "gates")
    os.mkdir(folder)

    def release(i):
        open(os.path.join(folder, f"open-{i}"), "w").close()

    sched = Scheduler([node], tmp_path) if via == "dispyscheduler" else None
    try:
        _day_of_service(node, clock, folder, release, sched)
    finally:
        if sched is not None:
            sched.stop()


def _day_of_service(node, clock, folder, release, sched):
    if sched is None:
        cluster = dispy.JobCluster(jobs.gated, nodes=[node.address], secret=SECRET)
    else:
        cluster = sched.cluster(jobs.gated)
    with cluster:
        j1 = cluster.submit(folder, 1)
        wait_until(lambda: runs(folder, 1) == 1, 30, "job 1 starts")
        j2 = cluster.submit(folder, 2)  # sent ahead to the node's queue, behind job 1
        wait_until(lambda: node.node.queue, 30, "job 2 queued on the node")

        clock.set("17:30")  # stop: no new jobs; job 1 goes on, job 2 comes back
        node.tick()
        assert node.node.paused and "--service_stop" in node.node.paused
        wait_until(lambda: not node.node.queue, 10, "the queued job handed back")
        release(1)
        assert j1() == 10 and j1.status == dispy.DispyJob.Finished
        j3 = cluster.submit(folder, 3)  # the client holds it: the node takes no jobs now
        if sched is None:  # (through a scheduler, the client reckons with its CPUs)
            assert j2.status == j3.status == jobstate.Created
        assert runs(folder, 2) == runs(folder, 3) == 0
        assert node.node.jobs_done == 1
        assert node.node.jobs_handed_back == 1  # job 2, once: nothing was sent again

        clock.set("9:30", day=5)  # serving again: jobs 2 and 3 run there
        node.tick()
        wait_until(lambda: runs(folder, 2) == 1, 30, "job 2 starts when the node serves again")

        clock.set("18:30", day=5)  # end: job 2, running, is stopped and handed back
        node.tick()
        assert "--service_end" in node.node.paused
        wait_until(
            lambda: node.node.running == 0 and (sched or j2.status == jobstate.Created),
            30,
            "the running job stopped and handed back",
        )
        release(2)
        release(3)
        assert runs(folder, 3) == 0
        assert node.node.jobs_handed_back == 3  # and job 2 running, job 3 queued behind it

        clock.set("9:00", day=6)
        node.tick()
        assert j2() == 20 and j3() == 30
        assert (runs(folder, 1), runs(folder, 2), runs(folder, 3)) == (1, 2, 1)
        assert all(j.status == dispy.DispyJob.Finished for j in (j1, j2, j3))


def test_a_node_outside_its_hours_is_not_found_and_serves_later(tmp_path, clock):
    """Outside its hours a node answers no discovery; a client that names it still
    connects and sets up, and its jobs wait until the hours start."""
    clock.set("20:00")
    n = InProcessNode(tmp_path, clock, ServiceHours.from_options("9:00", None, "18:00"))
    try:
        assert n.node.paused
        with dispy.JobCluster(jobs.double, nodes=[n.address], secret=SECRET) as cluster:
            job = cluster.submit(21)
            wait_until(lambda: cluster.status().nodes, 30, "the client connects")
            assert job.status == jobstate.Created  # the node said so before it was ready
            clock.set("9:00", day=5)
            n.tick()
            assert job() == 42
    finally:
        n.stop()
