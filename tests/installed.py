"""The product as users install it: the wheel in a fresh venv, an empty HOME.

The session fixture ``installed`` builds the wheel from a clean copy of this
checkout (so no stale ``build/`` of the source tree leaks in), makes a venv
with the Python running the tests, installs the wheel into it (not editable)
and gives:

* ``installed.script(name)``: the full path of a console script (both
  spellings: ``dispynode`` and ``dispynode.py``, ...), failing if the install
  did not make it;
* ``installed.python``: the venv's interpreter;
* ``installed.env(**extra)``: an environment as a user's shell would have it,
  built from nothing: ``HOME`` an empty folder, ``PATH`` with the venv first
  (as if activated; ``activated=False`` leaves it out), none of the test
  run's own variables (``PYTHONPATH``, ``DISPY_KEY_FILE``...) except the
  network-safety guard, which every program a test starts must carry;
* ``installed.console_scripts``: every program setup.cfg declares.

Tests that are about the daemons as deployed (their options, signals,
restarts, recovery) start them with ``program('dispynode')`` (the same
install, made on first use) rather than ``python -m dispynode``, so a broken
console script fails them.
"""

from __future__ import annotations

import atexit
import configparser
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from dispy import discovery

ROOT = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
    ".ruff_cache", ".venv",
    "_dispy_*",  # recover files of clients running in the checkout (another suite's, say)
)  # fmt: skip


def declared_programs() -> list[str]:
    """Every program a standard install puts on PATH, read from setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    names = []
    for line in cfg["options.entry_points"]["console_scripts"].splitlines():
        if "=" in line:
            names.append(line.split("=", 1)[0].strip())
    for line in cfg["options"].get("scripts", "").splitlines():
        if line.strip():
            names.append(os.path.basename(line.strip()))
    return names


def copy_checkout(dest: Path) -> Path:
    """A clean copy of this checkout (no VCS, no build leftovers) at ``dest``.
    A file that vanishes while it is copied (a test run beside this one may
    make and remove files in the checkout) is left out."""
    try:
        shutil.copytree(ROOT, dest, ignore=_SKIP)
    except shutil.Error as exc:
        real = [e for e in exc.args[0] if os.path.lexists(e[0])]
        if real:
            raise shutil.Error(real) from None
    return dest


def _pip_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in ("PATH", "LANG")}
    env["HOME"] = str(home)
    # the machine's download cache, so a second venv does not fetch numpy again
    cache = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True
    ).stdout.strip()
    if cache and "PIP_CACHE_DIR" not in env:
        env["PIP_CACHE_DIR"] = cache
    return env


def make_venv(path: Path) -> Path:
    """A fresh venv at ``path`` (the tests' Python); returns its ``bin``."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    return path / "bin"


class Installed:
    def __init__(self, base: Path):
        self.base = base
        self.home = base / "home"
        self.home.mkdir()
        src = copy_checkout(base / "src")
        wheels = base / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
             "-w", str(wheels), str(src)],
            check=True, timeout=600, env=_pip_env(self.home),
        )  # fmt: skip
        (self.wheel,) = wheels.glob("dispy-*.whl")
        self.bin = make_venv(base / "venv")
        self.python = str(self.bin / "python")
        subprocess.run(
            [self.python, "-m", "pip", "install", "-q", str(self.wheel)],
            check=True, timeout=900, env=_pip_env(self.home),
        )  # fmt: skip
        shutil.rmtree(src)
        self.console_scripts = declared_programs()

    def script(self, name: str) -> str:
        path = self.bin / name
        assert path.is_file(), f"the install made no {name} in {self.bin}"
        return str(path)

    def env(self, activated: bool = True, **extra: str | None) -> dict[str, str]:
        path = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
        env = {
            "HOME": str(self.home),
            "PATH": f"{self.bin}:{path}" if activated else path,
            "LANG": "C.UTF-8",
        }
        guard = os.environ.get(discovery.GUARD_ENV)
        if guard:
            env[discovery.GUARD_ENV] = guard
        if activated:
            env["VIRTUAL_ENV"] = str(self.bin.parent)
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        return env

    def netns_env(self, **extra: str | None) -> dict[str, str | None]:
        """For ``Host.popen``/``run`` (which add to ``os.environ``): the same
        environment as :meth:`env`, every other variable of ours removed."""
        want = self.env(**extra)
        out: dict[str, str | None] = {k: None for k in os.environ if k not in want}
        out.update(want)
        return out


_instance: Installed | None = None
_lock = threading.Lock()


def get() -> Installed:
    """The one install of this test run, made on first use (removed at exit)."""
    global _instance
    with _lock:
        if _instance is None:
            base = Path(tempfile.mkdtemp(prefix="dispy-installed-"))
            atexit.register(shutil.rmtree, base, True)
            _instance = Installed(base)
        return _instance


def program(name: str) -> list[str]:
    """The argv that starts installed program ``name`` (``dispynode``, ...), as a
    user's shell would: the console script by its full path."""
    return [get().script(name)]


@pytest.fixture(scope="session")
def installed() -> Installed:
    """The wheel installed in a fresh venv (see the module doc)."""
    return get()
