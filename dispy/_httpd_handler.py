"""The web monitor's HTTP side: the request handler and the server it runs in.

``_Handler`` checks every request's token (URL, cookie, bearer header; a POST
also needs the header), serves the page and its static files, and parses the
JSON API's requests; what a request does with the cluster is the monitor's
(``dispy.httpd.DispyHTTPServer``, reached as ``server.monitor``: ``snapshot``,
``cancel``, ``node_action``).  ``_Server`` bounds the connections (each a
thread) and closes them on shutdown.  ``dispy.httpd`` imports this module;
this one never imports it back (but for type checking), so there is no cycle.
"""

from __future__ import annotations

import hmac
import html
import http.server
import json
import logging
import os
import socket
import threading
import urllib.parse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .httpd import DispyHTTPServer

logger = logging.getLogger("dispy")

#: Folder of the page's files (package data: index.html, monitor.js, monitor.css).
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "httpd_static")
#: Largest POST body read.
MAX_BODY = 16 << 10
#: Seconds a client connection may stay silent before it is dropped.
CLIENT_TIMEOUT = 30
#: Most connections (each a thread) at once; a new one beyond closes the oldest.
MAX_CONNECTIONS = 32

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


def _split(target: str) -> urllib.parse.SplitResult:
    """A request's target as a URL; one ``urlsplit`` refuses (``GET \\0//a]``: "Invalid
    IPv6 URL") is taken as a path that matches nothing (an answer of 401 or 404)."""
    try:
        return urllib.parse.urlsplit(target)
    except ValueError:
        return urllib.parse.SplitResult("", "", "/?", "", "")


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
