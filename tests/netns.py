"""Private test networks built from Linux network namespaces.

A :class:`Network` is a set of network namespaces made with ``ip netns add``:

* each *subnet* (``10.231.<k>.0/24``) is a namespace holding one Linux bridge
  (``br0``), the "switch";
* each *host* is a namespace with ``lo`` and one ``eth0`` (``10.231.<k>.<n>/24``),
  a veth pair whose other end is a port of its subnet's bridge;
* a *router* is a host with one interface in each of several subnets (address
  ``.1`` on each) and IPv4 forwarding on; every host of those subnets gets a
  route to the router's other subnets through it.

Safety: nothing is ever created in the machine's own network namespace.  Every
``ip`` command this module runs either manages namespaces named
``dspy<pid>-...`` (``ip netns add/del/list/pids``) or runs inside one of them
(``ip -n <ns> ...``); veth pairs are created with both ends directly inside
namespaces.  Addresses are private (``10.231.0.0/16``) and exist only inside
the namespaces, so traffic between hosts never reaches a real network.

Namespaces are named ``dspy<pid>-<name>`` (hosts) and ``dspy<pid>-net-<name>``
(subnets), ``<pid>`` being the PID of the test process.  :meth:`Network.close`
(run by the fixture's finalizer and, as a last resort, at exit) kills what the
network started and deletes every namespace; leftovers of a crashed run (a
``dspy<N>-`` namespace whose process ``N`` no longer exists) are deleted when
the next network is built.

Use the ``netns`` fixture (function scope)::

    def test_x(netns):
        a, b = netns.add_host("a1"), netns.add_host("a2")
        server = b.popen_python(SERVER_CODE)
        wait_for_line(server, "ready", timeout=5)
        assert a.python(CLIENT_CODE, b.ip).returncode == 0

Needs root and iproute2; where namespaces cannot be made, the fixture fails
(it does not skip) and says what to fix.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

import pytest

__all__ = [
    "Host",
    "Network",
    "NetnsUnavailable",
    "Subnet",
    "WaitTimeout",
    "cleanup_stale",
    "find_ip",
    "netns",
    "read_lines",
    "wait_for_line",
]

ADDRESS_SPACE = "10.231"
PREFIX = f"dspy{os.getpid()}-"
_STALE_RE = re.compile(r"^dspy(\d+)-")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")
_IP_TIMEOUT = 30.0


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be built here (not root, no iproute2, kernel refuses)."""


class WaitTimeout(AssertionError):
    """:func:`wait_for_line` saw no matching line in time (or the output ended)."""


# --------------------------------------------------------------------------- ip


def find_ip() -> str | None:
    """The ``ip`` program (iproute2): on PATH, else ``/usr/sbin/ip`` or ``/sbin/ip``."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    return shutil.which("ip", path=path)


def _ip(ipcmd: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip args``; only in our namespaces or to manage them (see the module doc)."""
    if args[:1] == ("-n",):
        if not args[1].startswith(PREFIX):
            raise AssertionError(f"refusing to run ip in a namespace not ours: {args!r}")
    elif args[:1] == ("netns",):
        op = args[1] if len(args) > 1 else "list"
        if op not in ("list", "pids") and not _STALE_RE.match(args[2]):
            raise AssertionError(f"refusing to manage a namespace not ours: {args!r}")
    else:
        raise AssertionError(f"refusing to run ip in the machine's own namespace: {args!r}")
    res = subprocess.run(
        [ipcmd, *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
    )
    if check and res.returncode != 0:
        raise RuntimeError(
            f"`ip {' '.join(args)}` failed (exit {res.returncode}): {res.stderr.strip()}"
        )
    return res


def _list_netns(ipcmd: str) -> list[str]:
    out = _ip(ipcmd, "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ipcmd: str, ns: str) -> list[int]:
    res = _ip(ipcmd, "netns", "pids", ns, check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def cleanup_stale(ipcmd: str | None = None) -> list[str]:
    """Delete namespaces ``dspy<N>-...`` left by a test process ``N`` that no
    longer exists (a crashed run); return their names.  Namespaces of live
    processes, and every namespace not named so, are left alone.  (Programs
    still running inside a stale namespace are not touched; once the
    namespace is deleted they are cut off from everything.)"""
    ipcmd = ipcmd or find_ip()
    if ipcmd is None:
        return []
    removed = []
    for ns in _list_netns(ipcmd):
        m = _STALE_RE.match(ns)
        if m and int(m.group(1)) != os.getpid() and not os.path.exists(f"/proc/{m.group(1)}"):
            if _ip(ipcmd, "netns", "del", ns, check=False).returncode == 0:
                removed.append(ns)
    return removed


_probed: dict[str, str | None] = {}


def _check_available(ipcmd: str | None) -> str:
    """Return the ``ip`` path, or raise NetnsUnavailable saying what to fix."""
    how = (
        "The network-namespace tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN; in a "
        "container: --privileged or --cap-add SYS_ADMIN --cap-add NET_ADMIN) and iproute2 "
        "(Debian/Ubuntu: apt-get install iproute2)."
    )
    if ipcmd is None or not os.access(ipcmd, os.X_OK):
        raise NetnsUnavailable(f"`ip` (iproute2) not found ({ipcmd or 'not on PATH'}). {how}")
    if os.geteuid() != 0:
        raise NetnsUnavailable(f"not running as root (euid {os.geteuid()}). {how}")
    if ipcmd not in _probed:
        # one namespace with a bridge and a veth pair: what every Network needs
        ns = f"{PREFIX}probe"
        err = None
        try:
            _ip(ipcmd, "netns", "del", ns, check=False)
            _ip(ipcmd, "netns", "add", ns)
            _ip(ipcmd, "-n", ns, "link", "add", "br0", "type", "bridge")
            _ip(ipcmd, "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            err = str(e)
        finally:
            _ip(ipcmd, "netns", "del", ns, check=False)
        _probed[ipcmd] = err
    if _probed[ipcmd]:
        raise NetnsUnavailable(f"cannot build a network namespace: {_probed[ipcmd]}. {how}")
    return ipcmd


# ------------------------------------------------------------------- networks


class Subnet:
    """One subnet: namespace ``ns`` holding bridge ``br0``; ``10.231.<index>.0/24``."""

    def __init__(self, name: str, index: int, ns: str):
        self.name = name
        self.index = index
        self.ns = ns
        self.prefix = f"{ADDRESS_SPACE}.{index}"
        self.cidr = f"{self.prefix}.0/24"
        self.broadcast = f"{self.prefix}.255"
        self.hosts: list[Host] = []
        self._used: set[int] = set()
        self._ports = 0

    def _alloc(self, router: bool) -> str:
        wanted = [1, *range(2, 255)] if router else range(2, 255)
        for n in wanted:
            if n not in self._used:
                self._used.add(n)
                return f"{self.prefix}.{n}"
        raise RuntimeError(f"subnet {self.name!r} is full")

    def __repr__(self) -> str:
        return f"<Subnet {self.name} {self.cidr} ns={self.ns}>"


class _Link:
    def __init__(self, subnet: Subnet, ifname: str, ip: str, port: str):
        self.subnet, self.ifname, self.ip, self.port = subnet, ifname, ip, port


class Host:
    """A namespace with an address on one subnet (a router: on several).

    ``name``, ``ns`` (namespace name), ``ip``, ``subnet`` (subnet name) and
    ``broadcast`` describe its first interface ``eth0``; ``ips`` maps every
    subnet name it is on to its address there (routers use eth0, eth1, ...).
    """

    def __init__(self, network: Network, name: str, ns: str):
        self.network = network
        self.name = name
        self.ns = ns
        self.is_router = False
        self._links: list[_Link] = []
        self._routes: set[str] = set()
        self._procs: list[subprocess.Popen] = []

    # --- addresses
    @property
    def ip(self) -> str:
        return self._links[0].ip

    @property
    def subnet(self) -> str:
        return self._links[0].subnet.name

    @property
    def broadcast(self) -> str:
        return self._links[0].subnet.broadcast

    @property
    def ips(self) -> dict[str, str]:
        return {link.subnet.name: link.ip for link in self._links}

    @property
    def subnets(self) -> tuple[str, ...]:
        return tuple(link.subnet.name for link in self._links)

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ips} ns={self.ns}>"

    # --- programs
    def _argv(self, argv: Sequence[str]) -> list[str]:
        return [self.network.ipcmd, "netns", "exec", self.ns, *map(str, argv)]

    @staticmethod
    def _env(env: Mapping[str, str | None] | None) -> dict[str, str]:
        out = dict(os.environ)
        for k, v in (env or {}).items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = str(v)
        return out

    def popen(
        self, argv: Sequence[str], env: Mapping[str, str | None] | None = None, **kw
    ) -> subprocess.Popen:
        """Start ``argv`` in this host's namespace (``ip netns exec``, which execs
        the program: ``proc.pid`` is the program's own PID).

        ``env`` is added to ``os.environ`` (a ``None`` value removes a name).
        Defaults: stdin from /dev/null, stdout and stderr pipes, text mode.  An
        unread pipe can fill (64 KiB) and stall a chatty program: pass
        ``stderr=subprocess.STDOUT`` (or a file) for long-running daemons.
        The process is killed by :meth:`kill_all` / :meth:`Network.close`.
        """
        self.network._check_open()
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        if "encoding" not in kw and "errors" not in kw and "universal_newlines" not in kw:
            kw.setdefault("text", True)
        proc = subprocess.Popen(self._argv(argv), env=self._env(env), **kw)
        self._procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        timeout: float = 30.0,
        env: Mapping[str, str | None] | None = None,
        **kw,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` in this host's namespace to completion (killed, and
        ``subprocess.TimeoutExpired`` raised, after ``timeout`` s); output is
        captured as text; a non-zero exit status is not an error."""
        self.network._check_open()
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(
            self._argv(argv),
            env=self._env(env),
            timeout=timeout,
            capture_output=True,
            text=True,
            check=False,
            **kw,
        )

    def python(
        self,
        code: str,
        *args: str,
        timeout: float = 30.0,
        env: Mapping[str, str | None] | None = None,
    ) -> subprocess.CompletedProcess:
        """``python -c code args...`` in this namespace, to completion (see :meth:`run`)."""
        return self.run([sys.executable, "-c", code, *args], timeout=timeout, env=env)

    def popen_python(
        self, code: str, *args: str, env: Mapping[str, str | None] | None = None, **kw
    ) -> subprocess.Popen:
        """Start ``python -c code args...`` here, unbuffered (see :meth:`popen`)."""
        env = {"PYTHONUNBUFFERED": "1", **(env or {})}
        return self.popen([sys.executable, "-c", code, *args], env=env, **kw)

    def kill_all(self, sig: int = signal.SIGKILL, timeout: float = 5.0) -> None:
        """Stop every program started on this host and wait for it.

        Each process started by :meth:`popen` gets ``sig`` (by PID) and up to
        ``timeout`` s to exit, then SIGKILL.  Whatever still runs inside this
        host's namespace afterwards (programs those started: workers,
        daemonized children) gets SIGKILL, by PID, and is waited for.  Pipes
        are closed.
        """
        procs, self._procs = self._procs, []
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5.0)
        self._kill_leftovers()
        for p in procs:
            _close_pipes(p)

    def _kill_leftovers(self, timeout: float = 5.0) -> None:
        ipcmd = self.network.ipcmd
        deadline = time.monotonic() + timeout
        while True:
            pids = [p for p in _netns_pids(ipcmd, self.ns) if p != os.getpid()]
            if not pids:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} in {self.ns} survived SIGKILL")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)  # poll interval while waiting for them to vanish

    # --- cable
    def _set_ports(self, state: str, subnet: str | None) -> None:
        for link in self._links:
            if subnet is None or link.subnet.name == subnet:
                _ip(self.network.ipcmd, "-n", link.subnet.ns, "link", "set", link.port, state)

    def link_down(self, subnet: str | None = None) -> None:
        """Cut the cable: set the *bridge-side* end of this host's veth down.

        The host's own ``eth0`` stays administratively up with its address and
        routes, but loses carrier (NO-CARRIER), as with a real unplugged cable:
        frames to and from it are dropped silently, so peers' connections stall
        and time out instead of being refused.  (Setting ``eth0`` itself down
        would instead remove the host's routes and make its own sends fail at
        once with "network unreachable".)  A router cuts all its cables, or
        only the one into ``subnet``.
        """
        self._set_ports("down", subnet)

    def link_up(self, subnet: str | None = None) -> None:
        """Plug the cable back in (undo :meth:`link_down`); effective at once (STP is off)."""
        self._set_ports("up", subnet)


_live: set[Network] = set()


@atexit.register
def _close_live_networks() -> None:
    for net in list(_live):
        try:
            net.close()
        except Exception as e:  # noqa: BLE001 -- at exit: report and go on
            print(f"netns: closing {net!r} at exit: {e}", file=sys.stderr)


class Network:
    """A private network of namespaces; see the module doc.  Usable as a
    context manager; :meth:`close` is idempotent."""

    def __init__(self, ip: str | None = None):
        """Raise :class:`NetnsUnavailable` if namespaces cannot be built here.
        ``ip`` is the iproute2 program (default: :func:`find_ip`)."""
        self.ipcmd = _check_available(ip if ip is not None else find_ip())
        cleanup_stale(self.ipcmd)
        self.subnets: dict[str, Subnet] = {}
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._closed = False
        _live.add(self)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Network subnets={list(self.subnets)} hosts={list(self.hosts)}>"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Network is closed")

    def _new_ns(self, ns: str) -> None:
        if ns in self._namespaces:
            raise ValueError(f"namespace {ns} already exists in this network")
        _ip(self.ipcmd, "netns", "add", ns)
        self._namespaces.append(ns)

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"bad name {name!r}: letters, digits, '_.-', at most 41")

    # --- building
    def subnet(self, name: str = "a") -> Subnet:
        """The subnet ``name``, created on first use: the k-th subnet made is
        ``10.231.<k>.0/24`` (``a`` is created on the first host if not before)."""
        self._check_open()
        if name in self.subnets:
            return self.subnets[name]
        self._check_name(name)
        index = len(self.subnets) + 1
        if index > 254:
            raise RuntimeError("at most 254 subnets")
        sub = Subnet(name, index, f"{PREFIX}net-{name}")
        self._new_ns(sub.ns)
        _ip(self.ipcmd, "-n", sub.ns, "link", "add", "br0", "type", "bridge")
        _ip(self.ipcmd, "-n", sub.ns, "link", "set", "br0", "up")
        self.subnets[name] = sub
        return sub

    def _new_host(self, name: str) -> Host:
        self._check_open()
        self._check_name(name)
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        host = Host(self, name, f"{PREFIX}{name}")
        self._new_ns(host.ns)
        self.hosts[name] = host
        _ip(self.ipcmd, "-n", host.ns, "link", "set", "lo", "up")
        return host

    def _attach(self, host: Host, sub: Subnet, ifname: str) -> None:
        ip = sub._alloc(router=host.is_router)
        port = f"p{sub._ports}"
        sub._ports += 1
        n = self.ipcmd
        # both ends are created inside namespaces: nothing appears in ours
        _ip(n, "-n", host.ns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", sub.ns)  # fmt: skip
        _ip(n, "-n", sub.ns, "link", "set", port, "master", "br0", "up")
        _ip(n, "-n", host.ns, "addr", "add", f"{ip}/24", "broadcast", "+", "dev", ifname)
        _ip(n, "-n", host.ns, "link", "set", ifname, "up")
        host._links.append(_Link(sub, ifname, ip, port))
        sub.hosts.append(host)

    def _add_routes(self, host: Host) -> None:
        """Give ``host`` a route to every subnet a router on its subnets reaches."""
        own = {link.subnet.name for link in host._links}
        for link in host._links:
            for router in link.subnet.hosts:
                if router is host or not router.is_router:
                    continue
                via = router.ips[link.subnet.name]
                for far in router._links:
                    sub = far.subnet
                    if sub.name in own or sub.cidr in host._routes:
                        continue
                    _ip(self.ipcmd, "-n", host.ns, "route", "add", sub.cidr, "via", via)
                    host._routes.add(sub.cidr)

    def add_host(self, name: str, subnet: str = "a") -> Host:
        """A new host ``name`` (namespace ``dspy<pid>-<name>``) on ``subnet``,
        with the next free address from ``.2`` and routes through the routers
        on that subnet."""
        sub = self.subnet(subnet)
        host = self._new_host(name)
        self._attach(host, sub, "eth0")
        self._add_routes(host)
        return host

    def add_router(self, name: str, subnets: Iterable[str] = ("a", "b")) -> Host:
        """A router ``name`` with ``eth0, eth1, ...`` into ``subnets`` (address
        ``.1`` on each where free) and IPv4 forwarding on.  Every host of those
        subnets, present or added later, gets a route to the router's other
        subnets through it (one hop; the first router to a subnet wins)."""
        subs = [self.subnet(s) for s in subnets]
        if len({s.name for s in subs}) != len(subs) or len(subs) < 2:
            raise ValueError("a router needs two or more distinct subnets")
        router = self._new_host(name)
        router.is_router = True
        for i, sub in enumerate(subs):
            self._attach(router, sub, f"eth{i}")
        self._enable_forwarding(router)
        for sub in subs:
            for host in sub.hosts:
                if host is not router:
                    self._add_routes(host)
        return router

    def _enable_forwarding(self, router: Host) -> None:
        sysctl = shutil.which("sysctl", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))  # fmt: skip
        if sysctl:
            res = router.run([sysctl, "-w", "net.ipv4.ip_forward=1"], timeout=_IP_TIMEOUT)
        else:
            code = "open('/proc/sys/net/ipv4/ip_forward', 'w').write('1')"
            res = router.python(code, timeout=_IP_TIMEOUT)
        if res.returncode != 0:
            raise RuntimeError(f"cannot enable forwarding in {router.ns}: {res.stderr.strip()}")

    # --- teardown
    def close(self) -> None:
        """Kill every program started in this network (see :meth:`Host.kill_all`),
        then delete all its namespaces, hosts' and subnets'.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for host in self.hosts.values():
            try:
                host.kill_all()
            except Exception as e:  # noqa: BLE001 -- go on deleting namespaces
                errors.append(f"{host.name}: {e}")
        for ns in reversed(self._namespaces):
            res = _ip(self.ipcmd, "netns", "del", ns, check=False)
            if res.returncode != 0 and ns in _list_netns(self.ipcmd):
                errors.append(f"ip netns del {ns}: {res.stderr.strip()}")
        _live.discard(self)
        if errors:
            raise RuntimeError("closing the test network: " + "; ".join(errors))


# ---------------------------------------------------------------- output lines


class _LineReader:
    """Reads one stream of a process line by line in a thread."""

    def __init__(self, stream, name: str):
        self.stream = stream
        self.lines: list[str] = []
        self.cursor = 0
        self.eof = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                line = self.stream.readline()
                if not line:
                    break
                if isinstance(line, bytes):
                    line = line.decode(errors="replace")
                with self.cond:
                    self.lines.append(line.rstrip("\r\n"))
                    self.cond.notify_all()
        except (OSError, ValueError):  # closed under us
            pass
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()


_readers_lock = threading.Lock()


def _reader(proc: subprocess.Popen, stream: str) -> _LineReader | None:
    with _readers_lock:
        readers = proc.__dict__.setdefault("_netns_readers", {})
        if stream not in readers:
            f = getattr(proc, stream)
            if f is None:
                return None
            readers[stream] = _LineReader(f, f"netns-{stream}-{proc.pid}")
        return readers[stream]


def _close_pipes(proc: subprocess.Popen, timeout: float = 2.0) -> None:
    """Close a finished process's pipes once their reader threads (if any) ended."""
    readers = proc.__dict__.get("_netns_readers", {})
    for name in ("stdin", "stdout", "stderr"):
        f = getattr(proc, name)
        if f is None or f.closed:
            continue
        r = readers.get(name)
        if r is not None:
            r.thread.join(timeout)
            if r.thread.is_alive():
                continue  # a writer outlived the process; closing would block on the reader
        try:
            f.close()
        except OSError:
            pass


def read_lines(proc: subprocess.Popen, stream: str = "stdout") -> list[str]:
    """The lines of ``proc``'s ``stream`` read so far (by :func:`wait_for_line`'s reader)."""
    r = _reader(proc, stream)
    if r is None:
        return []
    with r.cond:
        return list(r.lines)


def wait_for_line(
    proc: subprocess.Popen, pattern: str | re.Pattern, timeout: float = 10.0, stream: str = "stdout"
) -> re.Match:
    """Read ``proc``'s ``stream`` (a pipe) until a line matches ``pattern``
    (``re.search``, line without its newline) and return the match.

    A thread reads the stream from the first call on; each call goes on from
    the line after the previous match, so consecutive calls see consecutive
    output (don't read ``proc.stdout`` yourself as well).  Raises
    :class:`WaitTimeout`, with the lines read so far (and stderr, if the
    process has ended), after ``timeout`` s or when the output ends first.
    """
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    r = _reader(proc, stream)
    if r is None:
        raise ValueError(f"the process's {stream} is not a pipe")
    deadline = time.monotonic() + timeout
    with r.cond:
        while True:
            while r.cursor < len(r.lines):
                line = r.lines[r.cursor]
                r.cursor += 1
                m = rx.search(line)
                if m:
                    return m
            if r.eof:
                why = "its output ended"
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = f"{timeout} s passed"
                break
            r.cond.wait(remaining)
        seen = list(r.lines)
    # outside the lock: describe what happened (a program whose output ended is
    # exiting: give it a moment, so that its exit status and stderr are told)
    if why == "its output ended":
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
    rc = proc.poll()
    if why != "its output ended" and rc is not None:
        why += f" (the process exited with {rc})"
    elif rc is not None:
        why += f" (exit status {rc})"
    msg = [f"no line matching {rx.pattern!r} from pid {proc.pid}: {why}"]
    msg.append(f"{stream} so far ({len(seen)} lines):")
    msg.extend("  | " + s for s in seen[-60:])
    other = "stderr" if stream == "stdout" else "stdout"
    if rc is not None and getattr(proc, other) is not None:
        o = _reader(proc, other)
        o.thread.join(1.0)
        with o.cond:
            rest = list(o.lines)
        msg.append(f"{other} ({len(rest)} lines):")
        msg.extend("  | " + s for s in rest[-60:])
    raise WaitTimeout("\n".join(msg))


# --------------------------------------------------------------------- fixture


@pytest.fixture
def netns():
    """A fresh :class:`Network` for one test, torn down (processes killed,
    namespaces deleted) when the test ends.  Fails the test if namespaces
    cannot be built here."""
    try:
        net = Network()
    except NetnsUnavailable as e:
        problem = str(e)
    else:
        problem = None
    if problem:
        pytest.fail(problem, pytrace=False)
    try:
        yield net
    finally:
        net.close()
