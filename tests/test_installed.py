"""The installed product, used as users use it.

The wheel in a fresh venv with an empty HOME (``tests/installed.py``); every
program setup.cfg declares run by its full path with the venv not activated;
``dispynode``, ``dispyscheduler`` and ``dispynetrelay`` started by their
console-script names, both spellings, on hosts made of network namespaces;
dispy's documented programs (``tests/seed_programs``) run unchanged against
them from their own folder, finding the nodes by broadcast, the secret in
``$DISPY_SECRET``; the ``dispy``/``dispy.py`` command line with ``-f``/``-a``;
README's demo command word for word.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from .installed import ROOT, copy_checkout, declared_programs, make_venv
from .netns import NetnsUnavailable, Network, read_lines, wait_for_line

SEEDS = Path(__file__).resolve().parent / "seed_programs"
SECRET = "installed-product-secret"
TIMEOUT = 180


# ------------------------------------------------------------- console scripts


@pytest.mark.parametrize("name", declared_programs())
def test_console_script_help_by_full_path(installed, name, tmp_path):
    """Not activated, from a folder of no importance, nothing of ours in the
    environment: ``<venv>/bin/<name> --help`` answers and names its program."""
    proc = subprocess.run(
        [installed.script(name), "--help"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env=installed.env(activated=False),
    )  # fmt: skip
    assert proc.returncode == 0, f"{name} --help failed:\n{proc.stderr}"
    prog = name.removesuffix(".py")
    assert f"usage: {prog}" in proc.stdout, proc.stdout


def test_a_program_started_from_bin_imports_the_packages(installed, tmp_path):
    """Any program whose script lies in the venv's bin/ (pytest, ipython...) has
    that folder first on sys.path, where ``dispy.py`` and ``dispynode.py`` lie."""
    probe = installed.bin / "dispy-import-probe"
    probe.write_text(
        f"#!{installed.python}\n"
        "import dispy, dispynode, dispyscheduler, dispynetrelay\n"
        "print(dispy.JobCluster.__name__, dispynode.__path__[0], dispy.__path__[0])\n"
    )
    probe.chmod(0o755)
    try:
        proc = subprocess.run(
            [str(probe)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env=installed.env(),
        )  # fmt: skip
    finally:
        probe.unlink()
    assert proc.returncode == 0, proc.stderr
    name, node_pkg, dispy_pkg = proc.stdout.split()
    assert name == "JobCluster" and "site-packages" in node_pkg and "site-packages" in dispy_pkg


def test_readme_demo_command_word_for_word(tmp_path):
    """README's first command, in a checkout, a new venv activated, HOME empty."""
    readme = (ROOT / "README.rst").read_text()
    command = "pip install . && DISPY_NODES=local python examples/sample.py"
    assert f"    {command}\n" in readme, "README's demo command changed: update this test"
    src = copy_checkout(tmp_path / "checkout")
    home = tmp_path / "home"
    home.mkdir()
    venv_bin = make_venv(tmp_path / "venv")
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("PIP_") or k == "DISPY_BROADCAST_ONLY_IN_NETNS"
    }
    env.update(HOME=str(home), PATH=f"{venv_bin}:/usr/local/bin:/usr/bin:/bin", LANG="C.UTF-8")
    env["VIRTUAL_ENV"] = str(venv_bin.parent)
    cache = subprocess.run(
        [str(venv_bin / "python"), "-m", "pip", "cache", "dir"], capture_output=True, text=True
    )
    if cache.returncode != 0 or not os.path.isdir(cache.stdout.strip()):
        # the new HOME has no download cache: lend it the machine's
        env["PIP_CACHE_DIR"] = os.path.expanduser("~/.cache/pip")
    proc = subprocess.run(
        ["bash", "-c", command], cwd=src, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (
        f"{command!r} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    lines = re.findall(r"^\S+ executed job (\d+) at \S+ with (\d+)$", proc.stdout, re.M)
    assert sorted(int(i) for i, _ in lines) == list(range(20)), proc.stdout
    assert all(5 <= int(n) <= 20 for _, n in lines)


# ------------------------------------------------------------ hosts of the tier


class Hosts:
    """Client host ``c`` and two node hosts on subnet a: ``n1`` runs ``dispynode``,
    ``n2`` runs ``dispynode.py`` (both found by broadcast); subnet b behind
    router ``r``, with ``far`` (a ``dispynode``) and ``relay`` (no daemon until a
    test starts one)."""

    def __init__(self, installed, base: Path):
        self.installed = installed
        self.base = base
        self.net = Network()
        net = self.net
        self.c = net.add_host("ic", "a")
        self.n1 = net.add_host("in1", "a")
        self.n2 = net.add_host("in2", "a")
        net.add_router("ir", ("a", "b"))
        self.relay = net.add_host("irelay", "b")
        self.far = net.add_host("ifar", "b")
        self.nodes = {
            "n1": self.start_node(self.n1, "dispynode"),
            "n2": self.start_node(self.n2, "dispynode.py"),
            "far": self.start_node(self.far, "dispynode"),
        }

    def env(self, **extra):
        return self.installed.netns_env(DISPY_SECRET=SECRET, PYTHONUNBUFFERED="1", **extra)

    def start_node(self, host, script: str):
        proc = host.popen(
            [self.installed.script(script), "-c", "2", "--daemon",
             "--dest_path", str(self.base / f"dest-{host.name}")],
            env=self.env(), stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for_line(proc, r"^dispynode ready: .*cpus=2", timeout=60)
        return proc

    def daemon(self, host, argv, ready: str):
        proc = host.popen(argv, env=self.env(), stderr=subprocess.STDOUT)
        wait_for_line(proc, ready, timeout=60)
        return proc

    def stop(self, proc) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def workdir(self, name: str) -> Path:
        d = self.base / "work" / name
        d.mkdir(parents=True)
        return d

    def run(self, argv, cwd: Path, timeout: float = TIMEOUT, **env) -> subprocess.CompletedProcess:
        """Run ``argv`` on the client host from ``cwd``; fail with its output
        (and the nodes') unless it exits 0."""
        try:
            proc = self.c.run(argv, timeout=timeout, env=self.env(**env), cwd=str(cwd))
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"{argv} did not end in {timeout} s:\n{e.stdout}\n{e.stderr}\n{self.logs()}"
            ) from None
        assert proc.returncode == 0, (
            f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n{self.logs()}"
        )
        return proc

    def logs(self) -> str:
        out = []
        for name, proc in self.nodes.items():
            out.append(f"--- node {name}:")
            out.extend(read_lines(proc)[-30:])
        return "\n".join(out)

    def run_seed(self, name: str, *args: str, **kw) -> str:
        work = self.workdir(name.removesuffix(".py"))
        shutil.copy(SEEDS / name, work / name)
        return self.run([self.installed.python, name, *args], cwd=work, **kw).stdout


@pytest.fixture(scope="module")
def hosts(installed, tmp_path_factory):
    try:
        h = Hosts(installed, tmp_path_factory.mktemp("tier"))
    except NetnsUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield h
    finally:
        h.net.close()


# ------------------------------------------------------- dispy's programs, as is


@pytest.mark.netns
@pytest.mark.parametrize("name", ["sample.py", "tutorial.py"])
def test_canonical_program_and_tutorial(hosts, name):
    out = hosts.run_seed(name)
    lines = re.findall(r"^(\S+) executed job (\d+) at (\S+) with (\d+)$", out, re.M)
    assert sorted(int(i) for _, i, _, _ in lines) == list(range(20)), out
    assert all(5 <= int(n) <= 20 for *_, n in lines)
    if name == "sample.py":  # print_status names the nodes (20 tiny jobs: one may do all)
        assert hosts.n1.ip in out or hosts.n2.ip in out, out


@pytest.mark.netns
def test_distributing_objects(hosts):
    out = hosts.run_seed("obj_instances.py")
    rows = re.findall(r"^(\d+): (\d\.\d\d) / (\d+): (\d\.\d\d)$", out, re.M)
    assert sorted(int(r[0]) for r in rows) == list(range(10)), out
    assert all(r[0] == r[2] and r[1] == r[3] and 1 <= float(r[1]) <= 3 for r in rows)


@pytest.mark.netns
def test_in_memory_processing_with_setup(hosts):
    """6.5: setup reads the program itself into a global; names such as ``os``
    are used without an import, as on dispy's nodes."""
    out = hosts.run_seed("node_setup.py")
    data = (SEEDS / "node_setup.py").read_bytes()
    rows = re.findall(r"^(\d+): (\w+) : ([0-9a-f]+)$", out, re.M)
    # the shake_* digests need a length: those jobs fail and are not printed.  Job n
    # uses list(algorithms_guaranteed)[n % 14], a set's order, which each node's
    # computation process draws from its own hash seed: up to 2 shakes among the
    # first 10 on each of the 2 nodes (8 rows were expected: flaky, 7 seen once)
    assert len(rows) >= 10 - 2 * 2, out
    for _, alg, digest in rows:
        assert not alg.startswith("shake") and hashlib.new(alg, data).hexdigest() == digest


@pytest.mark.netns
def test_updating_globals_shared_per_node(hosts):
    out = hosts.run_seed("node_shvars.py")
    rows = re.findall(r"^(\d+): (\d+)$", out, re.M)
    assert sorted(int(i) for i, _ in rows) == list(range(10)), out
    assert "failed" not in out
    assert all(int(v) >= 2 for _, v in rows)


@pytest.mark.netns
def test_sending_files_to_client(hosts):
    """6.7 as printed sends a file it never writes: each job fails (its stderr
    says why) and the program, which prints without waiting, ends normally."""
    out = hosts.run_seed("files_to_client.py")
    assert re.findall(r"^job (\d+) results in file \1\.dat$", out, re.M) == [
        str(i) for i in range(20)
    ]


@pytest.mark.netns
def test_job_scheduler_with_cluster_status_callback(hosts):
    work = hosts.workdir("job_scheduler")
    shutil.copy(SEEDS / "job_scheduler.py", work)
    sums = {}
    for i in range(8):
        data = os.urandom(100_000 + i)
        (work / f"data{i:03d}").write_bytes(data)
        sums[f"data{i:03d}"] = hashlib.sha1(data).hexdigest()
    proc = hosts.c.popen(
        [hosts.installed.python, "job_scheduler.py"], env=hosts.env(), cwd=str(work),
        stdin=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    got = {}
    while len(got) < len(sums):
        m = wait_for_line(proc, r"^sha1sum for (data\d{3})(:| failed:) (.*)$", timeout=TIMEOUT)
        got[m.group(1)] = m.group(3)
    proc.stdin.write("quit\n")
    proc.stdin.flush()
    assert proc.wait(TIMEOUT) == 0, "\n".join(read_lines(proc))
    assert got == sums
    assert any(re.match(r"^node \S+ with 2 CPUs available$", line) for line in read_lines(proc))


@pytest.mark.netns
def test_bounded_submission(hosts):
    out = hosts.run_seed("bounded_submit.py", timeout=300)
    total = sum(int(m) for m in re.findall(r"^\s*\S.* \|\s+\d+ \|\s+(\d+) \|", out, re.M))
    assert total == 1001, out


@pytest.mark.netns
def test_python_script_runs_a_program_per_submit(hosts):
    work = hosts.workdir("python_script")
    outdir = work / "out"
    outdir.mkdir()
    program = work / "program"
    program.write_text(f"#!/bin/sh\necho ran $1 > {outdir}/$1\n")
    program.chmod(0o755)
    text = (SEEDS / "python_script.py").read_text()
    (work / "python_script.py").write_text(text.replace("/path/to/program", str(program)))
    hosts.run([hosts.installed.python, "python_script.py"], cwd=work)
    assert sorted(int(p.name) for p in outdir.iterdir()) == list(range(50))


CRASHING_CLIENT = """
import sys, time, dispy

def compute(n):
    import time
    time.sleep(float(sys.argv[1]))
    return n * 10

cluster = dispy.JobCluster(compute, nodes=sys.argv[2:])
jobs = [cluster.submit(i) for i in range(2)]
for job in jobs:
    job.id = 'job%d' % jobs.index(job)
while any(j.status != dispy.DispyJob.Running for j in jobs):
    time.sleep(0.05)  # poll interval: dispy has no wait-for-Running
print('running', flush=True)
sys.stdin.readline()
"""


@pytest.mark.netns
@pytest.mark.parametrize("seed", ["recover_jobs.py", "recover_nodes.py"])
def test_recover_jobs_after_the_client_crashed(hosts, seed):
    """6.11: a client killed -9 with two jobs running; dispy's recovery program,
    run from the client's folder, gets their results (6.11's first program) or
    frees the nodes at once (its second)."""
    work = hosts.workdir(f"recover-{seed}")
    (work / "client.py").write_text(CRASHING_CLIENT)
    shutil.copy(SEEDS / seed, work)
    sleep = "3" if seed == "recover_jobs.py" else "60"
    client = hosts.c.popen(
        [hosts.installed.python, "client.py", sleep, hosts.n1.ip, hosts.n2.ip],
        env=hosts.env(), cwd=str(work), stdin=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_line(client, r"^running$", timeout=TIMEOUT)
    client.kill()
    client.wait(30)
    out = hosts.run([hosts.installed.python, seed], cwd=work).stdout
    results = sorted(re.findall(r"^Job result: (\S+)$", out, re.M))
    if seed == "recover_jobs.py":
        assert results == ["0", "10"], out
    else:
        assert results == ["None", "None"], out


# -------------------------------------------------------------- the command line


@pytest.mark.netns
@pytest.mark.parametrize("cli", ["dispy.py", "dispy"])
def test_command_line_runs_a_program_per_argument_set(hosts, cli):
    """6.1: ``dispy.py -f /some/file1 -f file2 -a "arg11 arg12" -a "arg21 arg22"
    -a "arg3" /some/program``, with real files for the placeholders."""
    work = hosts.workdir(f"cli-{cli}")
    some = work / "some"
    some.mkdir()
    (some / "file1").write_text("first\n")
    (work / "file2").write_text("second\n")
    program = some / "program"
    program.write_text('#!/bin/sh\necho "args:$*"; cat file1 file2\n')
    program.chmod(0o755)
    argv = [hosts.installed.script(cli), "-f", str(some / "file1"), "-f", "file2",
            "-a", "arg11 arg12", "-a", "arg21 arg22", "-a", "arg3", str(program)]  # fmt: skip
    out = hosts.run(argv, cwd=work).stdout
    for args in ("arg11 arg12", "arg21 arg22", "arg3"):
        assert f"args:{args}\nfirst\nsecond\n" in out, out


# ------------------------------------------------------ scheduler and relay


SHARED_TUTORIAL_CHANGE = ("dispy.JobCluster(compute)", "dispy.SharedJobCluster(compute)")


@pytest.mark.netns
@pytest.mark.parametrize("script", ["dispyscheduler", "dispyscheduler.py"])
def test_tutorial_through_dispyscheduler(hosts, script):
    """004: the tutorial with ``SharedJobCluster`` (its one change) against a
    dispyscheduler on the client's host that finds the nodes by broadcast."""
    sched = hosts.daemon(
        hosts.c,
        [
            hosts.installed.script(script),
            "--daemon",
            "--dest_path",
            str(hosts.base / f"sched-{script}"),
        ],
        r"^dispyscheduler ready",
    )
    try:
        work = hosts.workdir(f"shared-{script}")
        text = (SEEDS / "tutorial.py").read_text()
        assert SHARED_TUTORIAL_CHANGE[0] in text
        (work / "tutorial.py").write_text(text.replace(*SHARED_TUTORIAL_CHANGE))
        out = hosts.run([hosts.installed.python, "tutorial.py"], cwd=work).stdout
        lines = re.findall(r"^\S+ executed job (\d+) at \S+ with (\d+)$", out, re.M)
        assert sorted(int(i) for i, _ in lines) == list(range(20)), out
    finally:
        hosts.stop(sched)


RELAY_CLIENT = """
import sys, dispy

def compute(n):
    return n * n

cluster = dispy.JobCluster(compute, nodes=sys.argv[1:])
jobs = [cluster.submit(i) for i in range(6)]
print([job() for job in jobs], sorted({job.ip_addr for job in jobs}))
cluster.close()
"""


@pytest.mark.netns
@pytest.mark.parametrize("script", ["dispynetrelay", "dispynetrelay.py"])
def test_nodes_of_another_network_through_dispynetrelay(hosts, script):
    """6.12: ``nodes=['<relay>', '10.231.2.*']``: the relay on the far network
    brings in its node."""
    relay = hosts.daemon(
        hosts.relay, [hosts.installed.script(script), "--daemon"], r"^dispynetrelay ready"
    )
    try:
        work = hosts.workdir(f"relay-{script}")
        (work / "client.py").write_text(RELAY_CLIENT)
        wildcard = hosts.far.ip.rsplit(".", 1)[0] + ".*"
        out = hosts.run(
            [hosts.installed.python, "client.py", hosts.relay.ip, wildcard], cwd=work
        ).stdout
        assert out.strip() == f"[0, 1, 4, 9, 16, 25] ['{hosts.far.ip}']", out
    finally:
        hosts.stop(relay)
