"""Attacks by another, unprivileged local user (uid 65534, via ``setpriv``) and
by the node's own user, on what a node keeps on this machine.

* The job-process socket (abstract namespace, listed in ``/proc/net/unix``):
  another user is cut off at once (``SO_PEERCRED``); a process of the node's
  own user that has no token may send only small frames; neither costs the
  node memory, and the node goes on serving.
* The node's folder (``--dest_path``), when another user made it first or put
  a symlink where the node's files go: the node refuses to start and says
  why, and touches nothing of the attacker's.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile

import psutil
import pytest

import dispy
from dispy.protocol import Kind
from dispy.protocol._framing import HEADER, LAYOUT_VERSION, MAGIC

from . import jobs
from .installed import program

NOBODY = 65534

# The attacker: connect to the node's job-process socket and stream a W_HELLO
# that claims 300 MiB; report how much went before the node closed it.
ATTACK = r"""
import socket, struct, sys
name, header = sys.argv[1], bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect("\0" + name)
sent = 0
chunk = b"\0" * 65536
try:
    s.sendall(header)
    while sent < 64 * 2**20:
        sent += s.send(chunk)
    print("ACCEPTED", sent)
except (BrokenPipeError, ConnectionResetError, socket.timeout) as e:
    print("CLOSED", sent, type(e).__name__)
"""


def _python_for(uid: int) -> str:
    """A Python interpreter that user ``uid`` may run (the test's own is often
    under /root, which others cannot enter)."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if not cand or not os.path.exists(cand):
            continue
        probe = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", cand, "-c", "0"],
            capture_output=True,
        )
        if probe.returncode == 0:
            return cand
    pytest.fail(f"no Python that uid {uid} can run: apt-get install python3-minimal")


def _as_user(uid: int, code: str, *args: str) -> str:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.fail("these tests need root and setpriv (util-linux) to act as another user")
    proc = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         _python_for(uid), "-c", code, *args],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _job_socket(pid: int) -> str:
    with open("/proc/net/unix") as f:
        for line in f:
            path = line.split()[-1]
            if path.startswith(f"@dispynode-{pid}-"):
                return path[1:]
    raise AssertionError(f"node {pid} has no job-process socket in /proc/net/unix")


def _big_hello() -> str:
    return HEADER.pack(MAGIC, LAYOUT_VERSION, int(Kind.W_HELLO), 0, 64, 300 * 2**20).hex()


@pytest.mark.parametrize("uid", [NOBODY, 0], ids=["other user", "node's own user"])
def test_job_process_socket_takes_nothing_from_strangers(node_factory, uid):
    node = node_factory(cpus=1)
    pid = node.proc.pid
    name = _job_socket(pid)
    before = psutil.Process(pid).memory_info().rss
    for _ in range(3):
        out = _as_user(uid, ATTACK, name, _big_hello()) if uid else _run_here(name)
        assert out.startswith("CLOSED"), out
        assert int(out.split()[1]) < 4 * 2**20, out  # cut off early, not after 300 MiB
    grown = psutil.Process(pid).memory_info().rss - before
    assert grown < 32 * 2**20, f"the node grew by {grown / 2**20:.0f} MiB"
    with dispy.JobCluster(jobs.double, nodes=[node.address], secret=node.secret) as cluster:
        assert cluster.submit(21)() == 42  # and it still serves


def _run_here(name: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", ATTACK, name, _big_hello()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def shared_tmp():
    """A world-writable sticky folder like /tmp, that uid 65534 can reach."""
    d = tempfile.mkdtemp(prefix="dispy-shared-", dir="/tmp")
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _sh_as(uid: int, script: str) -> None:
    proc = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sh", "-c", script],
        capture_output=True, text=True, timeout=30, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def _start(daemon: str, dest: str) -> subprocess.CompletedProcess:
    """Start the daemon on ``dest`` as the user would; it must refuse (exit 2) at once."""
    argv = {
        "dispynode": ["-i", "127.0.0.9", "--node_port", "0", "--no_discovery", "--dest_path"],
        "dispyscheduler": ["-i", "127.0.0.9", "-p", "0", "-n", "127.0.0.9", "--dest_path"],
    }[daemon]
    return subprocess.run(
        [*program(daemon), *argv, dest, "--daemon"],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, DISPY_SECRET="local-users"),
    )  # fmt: skip


@pytest.mark.parametrize("daemon", ["dispynode", "dispyscheduler"])
def test_a_folder_another_user_made_first_is_refused(shared_tmp, tmp_path, daemon):
    """uid 65534 makes the daemon's folder first, its database a symlink to a
    file of root's (and, second time, to where root would create one)."""
    victim = tmp_path / "victim"
    victim.write_text("root's own")
    victim.chmod(0o644)
    dest = os.path.join(shared_tmp, "dest")
    db = "results.db" if daemon == "dispynode" else "scheduler.db"
    for target in (victim, tmp_path / "made-by-the-daemon"):
        shutil.rmtree(dest, ignore_errors=True)
        _sh_as(NOBODY, f"mkdir -m 0777 {dest} && ln -s {target} {dest}/{db}")
        proc = _start(daemon, dest)
        assert proc.returncode == 2, proc.stderr
        assert f"--dest_path {dest} belongs to user {NOBODY}, not to this user (0)" in proc.stderr
        assert "remove it or choose another --dest_path" in proc.stderr
        assert stat.S_IMODE(victim.stat().st_mode) == 0o644 and victim.read_text() == "root's own"
        assert not (tmp_path / "made-by-the-daemon").exists()
        assert os.listdir(dest) == [db]  # nothing of the daemon's was put there


@pytest.mark.parametrize("daemon", ["dispynode", "dispyscheduler"])
def test_symlinks_where_the_daemons_files_go_are_refused(tmp_path, daemon):
    """The folder itself a symlink; or, in the daemon's own folder, its database a
    symlink (say, left by an earlier mistake): not followed, refused."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "dest-link"
    link.symlink_to(elsewhere)
    proc = _start(daemon, str(link))
    assert proc.returncode == 2 and f"--dest_path {link} is a symlink" in proc.stderr, proc.stderr
    own = tmp_path / "own"
    own.mkdir()
    db = "results.db" if daemon == "dispynode" else "scheduler.db"
    (own / db).symlink_to(tmp_path / "target.db")
    proc = _start(daemon, str(own))
    assert proc.returncode == 2, proc.stderr
    assert f"{own / db} is a symlink; remove it (it is not followed)" in proc.stderr
    assert not (tmp_path / "target.db").exists()


@pytest.mark.parametrize("where", ["back.txt", "sub/back.txt"])
def test_a_file_from_a_job_is_not_written_through_a_symlink(node_factory, tmp_path, where, caplog):
    """dispy_send_file: the client writes the file under its dest_path; a symlink
    put there (the file itself, or a folder on its way) is not followed out."""
    node = node_factory(cpus=1)
    dest = tmp_path / "client-dest"
    dest.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "back.txt").write_text("not to be overwritten")
    if where == "back.txt":
        (dest / "back.txt").symlink_to(victim / "back.txt")
    else:
        (dest / "sub").symlink_to(victim)
    cluster = dispy.JobCluster(
        jobs.send_back, nodes=[node.address], secret=node.secret, dest_path=str(dest)
    )
    with cluster:
        job = cluster.submit(where, "from the node")
        assert job(timeout=60) == 0, job.exception
    # the write was tried before the job ended, and refused
    assert (victim / "back.txt").read_text() == "not to be overwritten"
    assert any("escapes" in r.getMessage() for r in caplog.records), caplog.text
