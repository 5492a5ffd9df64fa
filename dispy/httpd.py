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
"""

from __future__ import annotations

import collections
import hmac
import html
import http.server
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
import urllib.parse

from ._job import DispyNode
from .core import jobstate

logger = logging.getLogger("dispy")

#: Folder of the page's files (package data: index.html, monitor.js, monitor.css).
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "httpd_static")
#: Throughput samples kept (one per ``poll_interval``).
HISTORY = 300
#: Longest exception text returned per failed job.
MAX_EXCEPTION = 2000
#: Longest ``job.id`` text returned.
MAX_ID = 200
#: Largest POST body read.
MAX_BODY = 16 << 10
#: Seconds a client connection may stay silent before it is dropped.
CLIENT_TIMEOUT = 30
#: Most connections (each a thread) at once; a new one beyond closes the oldest.
MAX_CONNECTIONS = 32
#: Seconds a POST /api/node "close" waits for the node's close before answering.
CLOSE_WAIT = 2.0

_TOKEN_RE = re.compile(r"[A-Za-z0-9_.~-]{16,256}")
_CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static_files() -> frozenset[str]:
    """The allow-list: the files in httpd_static/ (index.html is served at '/' only)."""
    try:
        names = os.listdir(STATIC_DIR)
    except OSError:
        return frozenset()
    return frozenset(
        n
        for n in names
        if n != "index.html"
        and os.path.splitext(n)[1] in _CONTENT_TYPES
        and os.path.isfile(os.path.join(STATIC_DIR, n))
    )


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


def _split(target: str) -> urllib.parse.SplitResult:
    """A request's target as a URL; one ``urlsplit`` refuses (``GET \\0//a]``: "Invalid
    IPv6 URL") is taken as a path that matches nothing (an answer of 401 or 404)."""
    try:
        return urllib.parse.urlsplit(target)
    except ValueError:
        return urllib.parse.SplitResult("", "", "/?", "", "")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer whose request threads are joined on close, and whose
    open client connections are shut down then (an idle keep-alive or a
    speculative browser connection must not hold ``shutdown()`` up)."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: a burst of connections is not stalled

    def __init__(self, address, handler, monitor: DispyHTTPServer) -> None:
        self.monitor = monitor
        #: open connections, oldest first (each has a thread)
        self._conns: dict[socket.socket, None] = {}
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        with self._conns_lock:
            while len(self._conns) >= MAX_CONNECTIONS:
                # idle or slow connections cannot pile up threads: the oldest goes
                # (its thread's read ends), so a real request always gets in
                oldest = next(iter(self._conns))
                del self._conns[oldest]
                try:
                    oldest.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._conns[request] = None
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._conns_lock:
            self._conns.pop(request, None)
            super().shutdown_request(request)

    def server_close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        super().server_close()  # closes the listening socket, joins request threads


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "dispy-monitor"
    sys_version = ""
    timeout = CLIENT_TIMEOUT

    # -- plumbing ------------------------------------------------------------------
    def log_message(self, format, *args) -> None:
        # never the query string: it can hold the token
        logger.debug("monitor %s: %s", self.client_address[0], format % args)

    def log_request(self, code="-", size="-") -> None:
        # (a request the standard library refused has no path yet)
        path = _split(getattr(self, "path", "")).path
        logger.debug("monitor %s: %s %s %s", self.client_address[0], self.command, path, code)

    def _send(self, code: int, body: bytes, ctype: str, headers=()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _SECURITY_HEADERS.items():
            self.send_header(name, value)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, code: int, msg: str, headers=()) -> None:
        self._send(code, (msg + "\n").encode(), "text/plain; charset=utf-8", headers)

    def _json(self, code: int, obj) -> None:
        body = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
        self._send(code, body, "application/json")

    # -- access control ----------------------------------------------------------------
    def _matches(self, value: str | None) -> bool:
        if not value:
            return False
        token = self.server.monitor.token
        return hmac.compare_digest(value.encode("utf-8", "replace"), token.encode())

    def _bearer(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def _cookie(self) -> str | None:
        name = self.server.monitor.cookie_name
        for header in self.headers.get_all("Cookie") or ():
            for part in header.split(";"):
                key, sep, value = part.strip().partition("=")
                if sep and key == name:
                    return value
        return None

    def _unauthorized(self) -> None:
        self._text(
            401,
            "401 unauthorized: open the monitor's URL with ?token=... (logged when it started)",
            [("WWW-Authenticate", 'Bearer realm="dispy"')],
        )

    # -- GET ------------------------------------------------------------------------
    def do_GET(self) -> None:
        url = _split(self.path)
        path = url.path
        if path == "/":
            query = urllib.parse.parse_qs(url.query)
            if "token" in query:
                # the first visit: trade the token in the URL for a cookie, and drop it
                # from the address bar (and so from history and screen shares)
                if not self._matches(query["token"][-1]):
                    self._unauthorized()
                    return
                cookie = (
                    f"{self.server.monitor.cookie_name}={self.server.monitor.token}; "
                    "Path=/; HttpOnly; SameSite=Strict"
                )
                self._text(303, "see /", [("Location", "/"), ("Set-Cookie", cookie)])
                return
        if not (self._matches(self._cookie()) or self._matches(self._bearer())):
            self._unauthorized()
            return
        if path == "/":
            self._index()
        elif path.startswith("/static/"):
            self._static(path[len("/static/") :])
        elif path == "/api/status":
            try:
                snap = self.server.monitor.snapshot()
            except Exception as exc:  # closing, or its event loop too busy to answer
                logger.debug("monitor: status failed", exc_info=True)
                self._json(503, {"ok": False, "error": f"status not available now: {exc}"})
                return
            self._json(200, snap)
        else:
            self._text(404, "404 not found")

    def _index(self) -> None:
        try:
            with open(os.path.join(STATIC_DIR, "index.html"), encoding="utf-8") as f:
                page = f.read()
        except OSError:
            self._text(500, "500: the monitor's page (dispy/httpd_static/index.html) is missing")
            return
        monitor = self.server.monitor
        page = page.replace("__DISPY_TOKEN__", html.escape(monitor.token, quote=True))
        page = page.replace("__DISPY_POLL_MS__", str(int(monitor.poll_interval * 1000)))
        self._send(200, page.encode(), "text/html; charset=utf-8")

    def _static(self, raw: str) -> None:
        name = urllib.parse.unquote(raw)
        if "/" in name or "\\" in name or ".." in name or name not in self.server.monitor.static:
            self._text(404, "404 not found")
            return
        try:
            with open(os.path.join(STATIC_DIR, name), "rb") as f:
                body = f.read()
        except OSError:
            self._text(404, "404 not found")
            return
        self._send(200, body, _CONTENT_TYPES[os.path.splitext(name)[1]])

    # -- POST ------------------------------------------------------------------------
    def do_POST(self) -> None:
        bearer = self._matches(self._bearer())
        if not (bearer or self._matches(self._cookie())):
            self._unauthorized()
            return
        if not (bearer or self._matches(self.headers.get("X-Dispy-Token"))):
            self._text(403, "403 forbidden: a POST needs the X-Dispy-Token header")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._text(411, "411: Content-Length required")
            return
        if not 0 <= length <= MAX_BODY:
            self._text(413, "413: request body too large")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            self._json(400, {"ok": False, "error": "the body must be a JSON object"})
            return
        path = _split(self.path).path
        monitor = self.server.monitor
        if path == "/api/cancel":
            uid = body.get("uid")
            if isinstance(uid, bool) or not isinstance(uid, int):
                self._json(400, {"ok": False, "error": '"uid" must be an integer'})
                return
            code, reply = monitor.cancel(uid)
        elif path == "/api/node":
            node, action = body.get("node"), body.get("action")
            if not isinstance(node, str) or action not in ("deallocate", "close"):
                self._json(
                    400,
                    {"ok": False, "error": '"node": "ip:port", "action": "deallocate" or "close"'},
                )
                return
            code, reply = monitor.node_action(node, action)
        else:
            self._text(404, "404 not found")
            return
        self._json(code, reply)


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
