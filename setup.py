"""Build: the hot-path modules compiled to C by mypyc where that works, else pure Python.

mypyc compiles the typed sources as they are (see README: Compiled hot paths). Nothing
else differs: every module also ships as Python, and ``aiopgpool.native`` loads the
Python sources instead when ``AIOPGPOOL_PURE_PYTHON`` is set, or when a source's digest
differs from the one recorded here (a development checkout edited after its build).

With ``AIOPGPOOL_PURE_PYTHON=1``, on a machine without a C compiler or Python's headers,
or when the compiler fails, the build is pure Python (with a message saying why).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
STAMP = "_compiled.json"  # what was compiled, from which sources (sha256)


def _native(name: str) -> Any:
    """The literal ``name`` of aiopgpool/native.py, which checks at import what this compiled
    (read, not imported: the build must not import the package)."""
    tree = ast.parse((HERE / "aiopgpool" / "native.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"aiopgpool/native.py defines no {name}")


COMPILED = list(_native("MODULES"))
SOURCES = [f"aiopgpool/{name}.py" for name in COMPILED]


def _why_not_compile() -> str | None:
    """None when the modules can be compiled here, else the reason they are not."""
    if os.environ.get("AIOPGPOOL_PURE_PYTHON"):
        return "AIOPGPOOL_PURE_PYTHON is set"
    if sys.implementation.name != "cpython":
        return f"mypyc needs CPython, not {sys.implementation.name}"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc (part of mypy) is not installed in the build environment"
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler!r}) found"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "Python's C headers (Python.h) are not installed"
    return None


class BuildExt(build_ext):
    """Build the compiled modules if possible; record their sources' digests beside them."""

    def run(self) -> None:
        super().run()
        package = Path(self.get_ext_fullpath("aiopgpool.core")).parent
        built = [Path(self.get_ext_fullpath(ext.name)) for ext in self.extensions]
        stamp = package / STAMP
        if built and all(path.is_file() for path in built):
            digests = {
                name: hashlib.sha256((HERE / "aiopgpool" / f"{name}.py").read_bytes()).hexdigest()
                for name in COMPILED
            }
            stamp.write_text(json.dumps(digests, indent=1) + "\n")
        else:
            stamp.unlink(missing_ok=True)
            print("aiopgpool: compiling failed; the package stays pure Python", file=sys.stderr)


def _ext_modules() -> list[Any]:
    reason = _why_not_compile()
    if reason is not None:
        print(f"aiopgpool: building pure Python ({reason})", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    extensions = mypycify(SOURCES, group_name="aiopgpool")
    _throw_with_one_argument(extensions)
    for ext in extensions:
        ext.optional = True  # a failed compile leaves the pure-Python package
    return list(extensions)


# mypyc's runtime (lib-rt/misc_ops.c, CPy_YieldFromErrorHandle) passes an exception
# thrown into a compiled coroutine (a cancellation, a timeout) on to what it awaits as
# throw(type, value, traceback). That form is deprecated since Python 3.12: a
# DeprecationWarning at every cancelled wait, raised instead of the cancellation under
# -W error. The value alone says the same (it carries its traceback).
_THREE_ARGUMENT_THROW = "PyObject_CallFunctionObjArgs(_m, type, value, traceback, NULL)"
_ONE_ARGUMENT_THROW = "PyObject_CallOneArg(_m, value)"


def _throw_with_one_argument(extensions: list[Any]) -> None:
    """On Python 3.12+, compile with a copy of mypyc's ``misc_ops.c`` whose throw() call
    has one argument, found first on the include path (the runtime is #included)."""
    if sys.version_info < (3, 12):
        return
    from mypyc.build import include_dir

    text = (Path(include_dir()) / "misc_ops.c").read_text()
    if _THREE_ARGUMENT_THROW not in text:
        print("aiopgpool: mypyc's misc_ops.c has no three-argument throw() to fix", file=sys.stderr)
        return
    fixed = HERE / "build" / "mypyc-one-argument-throw"
    fixed.mkdir(parents=True, exist_ok=True)
    (fixed / "misc_ops.c").write_text(text.replace(_THREE_ARGUMENT_THROW, _ONE_ARGUMENT_THROW))
    for ext in extensions:
        ext.include_dirs.insert(0, str(fixed))


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": BuildExt})
