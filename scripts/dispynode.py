#!/usr/bin/env python3
"""dispy's spelling of a program: dispy.py, dispynode.py, dispyscheduler.py or
dispynetrelay.py, the same program as the name without ``.py`` (this one
text is installed under each of the four names).

It is a file of our own rather than a generated console script because of
where it lies: Python puts the folder of the program it runs first on
``sys.path``, and this file sits in the scripts folder (a venv's ``bin/``)
under the name of a package (``dispynode``...).  Every program started from
that folder (``dispynode``, ``pytest``, ``ipython``...) would import this file
for ``import dispynode``.  So, run or imported, it first takes its own folder
off ``sys.path``; imported, it then puts the real package in its place.
"""

import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.realpath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _here]

if __name__ == "__main__":
    import importlib as _importlib

    _name = _os.path.basename(__file__).removesuffix(".py")
    _main = _importlib.import_module("dispy.cli" if _name == "dispy" else f"{_name}.main").main
    _sys.exit(_main())
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
