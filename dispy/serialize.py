"""User payloads: arguments, results, and the computation itself.

Arguments and results use pickle protocol 5 with out-of-band buffers: a
numpy array becomes one segment that is written to the socket straight from
the array's memory and, on the other side, read into a buffer that the new
array uses as it is.  Objects plain pickle cannot handle (lambdas, local
functions) fall back to cloudpickle.

The computation travels in two parts:

* files: depends paths, the program of a program computation, and the source
  of every *user module* the computation needs (a module that is neither in
  the standard library nor installed in site-packages), placed at its
  package path so ``import`` finds it on the node;
* a cloudpickle of ``ComputationSpec``: functions and classes defined in
  ``__main__`` travel by value; everything else by reference.
"""

from __future__ import annotations

import functools
import inspect
import os
import pickle
import site
import sys
import sysconfig
import types
from dataclasses import dataclass, field

import cloudpickle

from .errors import ComputationError, SubmitError


def dumps(obj) -> list:
    """Pickle ``obj``; return [pickle bytes, out-of-band buffer, ...]."""
    bufs: list = []
    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    except (pickle.PicklingError, AttributeError, TypeError):
        bufs = []
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    return [data, *(b.raw() for b in bufs)]


def loads(segments):
    """Inverse of ``dumps`` (segments: the pickle, then its buffers)."""
    return pickle.loads(segments[0], buffers=segments[1:])


def dumps_args(args: tuple, kwargs: dict) -> list:
    """Pickle a job's arguments, with an error that says which one failed."""
    try:
        return dumps((args, kwargs))
    except Exception as exc:
        for i, a in enumerate(args):
            try:
                dumps(a)
            except Exception:
                raise SubmitError(
                    f"argument {i} of submit() ({type(a).__name__}) cannot be pickled: {exc}; "
                    "pass data that pickle can serialize"
                ) from exc
        raise SubmitError(f"submit() arguments cannot be pickled: {exc}") from exc


# -- the computation --------------------------------------------------------------


@dataclass
class ComputationSpec:
    """What a node needs to run jobs (pickled with cloudpickle)."""

    name: str
    func: object = None  # the compute function, or None for a program
    program: str | None = None  # file name of the program (in the computation's folder)
    setup: object = None
    cleanup: object = None  # a callable, or None
    objects: dict = field(default_factory=dict)  # depends classes/functions by name
    main_names: list = field(default_factory=list)  # names to define in the node's __main__
    # the source file of each function sent by value, by "name:first line":
    # cloudpickle sends "<dynamic-code>" in its place (see restore_filenames)
    code_files: dict = field(default_factory=dict)

    def functions(self) -> list:
        """The functions this spec carries (methods of its classes included)."""
        out = []
        for obj in (self.func, self.setup, self.cleanup, *self.objects.values()):
            obj = getattr(obj, "func", obj)  # functools.partial
            if inspect.isfunction(obj):
                out.append(obj)
            elif inspect.isclass(obj):
                for attr in vars(obj).values():
                    attr = getattr(attr, "__func__", attr)  # static and class methods
                    if inspect.isfunction(attr):
                        out.append(attr)
        return out


_DYNAMIC = "<dynamic-code>"


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def code_filenames(spec: ComputationSpec) -> dict:
    """``name:first line`` -> source file of every code object the spec's functions hold."""
    return {
        f"{c.co_name}:{c.co_firstlineno}": c.co_filename
        for fn in spec.functions()
        for c in _codes(fn.__code__)
    }


def _renamed(code: types.CodeType, files: dict) -> types.CodeType:
    consts = tuple(
        _renamed(c, files) if isinstance(c, types.CodeType) else c for c in code.co_consts
    )
    name = code.co_filename
    if name == _DYNAMIC:
        name = files.get(f"{code.co_name}:{code.co_firstlineno}", name)
    return code.replace(co_filename=name, co_consts=consts)


def restore_filenames(spec: ComputationSpec) -> None:
    """On the node: give the functions sent by value their source file's name
    again, so a job's traceback says where the failing line is, as it would on
    the client (cloudpickle replaces it with "<dynamic-code>")."""
    files = getattr(spec, "code_files", None)  # None from a client before this field
    if not files:
        return
    for fn in spec.functions():
        if any(c.co_filename == _DYNAMIC for c in _codes(fn.__code__)):
            fn.__code__ = _renamed(fn.__code__, files)


@dataclass
class ComputationPackage:
    spec_bytes: bytes
    files: list  # [(relative path on node, absolute path here)]
    name: str
    is_program: bool


def _installed_roots() -> tuple[str, ...]:
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(os.path.realpath(p))
    try:
        roots.update(os.path.realpath(p) for p in site.getsitepackages())
    except AttributeError:  # virtualenv's old site.py
        pass
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        roots.add(os.path.realpath(site.getusersitepackages()))
    return tuple(r.rstrip(os.sep) + os.sep for r in roots)


def is_user_module(module: types.ModuleType) -> bool:
    """True if ``module`` is the user's own code (must be shipped to nodes)."""
    name = module.__name__
    if name == "__main__" or name.split(".")[0] in ("dispy", "dispynode"):
        return False
    path = getattr(module, "__file__", None)
    if not path:
        return False  # built in
    return not os.path.realpath(path).startswith(_installed_roots())


def module_files(module: types.ModuleType) -> list[tuple[str, str]]:
    """The source files to send so that ``import module`` works on the node.

    A module inside a package is sent with the ``__init__.py`` of each
    enclosing package; a package is sent with all its ``.py`` files.
    """
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        raise ComputationError(
            f"module {module.__name__!r} has no Python source file to send "
            "(compiled or built-in modules must be installed on the nodes)"
        )
    parts = module.__name__.split(".")
    files = []
    if os.path.basename(path) == "__init__.py":  # a package: all its sources
        pkg_dir = os.path.dirname(path)
        base = os.path.join(*parts)
        for root, _dirs, names in os.walk(pkg_dir):
            for n in names:
                if n.endswith(".py"):
                    full = os.path.join(root, n)
                    files.append((os.path.join(base, os.path.relpath(full, pkg_dir)), full))
        top = os.path.dirname(pkg_dir)
        parts = parts[:-1]
    else:
        files.append((os.path.join(*parts[:-1], os.path.basename(path)), path))
        top = os.path.dirname(path)
    # __init__.py of each enclosing package
    for i in range(len(parts) - 1, 0, -1):
        init = os.path.join(top, "__init__.py")
        if os.path.isfile(init):
            files.append((os.path.join(*parts[:i], "__init__.py"), init))
        top = os.path.dirname(top)
    return files


def _callable_module(obj) -> types.ModuleType | None:
    while isinstance(obj, functools.partial):
        obj = obj.func
    mod = sys.modules.get(getattr(obj, "__module__", None) or "")
    return mod


def package_computation(computation, depends=(), setup=None, cleanup=None) -> ComputationPackage:
    """Collect what a node needs for ``computation``; raise ComputationError with
    a clear reason if something is missing or cannot be sent."""
    files: list[tuple[str, str]] = []
    seen_paths: set[str] = set()
    objects: dict = {}
    main_names: list[str] = []

    def add_file(rel: str, path: str) -> None:
        real = os.path.realpath(path)
        if real in seen_paths:
            return
        seen_paths.add(real)
        files.append((rel, path))

    def add_module(mod: types.ModuleType) -> None:
        if is_user_module(mod):
            for rel, path in module_files(mod):
                add_file(rel, path)

    if isinstance(computation, str | os.PathLike):
        program = os.fspath(computation)
        if not os.path.isfile(program):
            raise ComputationError(
                f"program {program!r} not found: give the path of an existing program file"
            )
        name = os.path.basename(program)
        add_file(name, program)
        func = None
    elif callable(computation):
        program = None
        name = getattr(computation, "__name__", None) or type(computation).__name__
        mod = _callable_module(computation)
        if mod is not None:
            add_module(mod)
        func = computation
    else:
        raise ComputationError(
            f"computation must be a function or a program path, not {type(computation).__name__}"
        )

    for fn in (setup, cleanup):
        if callable(fn):
            mod = _callable_module(fn)
            if mod is not None:
                add_module(mod)
        elif fn is not None and not isinstance(fn, bool):
            raise ComputationError(f"setup/cleanup must be callables, not {type(fn).__name__}")

    for dep in depends or ():
        if isinstance(dep, str | os.PathLike):
            path = os.fspath(dep)
            if os.path.isfile(path):
                add_file(os.path.basename(path), path)
            elif os.path.isdir(path):
                base = os.path.basename(os.path.normpath(path))
                for root, _dirs, names in os.walk(path):
                    for n in names:
                        full = os.path.join(root, n)
                        add_file(os.path.join(base, os.path.relpath(full, path)), full)
            else:
                raise ComputationError(
                    f"depends file {path!r} not found (relative paths are taken from the "
                    f"current directory {os.getcwd()!r}): fix the path or create the file"
                )
        elif isinstance(dep, types.ModuleType):
            if is_user_module(dep):
                add_module(dep)
            # an installed module is imported on the node; nothing to send
        elif inspect.isclass(dep) or inspect.isfunction(dep) or inspect.isbuiltin(dep):
            mod = sys.modules.get(dep.__module__)
            if dep.__module__ == "__main__":
                objects[dep.__name__] = dep
                main_names.append(dep.__name__)
            elif mod is not None:
                add_module(mod)
                objects[dep.__name__] = dep
        else:
            raise ComputationError(
                f"depends entry {dep!r} is not a file path, module, class or function"
            )

    spec = ComputationSpec(
        name=name,
        func=func,
        program=name if program else None,
        setup=setup,
        cleanup=cleanup if callable(cleanup) else None,
        objects=objects,
        main_names=main_names,
    )
    spec.code_files = code_filenames(spec)
    try:
        spec_bytes = cloudpickle.dumps(spec, protocol=5)
    except Exception as exc:
        raise ComputationError(
            f"computation {name!r} (with its setup, cleanup and depends) cannot be pickled: {exc}"
        ) from exc
    return ComputationPackage(spec_bytes, files, name, program is not None)
