"""``dispyscheduler --httpd``: dispy's web monitor over the shared scheduler (its
nodes, every client computation's jobs, counts, failures), its access control,
and its shutdown with the scheduler.

Everything listens on 127.0.0.1; the scheduler is given its nodes (-n), never
broadcasts, and is stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

import dispy
from dispy import DispyJob

from . import jobs
from .installed import program

NODE_SECRET = "monitor-node-secret"
CLUSTER_SECRET = "monitor-cluster-secret"
URL_RE = re.compile(r"dispy monitor for cluster \S+: (http://127\.0\.0\.1:(\d+)/\?token=(\S+))")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


# no proxies (an http_proxy in the environment must not see these requests), no redirects
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def fetch(url, method="GET", body=None, headers=None, timeout=30):
    """(status, body bytes); 4xx/5xx are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


class Scheduler:
    """``dispyscheduler --httpd`` on 127.0.0.1 (free ports) in front of ``nodes``."""

    def __init__(self, nodes, tmp_path, *args):
        env = dict(os.environ, DISPY_SECRET=NODE_SECRET)
        self.proc = subprocess.Popen(
            [*program("dispyscheduler"), "--daemon", "-i", "127.0.0.1", "-p", "0",
             "--cluster_secret", CLUSTER_SECRET, "--dest_path", str(tmp_path / "sched"),
             *[a for n in nodes for a in ("-n", n.address)], *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.log: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.ready_line = self.proc.stdout.readline()

    def _read_log(self):
        for line in self.proc.stderr:
            with self._cond:
                self.log.append(line)
                self._cond.notify_all()
        with self._cond:
            self.log.append(None)  # the end
            self._cond.notify_all()

    def wait_log(self, predicate, timeout=30):
        """The log once ``predicate(lines)`` holds (False: timed out, or the log ended)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: predicate([ln for ln in self.log if ln]) or None in self.log, timeout
            )
            return ok and predicate([ln for ln in self.log if ln])

    def text(self) -> str:
        with self._cond:
            return "".join(ln for ln in self.log if ln)

    def stop(self):
        """terminate, by PID, then wait; its exit status."""
        if self.proc.returncode is None:
            self.proc.terminate()
            self.proc.wait(30)
        self._reader.join(10)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture
def scheduler_factory(tmp_path):
    started = []

    def make(nodes, *args):
        s = Scheduler(nodes, tmp_path, *args)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def test_monitor_shows_the_schedulers_nodes_jobs_and_counts(node_factory, scheduler_factory):
    nodes = [node_factory(cpus=1, secret=NODE_SECRET) for _ in range(2)]
    sched = scheduler_factory(nodes, "--httpd", "--httpd_port", "0")
    assert sched.ready_line.startswith("dispyscheduler ready"), sched.text()
    port = int(sched.ready_line.split("addr=")[1].split()[0].rsplit(":", 1)[1])
    assert sched.wait_log(lambda log: any(URL_RE.search(ln) for ln in log)), sched.text()
    url, httpd_port, token = next(m for ln in sched.log if ln and (m := URL_RE.search(ln))).groups()
    assert sched.wait_log(lambda log: sum("ready with" in ln for ln in log) >= 2), sched.text()
    base = f"http://127.0.0.1:{httpd_port}"
    auth = {"Authorization": f"Bearer {token}"}

    def status():
        code, body = fetch(base + "/api/status", headers=auth)
        assert code == 200, body
        return json.loads(body)

    def until(predicate, what, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            s = status()
            if predicate(s):
                return s
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {s}"
            time.sleep(0.05)  # the poll period

    # access control: the token is required
    assert fetch(base + "/api/status")[0] == 401
    assert fetch(base + "/api/status", headers={"Authorization": "Bearer " + "x" * 32})[0] == 401
    assert fetch(url)[0] == 303  # ?token= on the page: a cookie, and a redirect to /
    code, page = fetch(base + "/", headers=auth)
    assert code == 200 and b"__DISPY_TOKEN__" not in page

    s = status()
    assert s["name"].startswith("dispyscheduler@")
    assert sorted(n["node"] for n in s["nodes"]) == sorted(n.address for n in nodes)
    assert all(n["cpus"] == 1 and n["busy"] == 0 and n["jobs"] == [] for n in s["nodes"])
    assert s["counts"]["submitted"] == 0 and s["counts"]["pending"] == 0

    cluster = dispy.SharedJobCluster(
        jobs.sleep_for,
        scheduler_node="127.0.0.1",
        scheduler_port=port,
        secret=CLUSTER_SECRET,
        recover_file=False,
    )
    try:
        sleepers = [cluster.submit(1.0) for _ in range(4)]
        failing = cluster.submit("not a number")  # time.sleep("...") raises TypeError
        long = cluster.submit(120)

        def running_ids(s):
            return {j["id"]: j for n in s["nodes"] for j in n["jobs"]}

        s = until(lambda s: s["counts"]["submitted"] == 6
                  and any(j["status"] == "Running" for j in running_ids(s).values()),
                  "the jobs, one running")  # fmt: skip
        ids = running_ids(s)
        assert all(re.fullmatch(r"sleep_for:\d+", i) for i in ids), ids
        assert s["counts"]["submitted"] == 6 and s["counts"]["running"] >= 1
        assert s["counts"]["pending"] == 6 - s["counts"]["ended"]
        assert sum(n["busy"] for n in s["nodes"]) == s["counts"]["running"]

        # the failure is listed with its exception
        s = until(lambda s: s["failures"], "the failed job")
        (failure,) = s["failures"]
        assert failure["id"] == f"sleep_for:{failing._uid}" and failure["status"] == "Terminated"
        assert "TypeError" in failure["exception"]
        assert failure["ip_addr"] in {n.ip_addr for n in nodes}  # the node that ran it
        assert s["counts"]["failed"] == 1

        # cancel the long job from the page, as its client would
        long_id = f"sleep_for:{long._uid}"
        s = until(lambda s: long_id in running_ids(s), "the long job on a node")
        uid = running_ids(s)[long_id]["uid"]
        post = dict(auth, **{"X-Dispy-Token": token})
        code, body = fetch(base + "/api/cancel", "POST", {"uid": uid}, post)
        assert code == 200 and json.loads(body)["ok"], body
        long(timeout=60)
        assert long.status == DispyJob.Cancelled, long.status

        # node actions are not the monitor's to take on shared nodes
        code, body = fetch(base + "/api/node", "POST", {"node": nodes[0].address,
                                                        "action": "close"}, post)  # fmt: skip
        assert code == 501 and "not supported" in json.loads(body)["error"]

        assert [j() for j in sleepers] == [1.0] * 4
        failing(timeout=60)
        assert failing.status == DispyJob.Terminated, failing.status
        s = until(lambda s: s["counts"]["pending"] == 0, "every job ended")
        assert s["counts"]["submitted"] == 6 and s["counts"]["ended"] == 6
        assert s["counts"]["failed"] == 2  # the failure and the cancelled job, as dispy counts
        assert sum(n["jobs_done"] for n in s["nodes"]) == 6  # each ran on a node
        assert all(n["busy"] == 0 for n in s["nodes"])
        s = until(lambda s: any(rate > 0 for _, rate in s["history"]), "throughput samples")
    finally:
        cluster.close()

    # the monitor stops with the scheduler
    assert sched.stop() == 0, sched.text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(httpd_port)), timeout=5).close()


def test_monitor_port_taken(scheduler_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sched = scheduler_factory([], "-n", "127.0.0.1:1", "--httpd", "--httpd_port",
                                  str(taken.getsockname()[1]))  # fmt: skip
        assert sched.proc.wait(30) == 2
        assert sched.ready_line == ""
        assert sched.wait_log(lambda log: any("cannot serve the monitor" in ln for ln in log))
