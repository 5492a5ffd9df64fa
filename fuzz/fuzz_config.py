"""Atheris target: ``--config`` files into the daemons' TOML reader.

The input is the content of a configuration file (layout in
``_common.py``), written to one scratch file (the same path each time) and
read with ``dispy.runtime.daemon.load_config(parser, path, not_saved)`` twice: with
dispynode's parser and with dispyscheduler's.  The parsers are the real
ones: each daemon's ``parse_args`` builds its ``ArgumentParser`` and calls
``load_config`` with it and its ``_NOT_SAVED`` set; this harness calls each
``parse_args(["--config", <a missing file>])`` once at start, keeps the
arguments of that ``load_config`` call (seen through ``sys.setprofile``,
nothing replaced), and lets the call end as it does (``parser.error``:
the file is missing).  Standard error is silenced while argparse prints its
usage.

A crash is:

* any exception from ``load_config`` other than the ``SystemExit`` of
  ``parser.error``;
* a returned configuration that holds a key containing ``secret`` that
  does not end in ``_file``, a key the parser does not know or that is
  never saved (``not_saved``), or a value whose type differs from the
  option's declared ``type`` (exactly: ``True`` for an ``int`` option is a
  ``bool``, not an ``int``);
* a file written anywhere but the scratch file, any network use, any
  process started (an audit hook refuses them).

Findings already reported (``KNOWN``, README.md) count as a refused file
unless ``DISPY_FUZZ_KNOWN=crash``.

Mutations: half libFuzzer's own (bytes), half ``_common.config_mutator``'s
(an option set to an odd value, dropped, renamed, or given another's value;
written back as TOML).

Run through ``run.py``; alone:
``python fuzz/fuzz_config.py [libFuzzer flags] [corpus dir or crash file]``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

import atheris

with atheris.instrument_imports(include=["dispy", "dispynode", "dispyscheduler", "tomllib"]):
    import tomllib  # noqa: F401  (load_config imports it when called: instrumented here)

    import _common as C
    import _harness as H

    from dispy.runtime import daemon as _daemon
    from dispynode import main as node_main
    from dispyscheduler import main as scheduler_main

# argparse's error() translates its messages: with LANGUAGE=C gettext looks for no
# catalogue (a dozen stat calls per error otherwise); the messages are the same
os.environ["LANGUAGE"] = "C"
SCRATCH = H.scratch_folder("config")
PATH = os.path.join(SCRATCH, "fuzz.toml")


def parser_of(parse_args) -> tuple:
    """(parser, not_saved) that ``parse_args`` passes to ``load_config``."""
    seen = {}
    code = _daemon.load_config.__code__

    def watch(frame, event, arg):
        if event == "call" and frame.f_code is code and not seen:
            seen["p"], seen["not_saved"] = frame.f_locals["p"], frame.f_locals["not_saved"]

    missing = os.path.join(SCRATCH, "missing.toml")
    sys.setprofile(watch)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parse_args(["--config", missing])
    except SystemExit:
        pass
    finally:
        sys.setprofile(None)
    if not seen:
        raise RuntimeError(f"{parse_args.__module__}.parse_args did not call load_config")
    return seen["p"], frozenset(seen["not_saved"])


PARSERS = [
    ("dispynode", *parser_of(node_main.parse_args)),
    ("dispyscheduler", *parser_of(scheduler_main.parse_args)),
]
#: Real bugs found and not fixed yet: handled as the surrounding code would (README.md).
KNOWN = H.Known()  # the findings of the first runs are fixed (README.md); none known now
GUARD = H.Guard([PATH])


class _Silent(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


SILENT = _Silent()


def check(name: str, parser, not_saved, cfg) -> None:
    known = {a.dest: a for a in parser._actions}
    if not isinstance(cfg, dict):
        raise H.Finding(f"{name}: load_config returned {type(cfg).__name__}")
    for key, value in cfg.items():
        if key not in known or key in not_saved:
            raise H.Finding(f"{name}: option {key!r} taken from the file")
        if "secret" in key and not key.endswith("_file"):
            raise H.Finding(f"{name}: secret option {key!r} taken from the file")
        want = known[key].type
        if want is int and type(value) is bool and KNOWN.allows("config-bool-for-int"):
            continue
        if want is not None and type(value) is not want:
            raise H.Finding(
                f"{name}: {key} = {value!r} ({type(value).__name__}) taken for a {want.__name__}"
            )


def test_one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    for name, parser, not_saved in PARSERS:
        stderr, sys.stderr = sys.stderr, SILENT  # (argparse prints its usage there)
        try:
            cfg = _daemon.load_config(parser, PATH, set(not_saved))
        except SystemExit:
            continue
        except Exception as exc:
            if not KNOWN.match(exc):
                raise
            continue
        finally:
            sys.stderr = stderr
        check(name, parser, not_saved, cfg)
    GUARD.check()


OPTIONS = sorted({a.dest for _, p, _ in PARSERS for a in p._actions} | {"secret", "node_secret"})


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    return C.config_mutator(data, max_size, seed, atheris.Mutate, OPTIONS)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
