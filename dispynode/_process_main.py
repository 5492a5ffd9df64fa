"""The computation process and its job processes (run on the node).

::

    dispynode (asyncio)                     computation process (``main`` below)
      |-- control socket pair -------------->  C_LOAD: unpickle the computation,
      |   (C_LOAD, C_FORK, C_CLEANUP)            run setup once (its globals live here)
      |<-- C_READY, C_EXITED ----------------    C_FORK: fork job processes, which
      |                                          inherit setup's globals (copy-on-write)
      |                                               |
      |<== unix socket per job process ==============/  W_HELLO (token), then
            W_JOB (arguments, not unpickled by the daemon) / W_RESULT;
            W_SKIP: drop a job sent ahead, if it has not started (the
            reply says which, before the next result)

Job processes are warm: each runs jobs one after another, so a tiny job
costs a message, not a process start.  A job that crashes its process ends as
Terminated; the computation process reports the exit status and the daemon
asks for a replacement.  The job's arguments and result are pickles the node
daemon only forwards; they are unpickled here, in the job process.
"""

from __future__ import annotations

import builtins
import collections
import importlib.util
import io
import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
import types

from dispy import _data as dispy_data
from dispy import serialize
from dispy._channel import LOCAL_SNDBUF, BlockingChannel
from dispy.core import jobstate
from dispy.errors import ConnectionClosed
from dispy.protocol import Kind, join_segments, split_segments, texts_out


def _format_exc(exc: BaseException, skip: int = 1) -> str:
    tb = exc.__traceback__
    for _ in range(skip):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


class _Runner:
    """Runs one job in this (job) process and returns (status, result, exc_text)."""

    def __init__(self, spec, comp_dir: str) -> None:
        self.spec = spec
        self.comp_dir = comp_dir
        self.output = (b"", b"")  # a program's stdout and stderr
        if spec.program:
            prog = os.path.join(comp_dir, spec.program)
            self.cmd = [sys.executable, prog] if prog.endswith(".py") else [prog]

    def run(self, args, kwargs):
        if self.spec.program:
            proc = subprocess.run(
                self.cmd + [str(a) for a in args],
                cwd=self.comp_dir,
                capture_output=True,
                stdin=subprocess.DEVNULL,
            )
            # as in dispy, a program's job.stdout / job.stderr are its own bytes
            self.output = (proc.stdout, proc.stderr)
            return jobstate.Finished, proc.returncode, None
        try:
            return jobstate.Finished, self.spec.func(*args, **kwargs), None
        except BaseException as exc:  # the user's code may raise anything, SystemExit too
            return jobstate.Terminated, None, _format_exc(exc)

    def run_chunk(self, items):
        """``cluster.map(..., chunksize=N)``: each item's argument tuple in turn; the
        list of their results, or the first failure (which item, and why)."""
        results = []
        for i, item in enumerate(items):
            status, result, exc_text = self.run(item, {})
            if status != jobstate.Finished:
                return status, None, f"item {i} of the chunk: {exc_text}"
            results.append(result)
        return jobstate.Finished, results, None


class _JobContext:
    """The running job, for the ``dispy_*`` functions its code calls."""

    chan: BlockingChannel | None = None
    jid: int | None = None
    comp_dir = ""
    max_file_size = 0


_CTX = _JobContext()


def dispy_provisional_result(result, timeout=None) -> int:
    """Send ``result`` to the client now, as a provisional result of this job.

    The client's job gets status ProvisionalResult (its callback runs); the
    job goes on.  Returns 0, or -1 if not inside a job or ``result`` cannot be
    pickled (the reason goes to the job's stderr).
    """
    if _CTX.chan is None:
        print("dispy_provisional_result: not called from a running job", file=sys.stderr)
        return -1
    try:
        segs = serialize.dumps(result)
    except Exception as exc:
        print(f"dispy_provisional_result: result cannot be pickled: {exc}", file=sys.stderr)
        return -1
    lens, flat = join_segments([segs])
    _CTX.chan.send(Kind.W_PROVISIONAL, {"j": _CTX.jid, "s": lens}, flat)
    return 0


def dispy_send_file(path, timeout=None) -> int:
    """Send the file at ``path`` to the client, which writes it at the same path
    relative to its working directory (a path outside the job's folder keeps
    only its name).  Returns 0, or -1 (reason on the job's stderr)."""
    if _CTX.chan is None:
        print("dispy_send_file: not called from a running job", file=sys.stderr)
        return -1
    try:
        full = os.path.abspath(path)
        size = os.path.getsize(full)
        if _CTX.max_file_size and size > _CTX.max_file_size:
            print(
                f"dispy_send_file: {path!r} has {size} bytes, more than the limit of "
                f"{_CTX.max_file_size} (dispynode --max_file_size)",
                file=sys.stderr,
            )
            return -1
        with open(full, "rb") as f:
            data = f.read()
        mode = os.stat(full).st_mode & 0o777
    except OSError as exc:
        print(f"dispy_send_file: cannot read {path!r}: {exc}", file=sys.stderr)
        return -1
    base = os.path.realpath(_CTX.comp_dir) + os.sep
    real = os.path.realpath(full)
    rel = real[len(base) :] if real.startswith(base) else os.path.basename(real)
    _CTX.chan.send(Kind.W_SENDFILE, {"j": _CTX.jid, "p": rel, "m": mode}, [data])
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is logged (the job's capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _job_logger() -> logging.Logger:
    log = logging.getLogger("dispynode.job")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def _job_process(addr: str, token: bytes, cid: str, spec, comp_dir: str, load: dict) -> None:
    """Body of a forked job process; never returns."""
    code = 0
    try:
        _die_with_parent()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_SNDBUF)  # (large results)
        sock.connect(addr)
        chan = BlockingChannel(sock)
        chan.send(Kind.W_HELLO, {"c": cid, "t": token, "p": os.getpid()})
        runner = _Runner(spec, comp_dir)
        _CTX.chan, _CTX.comp_dir = chan, comp_dir
        _CTX.max_file_size = load.get("max_file_size", 0)
        real_out, real_err = sys.stdout, sys.stderr
        # Jobs the daemon sent ahead wait here; each starts as soon as the one before
        # ended.  A W_SKIP drops one only if it came before that one's result went
        # out (the skip is said first): so when the daemon reads a result, the job
        # this process runs now is the next one it sent and did not see skipped.
        pending: collections.deque = collections.deque()
        while True:
            if not pending:
                try:
                    _take(chan, [chan.recv()], pending, skips=False)
                except ConnectionClosed:
                    break
                continue
            msg = pending.popleft()
            ctl = msg.ctl
            jid = _CTX.jid = ctl["j"]
            out, err = io.StringIO(), io.StringIO()
            t0 = time.time()
            try:
                args, kwargs = serialize.loads(split_segments(msg.payload, ctl["s"]))
            except Exception as exc:
                hint = ""
                if "on <module '__main__'" in str(exc):
                    hint = "; define that class or function in depends=[...] of the cluster"
                status, result = jobstate.Terminated, None
                exc_text = f"cannot unpickle the job's arguments on the node: {exc}{hint}"
            else:
                del msg
                sys.stdout, sys.stderr = out, err
                try:
                    if ctl.get("m"):
                        status, result, exc_text = runner.run_chunk(args[0])
                    else:
                        status, result, exc_text = runner.run(args, kwargs)
                finally:
                    sys.stdout, sys.stderr = real_out, real_err
                del args, kwargs
            t1 = time.time()
            try:
                segs = serialize.dumps(result)
            except Exception as exc:
                status, segs = jobstate.Terminated, serialize.dumps(None)
                exc_text = f"the job's result cannot be pickled: {exc}"
            reply = {
                "j": jid,
                "st": status,
                "t0": t0,
                "t1": t1,
            }
            if runner.spec.program:
                reply["o"], reply["e"] = runner.output
                runner.output = (b"", b"")
            else:
                if out.tell():
                    reply["o"] = out.getvalue()
                if err.tell():
                    reply["e"] = err.getvalue()
            if exc_text:
                reply["x"] = exc_text
            del out, err
            reply, segs = texts_out(reply, segs)  # a long output goes as a segment
            reply["s"], segs = join_segments([segs])
            try:  # skipped jobs are said first: the daemon then knows which one runs next
                _take(chan, chan.recv_nowait(), pending, skips=True)
            except ConnectionClosed:
                break
            chan.send(Kind.W_RESULT, reply, segs)
            del result, segs
    except BaseException:  # report anything on the node's stderr, then die quietly
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _take(chan: BlockingChannel, msgs: list, pending: collections.deque, skips: bool) -> None:
    """Queue the jobs among ``msgs``; with ``skips``, drop those a W_SKIP names (and
    say so); a W_SKIP otherwise comes too late (its job runs) and is ignored."""
    for msg in msgs:
        if msg.kind == Kind.W_JOB:
            pending.append(msg)
        elif msg.kind == Kind.W_SKIP and skips:
            jid = msg.ctl.get("j")
            for job in pending:
                if job.ctl["j"] == jid:
                    pending.remove(job)
                    chan.send(Kind.W_RESULT, {"j": jid, "st": jobstate.Cancelled, "k": 1, "s": []})
                    break


def _die_with_parent() -> None:
    """Linux: SIGKILL this job process if the computation process dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# Modules a computation may use without importing them, as on dispy's nodes
# (which run setup, compute and cleanup in the node's own module namespace):
# dispy's examples call os.getpid() or time.sleep() bare.  Fallbacks only,
# never shadowing a name of the computation's own.
FALLBACK_MODULES = (
    "os sys time socket hashlib re glob shutil pickle io signal platform copy struct "
    "threading subprocess multiprocessing traceback tempfile marshal stat errno"
).split()


def _fallback_module(name: str) -> types.ModuleType | None:
    """``name`` if imported already, else a module imported on its first use."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return None
    spec.loader = importlib.util.LazyLoader(spec.loader)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _install_main(spec, ctl: dict) -> None:
    """Give this process a fresh ``__main__`` holding the computation's names, so
    pickles that refer to ``__main__.SomeClass`` resolve here as on the client."""
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    extra = {
        "dispy_node_name": ctl.get("node_name", ""),
        "dispy_node_ip_addr": ctl.get("node_ip", ""),
        "dispy_job_path": os.getcwd(),
        "dispy_provisional_result": dispy_provisional_result,
        "dispy_send_file": dispy_send_file,
        "dispynode_logger": _job_logger(),
    }
    g = getattr(spec.func, "__globals__", None)
    for target in (main.__dict__, g):
        if target is None:
            continue
        target.update(extra)
        for name, obj in spec.objects.items():
            target.setdefault(name, obj)
        for name in FALLBACK_MODULES:
            if name not in target:
                mod = _fallback_module(name)
                if mod is not None:
                    target[name] = mod
    if spec.func is not None:
        main.__dict__.setdefault(getattr(spec.func, "__name__", "compute"), spec.func)


def _setup_failure(ctl_chan: BlockingChannel, text: str) -> None:
    ctl_chan.send(Kind.C_READY, {"ok": False, "r": text})
    os._exit(3)


def main(argv: list[str]) -> None:
    import cloudpickle  # only needed here, not in the daemon

    ctl_sock = socket.socket(fileno=int(argv[1]))
    chan = BlockingChannel(ctl_sock)
    try:  # (a spare started ahead waits here until a client's computation comes)
        msg = chan.recv()
    except ConnectionClosed:  # the daemon stopped before a computation came
        return
    ctl = msg.ctl
    comp_dir = ctl["dir"]
    os.chdir(comp_dir)
    sys.path.insert(0, comp_dir)

    # a fresh __main__ before unpickling: by-value code may refer to it
    sys.modules["__main__"] = types.ModuleType("__main__")
    nargs = ctl.get("sa", 0)
    body = msg.payload
    try:
        spec = cloudpickle.loads(body[: len(body) - nargs])
        setup_args = cloudpickle.loads(body[len(body) - nargs :]) if nargs else ()
    except BaseException as exc:
        _setup_failure(
            chan,
            f"cannot load the computation on the node: {_format_exc(exc, 0)}"
            "(modules it needs must be installed on the node or listed in depends)",
        )
    del msg
    serialize.restore_filenames(spec)
    _install_main(spec, ctl)
    dispy_data.DATA_DIR = os.path.join(comp_dir, ".dispy_data")
    if spec.setup is not None:
        try:
            ret = spec.setup(*setup_args)
        except BaseException as exc:
            _setup_failure(chan, f"setup raised an exception:\n{_format_exc(exc)}")
        if ret not in (0, None):
            _setup_failure(chan, f"setup returned {ret!r} (0 or None means success)")
    chan.send(Kind.C_READY, {"ok": True})
    _serve(chan, ctl, spec, comp_dir)


def _serve(chan: BlockingChannel, ctl: dict, spec, comp_dir: str) -> None:
    addr, token, cid = ctl["addr"], ctl["token"], ctl["cid"]
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sel = selectors.DefaultSelector()
    sel.register(chan.sock, selectors.EVENT_READ, "ctl")
    sel.register(rfd, selectors.EVENT_READ, "sig")
    children: set[int] = set()
    while True:
        for key, _ in sel.select():
            if key.data == "sig":
                os.read(rfd, 512)
                _reap(chan, children)
                continue
            try:
                events = chan.recv_available()
            except (ConnectionClosed, ConnectionError):  # reset: the daemon was killed
                events = None
            if events is None:  # the daemon is gone: stop everything
                _stop(children, 1.0, rfd)
                os._exit(0)
            for msg in events:
                if msg.kind == Kind.C_FORK:
                    for _ in range(msg.ctl["n"]):
                        pid = os.fork()
                        if pid == 0:
                            sel.close()
                            os.close(rfd)
                            os.close(wfd)
                            signal.set_wakeup_fd(-1)
                            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                            chan.sock.close()
                            _job_process(addr, token, cid, spec, comp_dir, ctl)
                        children.add(pid)  # (each says who it is in its W_HELLO)
                elif msg.kind == Kind.C_CLEANUP:
                    _stop(children, msg.ctl.get("grace", 3.0), rfd)
                    text = None
                    if spec.cleanup is not None:
                        try:
                            spec.cleanup()
                        except BaseException as exc:
                            text = f"cleanup raised an exception:\n{_format_exc(exc)}"
                    chan.send(Kind.C_READY, {"ok": text is None, "r": text or ""})
                    os._exit(0)


def _reap(chan: BlockingChannel, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        chan.send(Kind.C_EXITED, {"p": pid, "c": os.waitstatus_to_exitcode(status)})


def _signal_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop(children: set[int], grace: float, wakeup_fd: int) -> None:
    """Terminate job processes: SIGTERM, then SIGKILL after ``grace`` seconds.

    Waits on the SIGCHLD wake-up pipe, so it returns as soon as all are gone.
    """
    _signal_all(children, signal.SIGTERM)
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while children:
        while children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            children.discard(pid)
        if not children:
            break
        left = deadline - time.monotonic()
        if left <= 0 and sig == signal.SIGTERM:
            sig = signal.SIGKILL
            _signal_all(children, sig)
            deadline = time.monotonic() + grace
            continue
        if left <= 0:
            break  # unkillable (stuck in the kernel): give up waiting
        ready, _, _ = select.select([wakeup_fd], [], [], left)
        if ready:
            os.read(wakeup_fd, 512)


if __name__ == "__main__":
    main(sys.argv)
