"""What the handler targets (node_handlers, scheduler_handlers, http, config) share.

* ``Guard``: an audit hook (``sys.addaudithook``), installed once per process.
  It refuses any network use (an AF_INET/AF_INET6 socket, bind, connect,
  sendto, a name lookup) by raising ``NetworkUsed`` and any process start
  (``subprocess``, fork, exec, spawn) by raising ``ProcessStarted`` (both
  ``BaseException``: no ``except Exception`` of the code under test swallows
  them), and any write (open for writing, mkdir, rename, remove, chmod,
  symlink, rmtree...) outside the folders it is given by raising
  ``WroteOutside`` (a ``PermissionError``).  Each is recorded, and ``check()``
  reports it after the input, whatever the code under test did with it.
* ``ErrorLog``: a logging handler that keeps the ERROR records with a
  traceback (``logger.exception``) of the loggers it is put on;
  ``LoopErrors``: the event loop's exception handler, keeping what the loop
  would only log (an exception in a callback, a task's unretrieved one).
* ``Known``: findings already reported, matched narrowly, that do not stop a
  run (unless ``DISPY_FUZZ_KNOWN=crash``).
* ``FakeChannel``, ``settle()``, ``drain_tasks()``: a daemon's client session
  driven in memory on one event loop (see fuzz_node_handlers.py);
  ``SqliteFile``: a daemon's SQLite file shared by the inputs and checked
  after each.

Imported by the targets inside ``atheris.instrument_imports``; it imports
nothing of dispy's.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
import traceback

SETTLE_LIMIT = 20.0  # seconds a message's requests may take before the input counts as a hang


class Finding(AssertionError):
    """What a target reports (the message says what and where)."""


class NetworkUsed(BaseException):
    pass


class ProcessStarted(BaseException):
    pass


class WroteOutside(PermissionError):
    pass


def _path(value, dir_fd=None) -> str | None:
    if isinstance(value, int) or value is None:
        return None  # a descriptor: its path was checked when it was opened
    path = os.fsdecode(os.fspath(value))
    if dir_fd is not None and not os.path.isabs(path):
        try:
            base = os.readlink(f"/proc/self/fd/{dir_fd}")
        except OSError:
            return path
        return os.path.join(base, path)
    return os.path.abspath(path)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_NET_FAMILIES = {socket.AF_INET, socket.AF_INET6}
_LOOKUPS = {
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyaddr",
    "socket.getnameinfo",
}
_SOCKET_USE = {"socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg"}
_PROCESS = {
    "subprocess.Popen",
    "os.fork",
    "os.forkpty",
    "os.posix_spawn",
    "os.spawn",
    "os.exec",
    "os.system",
    "pty.spawn",
}
#: audit event -> indexes of its path arguments, and of the dir_fd that goes with them
_PATH_EVENTS = {
    "os.mkdir": ((0,), 2),
    "os.rename": ((0, 1), 2),
    "os.remove": ((0,), 1),
    "os.rmdir": ((0,), 1),
    "os.symlink": ((1,), 2),
    "os.link": ((1,), 3),
    "os.chmod": ((0,), 2),
    "os.chown": ((0,), 3),
    "os.truncate": ((0,), None),
    "os.utime": ((0,), 3),
    "os.mkfifo": ((0,), 2),
    "os.mknod": ((0,), 3),
    "shutil.rmtree": ((0,), 1),
    "shutil.copyfile": ((1,), None),
    "shutil.move": ((0, 1), None),
}


class Guard:
    """No network; no writes outside ``roots`` (see the module doc)."""

    _installed: Guard | None = None

    def __init__(self, roots) -> None:
        self.roots = [os.path.realpath(r) for r in roots]
        self.violations: list[str] = []
        sys.dont_write_bytecode = True  # an import during a run writes no .pyc
        if Guard._installed is not None:
            raise RuntimeError("one Guard per process")
        Guard._installed = self
        sys.addaudithook(self._hook)

    def inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == r or real.startswith(r + os.sep) for r in self.roots)

    def _hook(self, event: str, args) -> None:
        if event == "open":
            path, _mode, flags = args
            if flags is not None and flags & _WRITE_FLAGS:
                self._check_write(event, _path(path))
        elif event in _PATH_EVENTS:
            where, fd_index = _PATH_EVENTS[event]
            dir_fd = args[fd_index] if fd_index is not None and len(args) > fd_index else None
            for i in where:
                self._check_write(event, _path(args[i], dir_fd))
        elif event == "socket.__new__":
            if args[1] in _NET_FAMILIES:
                self._refuse(f"{event} family {args[1]}")
        elif event in _SOCKET_USE:
            sock = args[0]
            if getattr(sock, "family", None) != socket.AF_UNIX:
                self._refuse(f"{event} {args[1:]!r}")
        elif event in _LOOKUPS:
            self._refuse(f"{event} {args!r}")
        elif event in _PROCESS:
            self.violations.append(f"process: {event} {args!r}")
            raise ProcessStarted(f"fuzz guard: {event} {args!r}")

    def _check_write(self, event: str, path: str | None) -> None:
        if path is None or path == os.devnull or self.inside(path):
            return
        what = f"{event} {path!r} (outside {self.roots})"
        self.violations.append(what)
        raise WroteOutside(errno.EACCES, f"fuzz guard: {what}")

    def _refuse(self, what: str) -> None:
        self.violations.append(f"network: {what}")
        raise NetworkUsed(f"fuzz guard: {what}")

    def check(self) -> None:
        if self.violations:
            found, self.violations = self.violations, []
            raise Finding("the code under test tried: " + "; ".join(found))


class Known:
    """Findings already reported: real bugs of the code under test, left to its
    maintainers (fuzz/README.md lists them).  Each is matched narrowly: the
    exception's type, the file and function it was raised in (the innermost
    frame; ``None``: any function of that file), and a piece of its message.
    A known exception is handled as the code around the handler handles it
    (the daemon's transport closes the connection, the HTTP server drops it,
    argparse's caller sees an error), so the run goes on and finds what else
    there is.  With ``DISPY_FUZZ_KNOWN=crash`` (``run.py --strict``) they are
    crashes again."""

    report = os.environ.get("DISPY_FUZZ_KNOWN", "") == "crash"

    def __init__(self, *entries: tuple[str, type | None, str, str | None, str]) -> None:
        # (name, exception type, piece of the file's path, function, piece of the message);
        # a type None: a finding of the harness's own checks, see allows()
        self.entries = entries
        self.seen: set[str] = set()

    def _hit(self, name: str) -> str:
        if name not in self.seen:  # run.py lists these names in its summary
            self.seen.add(name)
            print(f"fuzz: known finding {name} (not a crash; DISPY_FUZZ_KNOWN=crash to stop on it)",
                  flush=True)  # fmt: skip
        return name

    def match(self, exc: BaseException) -> str | None:
        if self.report or not self.entries:
            return None
        tb = exc.__traceback__
        if tb is None:
            return None
        while tb.tb_next is not None:
            tb = tb.tb_next
        code = tb.tb_frame.f_code
        for name, kind, file, func, text in self.entries:
            if (
                type(exc) is kind
                and file in code.co_filename
                and func in (None, code.co_name)
                and text in str(exc)
            ):
                return self._hit(name)
        return None

    def allows(self, name: str) -> bool:
        """A finding of the harness's own checks (not an exception), known as ``name``."""
        if self.report or not any(e[0] == name for e in self.entries):
            return False
        self._hit(name)
        return True


NO_KNOWN = Known()


def quiet_root_logger() -> None:
    """A handler on the root logger: dispy's own stderr handler (``dispy._UntilConfigured``)
    prints only while the root logger has none, so nothing is printed."""
    root = logging.getLogger()
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())


class ErrorLog(logging.Handler):
    """Keeps the ERROR records with a traceback of the loggers it is added to."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.ERROR)
        quiet_root_logger()
        self.records: list[tuple[str, BaseException | None]] = []
        for name in names:
            log = logging.getLogger(name)
            log.addHandler(self)
            log.propagate = False  # (no last-resort printing of the warnings)
            log.setLevel(logging.DEBUG)  # every log call builds its record, as in a daemon

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            self.records.append(
                (f"{record.name}: {record.getMessage()}\n{text}", record.exc_info[1])
            )

    def check(self, known: Known = NO_KNOWN) -> None:
        found, self.records = self.records, []
        found = [text for text, exc in found if exc is None or not known.match(exc)]
        if found:
            raise Finding("logged with a traceback:\n" + "\n".join(found))


class LoopErrors:
    """The event loop's exception handler: an exception in a callback, or a task's
    exception nobody retrieved, is kept (the default handler only logs it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.found: list[str] = []
        loop.set_exception_handler(self._handler)

    def _handler(self, loop, context: dict) -> None:
        exc = context.get("exception")
        text = context.get("message", "")
        if exc is not None:
            text += "\n" + "".join(traceback.format_exception(exc))
        self.found.append(text)

    def check(self) -> None:
        if self.found:
            found, self.found = self.found, []
            raise Finding("error on the event loop:\n" + "\n".join(found))


# -- a client session in memory ------------------------------------------------------
class FakeChannel:
    """What a daemon's session uses of ``transport.Channel``.  What is sent is checked
    (a kind a node sends, a control part that encodes, bytes-like payload) and kept."""

    def __init__(self, replies: frozenset, pack_ctl, closed_error) -> None:
        self.peer = "fuzz-client:40000"
        self.on_message = None
        self.on_close = None
        self.sent: list[tuple[int, dict]] = []
        self._replies = replies
        self._pack = pack_ctl
        self._closed_error = closed_error
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        pass

    def send(self, kind: int, ctl: dict, payload=(), sent=None) -> None:
        if self._closed:
            raise self._closed_error(f"connection to {self.peer} is closed")
        if kind not in self._replies:
            raise Finding(f"sent a message of kind {kind} to a client")
        try:
            self._pack(ctl)  # what the real channel does when it flushes, a loop turn later
            for part in payload:
                memoryview(part)
        except Exception as exc:
            raise Finding(f"sent a message that cannot be encoded: {exc!r}: {ctl!r}") from exc
        self.sent.append((kind, ctl))
        if sent is not None:  # (the real channel: once it handed the message over)
            sent()

    def flush(self) -> None:
        pass  # (what is sent is checked and kept at once)

    def close(self) -> None:
        self._closed = True

    def abort(self) -> None:
        self._closed = True


class Hang(Finding):
    pass


async def settle(session, limit: float = SETTLE_LIMIT) -> None:
    """Run the loop until the session's request queue is empty and no request is being
    handled (or its request task has ended).  Waits on what the request task waits on
    (a thread's result, a future): no polling sleeps."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    task = session._ops_task
    await asyncio.sleep(0)  # one loop turn, as between two reads: callbacks run (RESULTS)
    while not (session._ops.empty() and session._current is None) and not task.done():
        left = deadline - loop.time()
        if left <= 0:
            raise Hang(f"request {session._current!r} still running after {limit} s")
        waiter = getattr(task, "_fut_waiter", None)
        if waiter is not None and not waiter.done():
            await asyncio.wait([waiter], timeout=left)
        else:
            await asyncio.sleep(0)


async def drain_tasks(limit: float = SETTLE_LIMIT) -> None:
    """Run the loop until every other task has ended (what the session's close started)
    and the callbacks they scheduled ran."""
    me = asyncio.current_task()
    for _ in range(1000):
        others = [t for t in asyncio.all_tasks() if t is not me]
        if not others:
            break
        done, pending = await asyncio.wait(others, timeout=limit)
        if pending:
            raise Hang(f"{len(pending)} task(s) still running after {limit} s: {pending!r}")
    for _ in range(3):
        await asyncio.sleep(0)


async def run_session(owner, session_cls, replies, data: bytes, known, what: str) -> None:
    """Feed one input's messages (``_common.parse_session_input``) to a new
    ``session_cls(owner, channel)`` on a ``FakeChannel``, as the transport would:
    control parts decoded first, a ``DispyError`` (or a ``known`` finding) closing
    the connection; the loop settled after each message; the session closed at
    the end.  ``what`` names the owner in a finding."""
    import _common as C

    from dispy.errors import ConnectionClosed, DispyError, ProtocolError
    from dispy.protocol import Message, pack_ctl, unpack_ctl

    chan = FakeChannel(replies, pack_ctl, ConnectionClosed)
    session = session_cls(owner, chan)
    owner.sessions.add(session)  # as the daemon's _on_client does
    why = None
    for kind, raw, payload in C.parse_session_input(data):
        try:
            ctl = unpack_ctl(raw)
        except ProtocolError as exc:  # the connection fails before a session sees it
            why = exc
            break
        try:
            session.on_message(Message(kind, ctl, memoryview(payload)))
        except DispyError as exc:  # the transport closes the connection
            why = exc
            break
        except Exception as exc:
            if not known.match(exc):
                raise
            why = ProtocolError(f"message {kind} could not be handled")  # as the transport
            break
        await settle(session)
        if chan.is_closed:
            break
    await settle(session)
    chan.close()
    session.on_close(why)
    await drain_tasks()
    if session in owner.sessions:
        raise Finding(f"the session is still registered with the {what} after its close")


class SqliteFile:
    """A daemon's SQLite file (the node's result store, the scheduler's state), opened
    once for the process and shared by the inputs.  ``check()`` after each input: what
    the input queued must commit; a file whose writes fail for a known reason is
    opened again (its writer would retry the failing batch for ever)."""

    def __init__(self, opener, path: str) -> None:
        self.opener = opener
        self.path = path
        self.file = opener(path)

    def check(self, known: Known, error_cls) -> None:
        try:
            self.file.flush()
        except error_cls as exc:
            if not known.match(exc):
                raise Finding(f"the input left {self.path} unwritable: {exc}") from exc
            self.file.close()  # (its writer logs that the failing writes are lost)
            self.file = self.opener(self.path)


def clear_folder(folder: str, keep=()) -> None:
    """Remove what is in ``folder`` (not the folder itself), but the names in ``keep``."""
    import shutil

    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name in keep:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def scratch_folder(name: str) -> str:
    """A folder of this target's own: under $DISPY_FUZZ_SCRATCH (run.py sets it and
    removes it after the run), else one in the temporary folder, emptied first."""
    base = os.environ.get("DISPY_FUZZ_SCRATCH")
    if base:
        path = os.path.join(base, name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return os.path.realpath(path)
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"dispy-fuzz-{name}-{os.geteuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    clear_folder(path)
    return os.path.realpath(path)
