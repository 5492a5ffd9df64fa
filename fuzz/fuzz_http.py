"""Atheris target: HTTP requests into the web monitor (``dispy.httpd``).

The input is what a browser would send on one connection (request line,
headers, body; layout in ``_common.py``).  It is read by a ``_Handler``
(``dispy.httpd``'s ``BaseHTTPRequestHandler``) through an in-memory
``rfile``, its answers written to an in-memory ``wfile``: the handler is
made without ``BaseRequestHandler.__init__`` (no socket), its ``server`` is
a ``_Server`` made without its ``__init__`` (which would listen) holding
the monitor.  The monitor is a real ``DispyHTTPServer`` made without its
``__init__`` (which listens and starts two threads): the attributes that
``__init__`` sets are set here (token ``_common.HTTP_TOKEN``, port 8181, so
the cookie is ``dispy_token_8181``; a throughput history).  Only the
cluster it monitors is a stand-in (``StandInCluster``): three nodes, jobs
running and pending, recent failures, with the odd values a real cluster
may hold (NaN times, ids whose ``repr`` fails, long texts).
``handle_one_request`` runs until the handler closes the connection (at
most 4 requests).

The status of each answer is read from the record ``_Handler.log_request``
logs for it (``dispy`` logger, debug level), and checked against the status
line written to ``wfile``.

A crash is:

* an exception escaping ``handle_one_request``;
* a 5xx answer, except the standard library's own 501 (a method the
  handler does not implement) and 505 (HTTP/2 and later) for requests it
  refuses before the handler sees them;
* an answer to a request that does not carry the token (in its request
  line or headers, as it is or percent-decoded) other than 401, 403, 404 or
  the standard library's refusal of a malformed request (an auth bypass:
  any 200, 303, 400... for such a request);
* a 200 to a POST whose token is only in its cookie (a cookie alone must
  change nothing: CSRF);
* a malformed answer: a status line that differs from the logged status, a
  ``Content-Length`` other than the body's length, a JSON body that is not
  strict JSON, two answers to one request;
* a file written anywhere, any network use, any process started (an audit
  hook refuses them).

Findings already reported (``KNOWN``, README.md) are handled as the HTTP
server handles an exception of its handler (the connection is dropped)
unless ``DISPY_FUZZ_KNOWN=crash``.

Run through ``run.py``; alone:
``python fuzz/fuzz_http.py [libFuzzer flags] [corpus dir or crash file]``.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import re
import sys
import threading
import time
import urllib.parse

import atheris

with atheris.instrument_imports(include=["dispy", "http"]):
    import _common as C
    import _harness as H

    from dispy import httpd
    from dispy._job import ClusterStatus, DispyJob, DispyNode, DispyNodeAvailInfo
    from dispy.core import jobstate

MAX_REQUESTS = 4
TOKEN = C.HTTP_TOKEN
assert httpd._TOKEN_RE.fullmatch(TOKEN)


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class StandInCluster:
    """What ``DispyHTTPServer`` reads of a ``JobCluster`` (which needs an event loop,
    nodes and threads): ``name``, ``status()``, ``node_jobs()``, ``counts()``,
    ``_on_loop()``, ``recent_failures``, ``_live_job()``, ``cancel()``,
    ``deallocate_node()``, ``close_node()``.  Nothing changes when it is asked to
    cancel or close: every input sees the same cluster."""

    name = "fuzz-cluster"

    def __init__(self) -> None:
        now = time.time()
        a = DispyNode("127.0.0.2", 51348, "node-a", 4)
        a.avail_info = DispyNodeAvailInfo(12.5, 2**33, 2**40, 1.5)
        a.busy, a.jobs_done, a.cpu_time, a.update_time = 2, 7, 3.25, now
        b = DispyNode("::1", 51348, "", 2)  # no name: its address
        b.avail_info = DispyNodeAvailInfo(float("nan"), float("inf"), -1, True)
        b.cpu_time, b.update_time = float("nan"), float("-inf")
        c = DispyNode("127.0.0.4", 1, "node-c<script>", 1)  # no resources heard yet
        self.nodes = [a, b, c]

        def job(job_id, status, start=None, end=None, exception=None, ip=None) -> DispyJob:
            j = DispyJob((), {}, [], None)  # (no cluster of its own: nothing waits on it)
            j.id, j.status, j.start_time, j.end_time = job_id, status, start, end
            j.exception, j.ip_addr = exception, ip
            return j

        running = [
            job(None, jobstate.Running, now),
            job("text-id", jobstate.ProvisionalResult, float("nan")),
            job(("tuple", 1), jobstate.Running, 10**20),
            job("x" * 500, jobstate.Running, now),
            job(_BadRepr(), 99, True),  # a status with no name
        ]
        self._jobs = {a: running[:2], b: running[2:4], c: running[4:]}
        pending = [job(7, jobstate.Created), *running]
        self.recent_failures = collections.deque(
            [
                job(1, jobstate.Terminated, now, now, "Traceback...\n" * 400, "127.0.0.2"),
                job("c", jobstate.Cancelled, None, float("nan"), None, None),
                job(None, jobstate.Abandoned, now, now, ValueError("not a str"), "::1"),
            ],
            maxlen=50,
        )
        self._live = {j._uid: j for j in pending}
        self.uids = sorted(self._live)

    def status(self) -> ClusterStatus:
        return ClusterStatus(list(self.nodes), len(self._live))

    def _live_job(self, uid: int):
        return self._live.get(uid)

    def node_jobs(self, node, from_node: bool = False) -> list:
        return list(self._jobs.get(node, ()))

    def counts(self) -> dict:
        return {"submitted": 10, "ended": 3, "failed": 3, "pending": 6, "running": 5}

    def _on_loop(self, fn, *args):
        return fn(*args)

    def cancel(self, job) -> int:
        return 0 if job.status in (jobstate.Created, jobstate.Running) else -1

    def deallocate_node(self, node) -> int:
        return 0

    def close_node(self, node, terminate_pending: bool = False) -> int:
        return 0


def make_monitor(cluster) -> httpd.DispyHTTPServer:
    """A DispyHTTPServer with what its __init__ sets, but the socket and the threads."""
    m = httpd.DispyHTTPServer.__new__(httpd.DispyHTTPServer)
    m.cluster = cluster
    m.token = TOKEN
    m.poll_interval = 1.0
    m.static = httpd._static_files()
    m._history = collections.deque(maxlen=httpd.HISTORY + 1)
    t = time.time()
    for sample in [(t - 3, 0), (t - 2, 2), (t - 2, 3), (t - 1, 3), (t, 10)]:
        m._history.append(sample)
    m._stop = threading.Event()
    m._workers = []
    m._closed = False
    m.host = "127.0.0.1"
    m.port = C.HTTP_PORT
    m.cookie_name = C.HTTP_COOKIE
    m.url = f"http://127.0.0.1:{m.port}/?token={urllib.parse.quote(TOKEN)}"
    return m


class Responses(logging.Handler):
    """The ``dispy`` logger's debug records of the handler: each answer's status
    (``log_request``) and the standard library's refusals (``log_error``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        H.quiet_root_logger()
        self.codes: list[int] = []
        self.refusals: list[str] = []
        log = logging.getLogger("dispy")
        log.addHandler(self)
        log.setLevel(logging.DEBUG)
        log.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "monitor %s: %s %s %s":  # _Handler.log_request
            self.codes.append(int(record.args[3]))
        elif record.msg == "monitor %s: %s" and str(record.args[1]).startswith("code "):
            self.refusals.append(str(record.args[1]))  # send_error's log_error

    def clear(self) -> None:
        self.codes.clear()
        self.refusals.clear()


SERVER = httpd._Server.__new__(httpd._Server)  # no socket: the handler reads .monitor only
SERVER.monitor = make_monitor(StandInCluster())
RESPONSES = Responses()
#: Real bugs found and not fixed yet: handled as the surrounding code would (README.md).
KNOWN = H.Known()  # the findings of the first runs are fixed (README.md); none known now
GUARD = H.Guard([])
_HEAD_END = re.compile(rb"\n\r?\n")
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})[^\r\n]*\r\n")


def _strict_json(body: bytes) -> None:
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    json.loads(body, parse_constant=refuse)


def carries_token(head: bytes) -> tuple[bool, bool]:
    """(the request line or a header holds the token, one that is not a Cookie does)."""
    text = head.decode("latin-1")
    lines = text.split("\n")
    others = "\n".join(line for line in lines if not line.lower().startswith("cookie"))

    def has(s: str) -> bool:
        return TOKEN in s or TOKEN in urllib.parse.unquote(s, errors="replace")

    return has(text), has(others)


def check_answer(h, consumed: bytes, out: bytes) -> None:
    codes, refusals = RESPONSES.codes, RESPONSES.refusals
    words = str(consumed.split(b"\n", 1)[0], "iso-8859-1").split()  # as parse_request
    if len(codes) > 1:
        raise H.Finding(f"{len(codes)} answers to one request: {codes}")
    if not codes:
        if words:
            raise H.Finding(f"no answer to {consumed[:200]!r}")
        return
    code = codes[0]
    refused = bool(refusals)  # by the standard library, before the handler saw it
    if code >= 500 and not (refused and code in (501, 505)):
        raise H.Finding(f"answered {code} to {consumed[:300]!r}:\n{out[:2000]!r}")
    m = _HEAD_END.search(consumed)
    head = consumed[: m.end()] if m else consumed
    token, strong = carries_token(head)
    if not token and code not in (401, 403, 404) and not refused:
        raise H.Finding(f"answered {code} to a request without the token: {consumed[:300]!r}")
    if h.command == "POST" and not strong and code == 200:
        raise H.Finding(f"a POST with the token in its cookie only was done: {consumed[:300]!r}")
    # the answer on the wire
    while out.startswith(b"HTTP/1.") and out[9:12] == b"100":  # Expect: 100-continue
        out = out[out.index(b"\r\n\r\n") + 4 :]
    if not out.startswith(b"HTTP/"):
        if h.request_version != "HTTP/0.9":
            raise H.Finding(f"no status line in {out[:300]!r}")
        return
    status = _STATUS.match(out)
    if status is None or int(status.group(1)) != code:
        raise H.Finding(f"status line {out[:80]!r}, logged {code}")
    end = out.find(b"\r\n\r\n")
    if end < 0:
        raise H.Finding(f"headers not ended: {out[:300]!r}")
    headers, body = out[:end].decode("latin-1").split("\r\n")[1:], out[end + 4 :]
    fields = {}
    for line in headers:
        name, sep, value = line.partition(":")
        if not sep:
            raise H.Finding(f"header line {line!r}")
        fields[name.strip().lower()] = value.strip()
    if h.command != "HEAD":
        if "content-length" in fields and int(fields["content-length"]) != len(body):
            raise H.Finding(f"Content-Length {fields['content-length']}, body {len(body)} bytes")
        if fields.get("content-type", "").startswith("application/json"):
            try:
                _strict_json(body)
            except ValueError as exc:
                raise H.Finding(f"JSON body that is not JSON ({exc}): {body[:300]!r}") from exc


def test_one_input(data: bytes) -> None:
    h = httpd._Handler.__new__(httpd._Handler)  # no socket: rfile and wfile in memory
    h.server = SERVER
    h.client_address = ("127.0.0.1", 40000)
    h.request = None
    h.rfile = io.BytesIO(data)
    h.wfile = io.BytesIO()
    h.close_connection = True
    for _ in range(MAX_REQUESTS):
        start_in, start_out = h.rfile.tell(), h.wfile.tell()
        RESPONSES.clear()
        try:
            h.handle_one_request()
        except Exception as exc:
            if not KNOWN.match(exc):
                raise
            break  # the server drops the connection (socketserver's handle_error)
        check_answer(h, data[start_in : h.rfile.tell()], h.wfile.getvalue()[start_out:])
        if h.close_connection:
            break
    GUARD.check()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
