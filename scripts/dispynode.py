#!/usr/bin/env python3
"""dispynode.py: the node daemon that runs dispy jobs on this machine.

The same program as ``dispynode``, under the name dispy's documentation, users'
scripts and service units use.  It is a file of our own rather than a
generated console script because of where it lies: Python puts the folder of
the program it runs first on ``sys.path``, and this file sits in the scripts
folder (a venv's ``bin/``) under the name of the package ``dispynode``.  Every
program started from that folder (``dispynode``, ``pytest``, ``ipython``...)
would import this file for ``import dispynode``.  So, run or imported, it first
takes its own folder off ``sys.path``; imported, it then puts the real
package in its place.
"""

import os as _os
import sys as _sys


def _step_aside():
    here = _os.path.dirname(_os.path.realpath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != here]


_step_aside()
if __name__ == "__main__":
    from dispynode.main import main

    _sys.exit(main())
else:
    import importlib as _importlib

    if getattr(_sys, "_dispy_script_import", None) == __name__:
        raise ImportError(
            f"the package {__name__!r} is not installed for {_sys.executable} "
            f"(only its script {__file__} was found): reinstall dispy"
        )
    del _sys.modules[__name__]
    _sys._dispy_script_import = __name__
    try:
        _sys.modules[__name__] = _importlib.import_module(__name__)
    finally:
        del _sys._dispy_script_import
