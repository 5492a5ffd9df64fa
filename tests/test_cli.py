"""The command lines: dispynode's options and the dispy program runner."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import dispy

from . import jobs
from .conftest import EXAMPLES
from .installed import program


def _run(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _installed(name, *args, env=None, timeout=60):
    """The installed console script ``name``, as a user starts it."""
    return subprocess.run(
        [*program(name), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_dispy_cli_runs_program_per_argument_set(node):
    env = dict(os.environ, DISPY_SECRET=node.secret)
    proc = _installed(
        "dispy", "-n", node.address, "-a", "3", "-a", "12",
        os.path.join(EXAMPLES, "square.py"), env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "exit status 0\n9\n" in proc.stdout and "exit status 0\n144\n" in proc.stdout


def test_dispy_cli_missing_program():
    proc = _installed("dispy.py", "-n", "local", "/no/such/program")
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_dispynode_bad_port_is_a_clear_error():
    proc = _installed("dispynode", "--node_port", "70000", "--daemon")
    assert proc.returncode == 2 and "not a port number" in proc.stderr


def test_dispynode_port_in_use(node):
    proc = _installed("dispynode.py", "-i", node.ip_addr, "--node_port", str(node.port), "--daemon")
    assert proc.returncode == 2 and "try --node_port" in proc.stderr


def test_dispynode_negative_cpus_and_serve(node_factory):
    ncpu = os.cpu_count()
    n = node_factory(cpus=-1 if ncpu > 1 else 1, secret="s", extra_args=("--serve", "1"))
    with dispy.JobCluster(jobs.double, nodes=[n.address], secret="s") as cluster:
        assert cluster.submit(2)(timeout=30) == 4
        nodes, _ = cluster.status()
        assert nodes[0].cpus == max(1, ncpu - 1)
    # --serve 1: the node exits once its one client is gone
    assert n.proc.wait(30) == 0


def test_dispy_cli_local_cluster_and_failure_status(tmp_path):
    prog = tmp_path / "fails.sh"
    prog.write_text("#!/bin/sh\necho about to fail $1\nexit 3\n")
    prog.chmod(0o755)
    proc = _installed("dispy", "--local", "-a", "x", str(prog))
    assert proc.returncode == 1, proc.stderr
    assert "exit status 3" in proc.stdout and "about to fail x" in proc.stdout
    assert "speedup" in proc.stdout  # the cluster status is printed at the end


def test_dispynode_config_file_round_trip(tmp_path):
    cfg = tmp_path / "node.toml"
    proc = _installed(
        "dispynode", "-i", "127.0.0.1", "-c", "1", "--zombie_interval", "2.5",
        "-s", "never-saved", "--save_config", str(cfg),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = cfg.read_text()
    assert 'ip_addr = ["127.0.0.1"]' in text and "zombie_interval = 2.5" in text
    assert "never-saved" not in text  # secrets stay out of config files
    # the file's options are used; the command line wins over them
    n = dispy.LocalNode(cpus=None, secret="c", extra_args=("--config", str(cfg))).start()
    try:
        with dispy.JobCluster(jobs.double, nodes=[n.address], secret="c") as cluster:
            assert cluster.submit(4)(timeout=30) == 8
            assert cluster.status()[0][0].cpus == 1
    finally:
        n.stop()
    bad = tmp_path / "bad.toml"
    bad.write_text('secret = "x"\n')
    proc = _installed("dispynode", "--config", str(bad))
    assert proc.returncode == 2 and "secret" in proc.stderr
    bad.write_text("no_such_option = 1\n")
    proc = _installed("dispynode", "--config", str(bad))
    assert proc.returncode == 2 and "unknown option 'no_such_option'" in proc.stderr


def test_dispynode_takes_dispy_4_15_options(tmp_path):
    """A dispy user's command line starts the node: dispy's names for the same
    options (--ext_host, --dest_path_prefix), options with no counterpart taken
    with a warning naming them and why, the rest with their meaning; bad values
    get a message naming the option.  --save_config makes the node exit after parsing: nothing listens here."""
    cfg = tmp_path / "node.toml"
    proc = _installed(
        "dispynode.py", "--ext_host", "10.231.9.9", "--dest_path_prefix", str(tmp_path / "d"),
        "--msg_timeout", "30", "--ping_interval", "10", "--force_cleanup", "--unsafe_setup",
        "--admin_secret", "x", "--save_config", str(cfg),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = cfg.read_text()
    assert 'ext_ip_addr = "10.231.9.9"' in text and f'dest_path = "{tmp_path / "d"}"' in text
    for flag in ("--msg_timeout", "--ping_interval", "--force_cleanup", "--unsafe_setup",
                 "--admin_secret"):  # fmt: skip
        assert f"{flag} (dispy's option) has no effect here: " in proc.stderr, flag
        assert flag.lstrip("-") not in text  # never saved
    # the options with behaviour (tested for it in test_node_service and the
    # installed tier): dispy's documented example line is taken and saved
    init = tmp_path / "init.py"
    init.write_text("def init():\n    pass\n")
    proc = _installed(
        "dispynode", "-d", "--cpus", "-1", "--zombie_interval=10", "--service_start", "17:00",
        "--service_stop", "6:00", "--service_end", "8:00", "--client_shutdown", "--init",
        str(init), "--scheduler_host", "127.0.0.1", "--ipv4_udp_multicast", "--save_config",
        str(cfg),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = cfg.read_text()
    for line in ('service_start = "17:00"', 'service_stop = "6:00"', 'service_end = "8:00"',
                 "client_shutdown = true", 'scheduler_host = "127.0.0.1"',
                 "ipv4_udp_multicast = true", f'init = "{init}"'):  # fmt: skip
        assert line in text, (line, text)
    for argv, why in (
        (["--service_start", "00:00"], "--service_start needs --service_stop or --service_end"),
        (["--service_end", "00:00"], "--service_stop/--service_end need --service_start"),
        (["--service_start", "25:00", "--service_end", "1:00"],
         "--service_start '25:00' is not a time of day: give it as HH:MM"),
        (["--service_start", "8:00", "--service_stop", "9:00", "--service_end", "8:30"],
         "--service_stop must come before --service_end"),
        (["--init", str(tmp_path / "nofile.py")], "no such file"),
    ):  # fmt: skip
        proc = _installed("dispynode", *argv, "--daemon", timeout=30)
        assert proc.returncode == 2 and why in proc.stderr, (argv, proc.stderr)


def test_dispyscheduler_takes_dispy_4_15_options(tmp_path):
    """dispyscheduler's dispy names: --ext_host, --ipv4_udp_multicast, a saved
    configuration read back with --config (the command line wins), and
    --cleanup_nodes/--msg_timeout taken with a warning saying why."""
    cfg = tmp_path / "sched.toml"
    proc = _installed(
        "dispyscheduler", "--ext_host", "10.231.9.8", "--ipv4_udp_multicast", "-n", "10.231.3.*",
        "--cleanup_nodes", "--msg_timeout", "30", "--node_secret", "s", "--save_config", str(cfg),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = cfg.read_text()
    for line in ('ext_ip_addr = "10.231.9.8"', "ipv4_udp_multicast = true",
                 'nodes = ["10.231.3.*"]'):  # fmt: skip
        assert line in text, text
    assert "secret" not in text and "cleanup_nodes" not in text
    for flag in ("--cleanup_nodes", "--msg_timeout"):
        assert f"{flag} (dispy's option) has no effect here: " in proc.stderr, flag
    again = tmp_path / "again.toml"
    proc = _installed(
        "dispyscheduler", "--config", str(cfg), "-n", "10.231.4.*", "--node_secret", "s",
        "--save_config", str(again),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = again.read_text()
    assert 'nodes = ["10.231.4.*"]' in text and 'ext_ip_addr = "10.231.9.8"' in text, text
    cfg.write_text('node_secret = "x"\n')
    proc = _installed("dispyscheduler", "--config", str(cfg))
    assert proc.returncode == 2 and "secret" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "content, why",
    [
        (b"cpus = \xff\xfe\n", "cannot read"),  # not UTF-8
        (b"x = " + b"[" * 1200 + b"]" * 1200 + b"\n", "cannot read"),  # nested too deeply
        (b"cpus = true\n", "cpus must be a int, not true/false"),
        (b'ip_addr = "10.0.0.1"\n', "ip_addr must be a list"),
        (b"ip_addr = [1]\n", "ip_addr must be a str"),
        (b'daemon = "yes"\n', "daemon must be true or false"),
    ],
)
def test_bad_config_files_are_refused_with_a_reason(tmp_path, capsys, content, why):
    """Found by fuzzing the config reader (#18): these crashed it or were taken
    (cpus = true as 1, a string of addresses as a list of its letters)."""
    from dispynode.main import parse_args

    cfg = tmp_path / "node.toml"
    cfg.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(cfg)])
    assert exit_info.value.code == 2
    assert why in capsys.readouterr().err


def test_config_takes_an_integer_for_a_float_option(tmp_path):
    from dispynode.main import parse_args

    cfg = tmp_path / "node.toml"
    cfg.write_text('zombie_interval = 5\nip_addr = ["127.0.0.1"]\n')
    args = parse_args(["--config", str(cfg)])
    assert args.zombie_interval == 5.0 and args.ip_addr == ["127.0.0.1"]


def _secret_file(tmp_path) -> None:
    path = tmp_path / "secret"
    path.write_text("a-secret-of-twenty-chars-or-more\n")
    path.chmod(0o600)  # (dispynode refuses a secret file others can read)


def _start_foreground_node(tmp_path, stdin):
    """The installed ``dispynode`` without --daemon (so it reads commands from its
    standard input), on a port of its own; returns (process, address)."""
    proc = subprocess.Popen(
        [*program("dispynode"), "-i", "127.0.0.1", "--node_port", "0", "-c", "1",
         "--no_discovery", "--dest_path", str(tmp_path / "node"), "--secret_file",
         str(tmp_path / "secret")],
        stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # its first line (it prints it first, or exits), byte by byte: a buffered
    # readline could take the lines after it too, which communicate() then misses
    raw = b""
    while not raw.endswith(b"\n") and (byte := os.read(proc.stdout.fileno(), 1)):
        raw += byte
    line = raw.decode()
    assert line.startswith("dispynode ready:"), (line, proc.stderr.read())
    return proc, line.split("addr=")[1].strip()


def test_dispynode_started_in_the_background_serves_without_a_traceback(tmp_path):
    """Started by a shell in the background, by nohup or by a service manager, a
    node's standard input is /dev/null, which the event loop cannot watch: it
    logged a traceback from the loop (EPERM) before; now it serves quietly."""
    _secret_file(tmp_path)
    proc, address = _start_foreground_node(tmp_path, subprocess.DEVNULL)
    try:
        with dispy.JobCluster(
            jobs.double, nodes=[address], secret="a-secret-of-twenty-chars-or-more"
        ) as cluster:
            assert cluster.submit(21)(timeout=60) == 42
    finally:
        proc.terminate()  # (by its PID)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "ERROR" not in err, err


def test_dispynode_reads_commands_from_a_file_on_its_standard_input(tmp_path):
    """``dispynode < commands``: a file is read too (status, then quit)."""
    _secret_file(tmp_path)
    (tmp_path / "commands").write_text("status\nquit\n")
    with open(tmp_path / "commands") as commands:
        proc, _ = _start_foreground_node(tmp_path, commands)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert "1 CPUs, 0 running" in out and "Traceback" not in err, (out, err)


def test_a_second_dispynode_in_the_same_folder_is_refused(tmp_path):
    """Two nodes on one machine with one --dest_path would share their result
    store and computations' folders (one closing a computation removed the
    other's files).  The second is refused, naming the first; its --clean
    removes nothing of the first's; the first serves on."""
    _secret_file(tmp_path)
    first, address = _start_foreground_node(tmp_path, subprocess.DEVNULL)
    try:
        marker = tmp_path / "node" / "kept-by-the-first"
        marker.write_text("x")
        second = _installed(
            "dispynode", "-i", "127.0.0.1", "--node_port", "0", "--no_discovery", "--daemon",
            "--clean", "--dest_path", str(tmp_path / "node"),
            "--secret_file", str(tmp_path / "secret"),
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert f"in use by another dispynode (pid {first.pid})" in second.stderr, second.stderr
        assert marker.exists()
        with dispy.JobCluster(
            jobs.double, nodes=[address], secret="a-secret-of-twenty-chars-or-more"
        ) as cluster:
            assert cluster.submit(4)(timeout=60) == 8
    finally:
        first.terminate()
        first.communicate(timeout=60)
    # the folder is free again once the first has gone: --clean empties it
    again = subprocess.run(
        [*program("dispynode"), "-i", "127.0.0.1", "--node_port", "0", "--no_discovery",
         "--quit_on_eof", "--clean", "--dest_path", str(tmp_path / "node"),
         "--secret_file", str(tmp_path / "secret")],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 0 and not marker.exists(), again.stderr


def test_a_second_dispyscheduler_in_the_same_folder_is_refused(tmp_path):
    """As for nodes: one scheduler per --dest_path (its state database is there)."""
    cmd = [*program("dispyscheduler"), "--daemon", "-i", "127.0.0.1", "--port", "0",
           "--httpd_port", "0", "--dest_path", str(tmp_path / "sched")]  # fmt: skip
    first = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = first.stdout.readline()
        assert line.startswith("dispyscheduler ready:"), (line, first.stderr.read())
        second = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert f"in use by another dispyscheduler (pid {first.pid})" in second.stderr
    finally:
        first.terminate()
        first.communicate(timeout=60)
    assert first.returncode == 0
