"""The web monitor (dispy.httpd): its API against a live local cluster, its access
control, and the page itself in headless Chromium (skipped where Chromium or
Playwright's Python client is missing).

Everything listens on 127.0.0.1 and every request goes there.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import dispy
from dispy import DispyJob

from . import jobs

# urllib without proxies (an http_proxy in the environment must not see these
# requests) and without following redirects (the tests look at them)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def fetch(url, method="GET", body=None, headers=None, timeout=30):
    """(status, headers, body bytes); 4xx/5xx are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def bearer(server):
    return {"Authorization": f"Bearer {server.token}"}


def base(server):
    return f"http://127.0.0.1:{server.port}"


def status_json(server):
    code, headers, body = fetch(base(server) + "/api/status", headers=bearer(server))
    assert code == 200, body
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)


def until(server, predicate, timeout=30.0, what="condition"):
    """Poll /api/status until ``predicate(status)`` holds (a bounded wait for the
    cluster's own threads); return that status."""
    deadline = time.monotonic() + timeout
    while True:
        status = status_json(server)
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {status}")
        time.sleep(0.05)


@pytest.fixture
def cluster(node):
    c = dispy.JobCluster(jobs.sleep_for, nodes=[node.address], secret=node.secret)
    yield c
    c.close(terminate=True)


@pytest.fixture
def server(cluster):
    with dispy.DispyHTTPServer(cluster, port=0, poll_interval=0.2) as s:
        yield s


def running_uids(server):
    return {j["uid"] for n in status_json(server)["nodes"] for j in n["jobs"]}


# -- access control ---------------------------------------------------------------------


def test_binds_loopback_and_logs_url(cluster, caplog):
    with caplog.at_level(logging.WARNING, logger="dispy"):
        with dispy.DispyHTTPServer(cluster, port=0) as server:
            assert server._httpd.socket.getsockname()[0] == "127.0.0.1"
            assert server.url == f"http://127.0.0.1:{server.port}/?token={server.token}"
            assert len(server.token) >= 32
            assert any(
                r.levelno == logging.WARNING and server.url in r.getMessage()
                for r in caplog.records
            )
    # shut down: nothing listens there any more
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_requires_token(server):
    url = base(server)
    for path in ("/", "/api/status", "/static/monitor.js", "/nope"):
        code, headers, body = fetch(url + path)
        assert code == 401, path
        assert headers["Content-Type"].startswith("text/plain")
        assert b"token" in body and len(body) < 200
    wrong = "x" * len(server.token)
    assert fetch(url + "/?token=" + wrong)[0] == 401
    assert fetch(url + "/api/status", headers={"Authorization": "Bearer " + wrong})[0] == 401
    cookie = {"Cookie": f"{server.cookie_name}={wrong}"}
    assert fetch(url + "/api/status", headers=cookie)[0] == 401
    # the token only counts as ?token= on the page itself, not on the API
    assert fetch(url + "/api/status?token=" + server.token)[0] == 401
    assert fetch(url + "/api/cancel", "POST", {"uid": 1})[0] == 401


def _raw(server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(
    "request_line, status",
    [
        (b"GET / HTTP/2.0", b"505"),  # refused by the standard library: no path yet
        (b"GARBAGE", b"400"),
        (b"GET \0//a] HTTP/1.1", b"401"),  # urlsplit refuses it: "Invalid IPv6 URL"
        (b"POST \0//a] HTTP/1.1", b"401"),
    ],
)
def test_odd_requests_get_an_answer(server, request_line, status):
    """Found by fuzzing (#18): these crashed the handler (no answer, a traceback
    per request); each gets its answer now, and the monitor serves on."""
    answer = _raw(server, request_line + b"\r\nHost: x\r\n\r\n")
    # (a request the standard library refuses is answered as HTTP/0.9: a body only)
    code = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/") else answer
    assert status in code, answer[:200]
    assert fetch(base(server) + "/api/status", headers=bearer(server))[0] == 200


def test_token_url_sets_cookie_and_page_has_token(server):
    code, headers, _ = fetch(server.url)
    assert code == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"{server.cookie_name}={server.token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    code, headers, body = fetch(base(server) + "/", headers={"Cookie": cookie.split(";")[0]})
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert f'<meta name="dispy-token" content="{server.token}">'.encode() in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for name in ("monitor.js", "monitor.css"):
        code, headers, body = fetch(f"{base(server)}/static/{name}", headers=bearer(server))
        assert code == 200 and body


def test_static_path_traversal(server):
    for path in (
        "/static/../httpd.py",
        "/static/%2e%2e/httpd.py",
        "/static/%2e%2e/x",
        "/static/..%2fhttpd.py",
        "/static/%2e%2e%2f__init__.py",
        "/static/index.html",
        "/static/",
        "/static/.%2e",
        "/static/monitor.js/..",
        "/static//etc/passwd",
    ):
        code, _, body = fetch(base(server) + path, headers=bearer(server))
        assert code == 404, (path, body)


# -- the API --------------------------------------------------------------------------------


def test_status_shape_and_counts(cluster, server, node):
    s = until(server, lambda st: st["nodes"], what="the node")
    assert s["name"] == "sleep_for"
    assert set(s["counts"]) == {"submitted", "ended", "failed", "pending", "running"}
    assert s["counts"]["ended"] == 0
    (n,) = s["nodes"]
    assert n["node"] == node.address
    assert (n["ip_addr"], n["port"], n["cpus"]) == (node.ip_addr, node.port, 2)
    for key in ("name", "busy", "jobs_done", "cpu_time", "avail_info", "jobs"):
        assert key in n
    assert set(n["avail_info"]) == {"cpu", "memory", "disk", "swap"}

    js = [cluster.submit(0.05) for _ in range(5)]
    for job in js:
        assert job(timeout=30) == 0.05
    s = until(server, lambda st: st["counts"]["ended"] == 5, what="counts")
    assert s["counts"]["submitted"] == 5 and s["counts"]["failed"] == 0
    assert s["nodes"][0]["jobs_done"] == 5
    # the sampler saw the jobs end: some sample has a positive rate
    hist = until(
        server, lambda st: any(r > 0 for _, r in st["history"]), what="throughput history"
    )["history"]
    assert all(len(p) == 2 for p in hist) and len(hist) <= 300


def test_running_jobs_and_cancel(cluster, server):
    job = cluster.submit(60)
    job.id = ("a", 1)  # any id: returned as its repr
    # listed once sent to its node; Running once the node says it started
    s = until(
        server,
        lambda st: st["nodes"] and [j["status"] for j in st["nodes"][0]["jobs"]] == ["Running"],
        what="the job Running",
    )
    (j,) = s["nodes"][0]["jobs"]
    assert j["uid"] == job._uid and j["id"] == "('a', 1)"
    assert isinstance(j["start_time"], float)
    assert s["counts"]["running"] == 1

    url = base(server) + "/api/cancel"
    cookie = {"Cookie": f"{server.cookie_name}={server.token}"}
    # the cookie alone (what a cross-site form would carry) changes nothing
    code, _, body = fetch(url, "POST", {"uid": job._uid}, headers=cookie)
    assert code == 403 and b"X-Dispy-Token" in body
    code, _, _ = fetch(
        url, "POST", {"uid": job._uid}, headers={**cookie, "X-Dispy-Token": "nope" * 8}
    )
    assert code == 403
    assert job.status == DispyJob.Running
    # bad requests
    headers = {**cookie, "X-Dispy-Token": server.token}
    assert fetch(url, "POST", {"uid": "1"}, headers=headers)[0] == 400
    assert fetch(url, "POST", [job._uid], headers=headers)[0] == 400
    code, _, body = fetch(url, "POST", {"uid": 10**9}, headers=headers)
    assert code == 404 and json.loads(body)["ok"] is False

    code, _, body = fetch(url, "POST", {"uid": job._uid}, headers=headers)
    assert code == 200 and json.loads(body) == {"ok": True}
    job(timeout=30)
    assert job.status == DispyJob.Cancelled
    s = until(server, lambda st: st["failures"], what="the failure")
    (f,) = s["failures"]
    assert f["uid"] == job._uid and f["status"] == "Cancelled"
    assert s["counts"]["failed"] == 1 and not s["nodes"][0]["jobs"]
    # an ended job cannot be cancelled again
    assert fetch(url, "POST", {"uid": job._uid}, headers=headers)[0] == 404


def test_failure_exception_text_truncated(cluster, server):
    job = cluster.submit("not a number")  # time.sleep('...') raises TypeError on the node
    job(timeout=30)
    assert job.status == DispyJob.Terminated
    job.exception = "x" * 5000  # the page shows at most 2000 characters
    (f,) = until(server, lambda st: st["failures"], what="the failure")["failures"]
    assert f["uid"] == job._uid and f["status"] == "Terminated"
    assert f["exception"] == "x" * 2000


def test_node_deallocate_and_cancel_pending(cluster, server, node):
    until(server, lambda st: st["nodes"], what="the node")
    url = base(server) + "/api/node"
    headers = bearer(server)
    assert (
        fetch(url, "POST", {"node": node.address, "action": "explode"}, headers=headers)[0] == 400
    )
    code, _, body = fetch(url, "POST", {"node": "127.0.0.1:1", "action": "close"}, headers=headers)
    assert code == 404 and json.loads(body)["ok"] is False
    code, _, body = fetch(
        url, "POST", {"node": node.address, "action": "deallocate"}, headers=headers
    )
    assert code == 200 and json.loads(body) == {"ok": True}
    # no new job goes to the node now: the job waits in the client's queue ...
    job = cluster.submit(0.01)
    assert job(timeout=1.0) is None and job.status == DispyJob.Created
    assert status_json(server)["counts"]["pending"] == 1
    assert job._uid not in running_uids(server)
    # ... where the monitor finds it to cancel it
    code, _, body = fetch(base(server) + "/api/cancel", "POST", {"uid": job._uid}, headers=headers)
    assert code == 200 and json.loads(body) == {"ok": True}
    job(timeout=30)
    assert job.status == DispyJob.Cancelled
    code, _, body = fetch(url, "POST", {"node": node.address, "action": "close"}, headers=headers)
    assert code == 200 and json.loads(body)["ok"] is True


def test_shutdown_is_idempotent_and_token_validated(cluster):
    server = dispy.DispyHTTPServer(cluster, port=0, token="t" * 20)
    assert server.token == "t" * 20
    assert fetch(base(server) + "/api/status", headers=bearer(server))[0] == 200
    server.shutdown()
    server.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("dispy-httpd")]
    for bad in ("short", "has space in it........", "x" * 300):
        with pytest.raises(ValueError):
            dispy.DispyHTTPServer(cluster, port=0, token=bad)


# -- the page in headless Chromium ------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _have_playwright() -> bool:
    try:
        return importlib.util.find_spec("playwright") is not None
    except (ImportError, ValueError):
        return False


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # network safety: no proxy, and no name resolved beyond this machine
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]


@pytest.mark.slow
@pytest.mark.skipif(
    not _have_playwright(),
    reason="Playwright's Python client is not installed (pip install playwright)",
)
@pytest.mark.skipif(
    _chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium)"
)
def test_browser_end_to_end(cluster, server, node, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    expect = sync_api.expect
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url)
            # the token went into a cookie and out of the address bar
            assert page.url == base(server) + "/"
            expect(page.locator("#cluster-name")).to_have_text("sleep_for", timeout=15_000)
            row = page.locator(f'#nodes tr[data-node="{node.address}"]')
            expect(row).to_be_visible(timeout=30_000)
            expect(row.locator("td").nth(1)).to_have_text("2")
            expect(page.locator("#count-ended")).to_have_text("0")

            # the done count rises as jobs finish
            short = [cluster.submit(0.2) for _ in range(6)]
            page.wait_for_function(
                "() => Number(document.querySelector('#count-ended').textContent) >= 6",
                timeout=60_000,
            )
            assert all(j.status == DispyJob.Finished for j in short)

            # cancel a running job with its button
            long = cluster.submit(120)
            button = page.locator(f'button.cancel[data-uid="{long._uid}"]')
            expect(button).to_be_visible(timeout=30_000)
            shots = os.environ.get("DISPY_SCREENSHOT_DIR") or str(tmp_path)
            os.makedirs(shots, exist_ok=True)
            path = os.path.join(shots, "dispy-monitor-running.png")
            page.screenshot(path=path, full_page=True)
            print(f"screenshot: {path}")
            button.click()
            long(timeout=30)
            assert long.status == DispyJob.Cancelled
            expect(page.locator(f'#failures li[data-uid="{long._uid}"]')).to_contain_text(
                "Cancelled", timeout=15_000
            )
            expect(button).to_have_count(0, timeout=15_000)
            expect(page.locator("#count-failed")).to_have_text("1")
            expect(page.locator("#conn")).to_have_text("live")
            assert not errors, errors

            path = os.path.join(shots, "dispy-monitor.png")
            page.screenshot(path=path, full_page=True)
            print(f"screenshot: {path}")
        finally:
            browser.close()


def test_idle_connections_cannot_pile_up_threads(server):
    """#18 finding 9: 300 idle connections used to hold 300 threads for 30 s each;
    now at most MAX_CONNECTIONS are open at once (the oldest is closed for a new
    one), and a real request still gets its answer."""
    from dispy import httpd

    MAX_CONNECTIONS = getattr(httpd, "MAX_CONNECTIONS", 32)

    before = threading.active_count()
    socks = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        assert status_json(server)["nodes"] is not None  # served during the flood
        assert threading.active_count() - before <= MAX_CONNECTIONS + 2
        # the oldest connections were closed by the monitor
        for s in socks[: 300 - MAX_CONNECTIONS]:
            s.settimeout(10)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in socks:
            s.close()
