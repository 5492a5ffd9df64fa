"""A web monitor for a ``JobCluster``: nodes, running jobs, failures, throughput.

    import dispy
    cluster = dispy.JobCluster(compute, nodes=[...])
    monitor = dispy.DispyHTTPServer(cluster)      # logs its URL (with the token)
    ...
    monitor.shutdown()

The server is ``http.server.ThreadingHTTPServer`` in its own daemon thread,
never on dispy's event loop: the cluster methods it calls (``node_jobs``,
``cancel``, ``close_node``...) wait for that loop, and would deadlock on it.
A second thread samples ``cluster.counts()`` for the throughput chart.

Access control: it listens on 127.0.0.1 unless told otherwise, and every
request must carry the token (random unless given): as ``?token=`` on the
first page load (which sets an HttpOnly, SameSite=Strict cookie and
redirects to ``/``), the cookie, or ``Authorization: Bearer TOKEN``.  A POST
(cancel a job, deallocate or close a node) also needs the token in the
``X-Dispy-Token`` header (or ``Authorization: Bearer``), which another site's
page cannot send: a cookie alone never changes anything.

This module is what the monitor does with a cluster (``DispyHTTPServer``); the
HTTP side (request handler, access checks, static files, the threading server)
is in ``dispy._httpd_handler``.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import re
import secrets
import threading
import time
import urllib.parse

from ._httpd_handler import (
    MAX_CONNECTIONS,  # noqa: F401  (its home before; tests/test_httpd.py reads it here)
    _Handler,
    _Server,
    _Server6,
    _static_files,
)
from ._job import DispyNode
from .core import jobstate

logger = logging.getLogger("dispy")

#: Throughput samples kept (one per ``poll_interval``).
HISTORY = 300
#: Longest exception text returned per failed job.
MAX_EXCEPTION = 2000
#: Longest ``job.id`` text returned.
MAX_ID = 200
#: Seconds a POST /api/node "close" waits for the node's close before answering.
CLOSE_WAIT = 2.0

_TOKEN_RE = re.compile(r"[A-Za-z0-9_.~-]{16,256}")


def _num(x):
    """A finite number for JSON (NaN and infinities are not JSON), else None."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return x if isinstance(x, int) or math.isfinite(x) else None


def _id_text(job_id):
    """``job.id`` as JSON: None, or a string (repr of anything not a string)."""
    if job_id is None:
        return None
    if isinstance(job_id, str):
        text = job_id
    else:
        try:
            text = repr(job_id)
        except Exception:
            text = f"<{type(job_id).__name__}>"
    return text if len(text) <= MAX_ID else text[: MAX_ID - 3] + "..."


def _status_name(status) -> str:
    return jobstate.NAMES.get(status, str(status))


def _job_info(job) -> dict:
    return {
        "uid": job._uid,
        "id": _id_text(job.id),
        "status": _status_name(job.status),
        "start_time": _num(job.start_time),
    }


def _node_address(node: DispyNode) -> str:
    return f"{node.ip_addr}:{node.port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class DispyHTTPServer:
    """Serve a web page that monitors (and controls) ``cluster``.

    ``host``/``port``: where to listen (127.0.0.1 by default; ``port=0`` picks a
    free port, see ``.port``).  ``token``: what every request must present; a
    random one unless given (``.token``), logged with the URL at start.
    ``.url`` is the address to open (the token in its query).
    ``poll_interval``: seconds between the page's refreshes and between
    throughput samples.  ``shutdown()`` (or leaving a ``with`` block) stops it.
    """

    def __init__(
        self,
        cluster,
        host: str = "127.0.0.1",
        port: int = 8181,
        token: str | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        if token is None:
            token = secrets.token_urlsafe(24)
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            raise ValueError(
                "token must be 16-256 characters of A-Z a-z 0-9 _ . ~ - "
                "(or leave it out for a random one)"
            )
        if not isinstance(poll_interval, int | float) or not poll_interval > 0:
            raise ValueError("poll_interval must be a positive number of seconds")
        self.cluster = cluster
        self.token = token
        self.poll_interval = float(poll_interval)
        self.static = _static_files()
        self._history: collections.deque = collections.deque(maxlen=HISTORY + 1)
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._closed = False
        server_class = _Server6 if ":" in host else _Server
        self._httpd = server_class((host, port), _Handler, self)
        self.host = host
        self.port = self._httpd.server_address[1]
        #: a cookie per port: two monitors on one host must not overwrite each other's
        self.cookie_name = f"dispy_token_{self.port}"
        url_host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        if ":" in url_host:
            url_host = f"[{url_host}]"
        self.url = f"http://{url_host}:{self.port}/?token={urllib.parse.quote(token)}"
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.5},
            name=f"dispy-httpd-{self.port}",
            daemon=True,
        )
        self._sample_thread = threading.Thread(
            target=self._sample, name=f"dispy-httpd-sampler-{self.port}", daemon=True
        )
        self._serve_thread.start()
        self._sample_thread.start()
        if not _is_loopback(url_host.strip("[]")) or host in ("", "0.0.0.0", "::"):
            logger.warning(
                "dispy monitor listens on %s beyond this machine, over plain HTTP: "
                "the token can be seen on the network",
                host or "all addresses",
            )
        logger.warning("dispy monitor for cluster %s: %s", cluster.name, self.url)

    # -- the sampler thread ------------------------------------------------------------
    def _sample(self) -> None:
        while True:
            try:
                ended = self.cluster.counts()["ended"]
            except Exception:
                logger.debug("monitor: counts() failed", exc_info=True)
            else:
                self._history.append((time.time(), ended))
            if self._stop.wait(self.poll_interval):
                return

    def history(self) -> list:
        """[[time, jobs ended per second], ...], oldest first."""
        samples = list(self._history)
        return [
            [t1, round((e1 - e0) / (t1 - t0), 3) if t1 > t0 else 0.0]
            for (t0, e0), (t1, e1) in zip(samples, samples[1:], strict=False)
        ]

    # -- what the API does -------------------------------------------------------------
    def snapshot(self) -> dict:
        """What GET /api/status returns."""
        cluster = self.cluster
        nodes = []
        for node in cluster.status()[0]:
            info = node.avail_info
            nodes.append(
                {
                    "node": _node_address(node),
                    "name": node.name,
                    "ip_addr": node.ip_addr,
                    "port": node.port,
                    "cpus": node.cpus,
                    "busy": node.busy,
                    "jobs_done": node.jobs_done,
                    "cpu_time": _num(node.cpu_time),
                    "update_time": _num(node.update_time),
                    "avail_info": None
                    if info is None
                    else {
                        "cpu": _num(info.cpu),
                        "memory": _num(info.memory),
                        "disk": _num(info.disk),
                        "swap": _num(info.swap),
                    },
                    "jobs": [_job_info(job) for job in cluster.node_jobs(node)],
                }
            )
        failures = cluster._on_loop(lambda: list(cluster.recent_failures))
        return {
            "name": cluster.name,
            "time": time.time(),
            "poll_interval": self.poll_interval,
            "counts": cluster.counts(),
            "nodes": nodes,
            # newest first
            "failures": [
                {
                    "uid": job._uid,
                    "id": _id_text(job.id),
                    "status": _status_name(job.status),
                    "end_time": _num(job.end_time),
                    "ip_addr": job.ip_addr,
                    "exception": None
                    if job.exception is None
                    else str(job.exception)[:MAX_EXCEPTION],
                }
                for job in reversed(failures)
            ],
            "history": self.history(),
        }

    def _find_job(self, uid: int):
        cluster = self.cluster
        job = cluster._live_job(uid)
        if job is not None:
            return job
        for node in cluster.status()[0]:
            for job in cluster.node_jobs(node):
                if job._uid == uid:
                    return job
        return None

    def cancel(self, uid: int) -> tuple[int, dict]:
        job = self._find_job(uid)
        if job is None or self.cluster.cancel(job) != 0:
            return 404, {"ok": False, "error": f"no running or pending job with uid {uid}"}
        logger.info("monitor: cancelling job %s (uid %s)", _id_text(job.id), uid)
        return 200, {"ok": True}

    def _find_node(self, address: str):
        for node in self.cluster.status()[0]:
            if address in (_node_address(node), node.name):
                return node
        return None

    def node_action(self, address: str, action: str) -> tuple[int, dict]:
        node = self._find_node(address)
        if node is None:
            return 404, {"ok": False, "error": f"no node {address!r} in this cluster"}
        logger.info("monitor: %s node %s", action, address)
        if action == "deallocate":
            return 200, {"ok": self.cluster.deallocate_node(node) == 0}
        # close_node waits for the node's running jobs: answer after CLOSE_WAIT at most
        result: list[int] = []
        worker = threading.Thread(
            target=lambda: result.append(self.cluster.close_node(node)),
            name=f"dispy-httpd-close-{address}",
            daemon=True,
        )
        self._workers = [t for t in self._workers if t.is_alive()]
        self._workers.append(worker)
        worker.start()
        worker.join(CLOSE_WAIT)
        if result:
            return 200, {"ok": result[0] == 0}
        return 200, {"ok": True, "pending": True}

    # -- lifetime ----------------------------------------------------------------------
    def shutdown(self, wait: bool = True) -> None:
        """Stop serving and close the socket (idempotent).  Node closes asked for
        through the page go on (``wait``: dispy's argument, accepted)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._serve_thread.join()
        self._sample_thread.join()

    def __enter__(self) -> DispyHTTPServer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<DispyHTTPServer {self.host}:{self.port} cluster={self.cluster.name}>"
