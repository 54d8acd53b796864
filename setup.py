"""Build hook: compile a worker's hot modules with mypyc; everything else is in pyproject.toml.

Scoring, learning, parsing and the processors' per-order bookkeeping are most
of a worker's CPU per order; mypyc compiles their type-annotated modules to C
extensions, with the same results (README "Performance", "The compiled
modules"). The extensions are optional: without a C compiler, or with
``CSOS_PURE_PYTHON=1`` at install, the package installs and runs as plain
Python. ``streams/core/native-manifest.json`` records the SHA-256 of each
compiled source, so that ``streams.core.native`` imports the sources instead
once one of them has changed since this build.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
NATIVE = HERE / "streams" / "core" / "native.py"
MANIFEST = NATIVE.with_name("native-manifest.json")


def compiled_modules() -> tuple[str, ...]:
    """``streams.core.native.COMPILED`` (dotted names), read from its source: one list for the build and the
    check at import (setup.py cannot import the package, whose dependencies the build environment lacks)."""
    for node in ast.parse(NATIVE.read_text()).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "COMPILED":
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError("streams/core/native.py has no COMPILED list")


def extensions() -> list:
    if os.environ.get("CSOS_PURE_PYTHON", "") == "1":
        MANIFEST.unlink(missing_ok=True)
        return []
    import mypy.version
    from mypyc.build import mypycify

    compiled = compiled_modules()
    sources = {m: Path(*m.split(".")).with_suffix(".py") for m in compiled}
    # --no-site-packages: the installed libraries (river, cryptography, ...) are not analysed; their values are
    # Any to the compiled code. Without it a reinstall into a venv that already has them took over 15 minutes.
    options = ["--ignore-missing-imports", "--follow-imports=silent", "--no-site-packages"]
    exts = mypycify([str(p) for p in sources.values()] + options, opt_level="3", group_name="csos_native")
    for ext in exts:
        ext.optional = True  # no C compiler: a warning, and the package runs as plain Python
    MANIFEST.write_text(json.dumps({
        "mypy": mypy.version.__version__,
        "sources": {m: hashlib.sha256((HERE / p).read_bytes()).hexdigest() for m, p in sources.items()},
    }, indent=1, sort_keys=True) + "\n")
    return exts


setup(ext_modules=extensions())
