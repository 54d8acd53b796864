"""Use the mypyc-compiled hot modules only when they were built from the sources beside them.

Why: the monitor's scoring and learning, the verifier's parsing and the two
processors' per-order bookkeeping are most of a worker's CPU per order
(README "Performance"). ``setup.py`` compiles the modules in :data:`COMPILED`
with mypyc (C extensions beside the ``.py`` files, in every package listed)
and writes :data:`MANIFEST`, the SHA-256 of each source it compiled. Python
imports an extension in preference to the ``.py`` of the same name, so a
source edited after the build (a ``git pull``, a developer's change) would
silently run the old compiled code. :func:`install` prevents that: unless
every compiled module's source still has the hash it was built from, all of
them are imported from their ``.py`` files instead (all or none: compiled
modules call each other natively, and an interpreted class cannot subclass a
compiled one), and a warning says to run ``make install``.
``CSOS_PURE_PYTHON=1`` forces the sources (for cProfile, which cannot see into
compiled functions, or to compare the two builds). The decisions are the same
either way: the build must publish the same bytes (``bench_worker --digest``)
and ``tests/unit/test_native.py`` runs the demo's fixed feed through both.

It runs before any compiled module can be imported: ``streams/__init__.py`` and
``connectors/__init__.py`` import it first. This module itself is never compiled,
and neither is anything it imports from this project (nothing).
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

log = logging.getLogger(__name__)

#: The modules ``setup.py`` compiles, by dotted name (setup.py reads this list from here: the one source of truth).
#: Chosen by measurement (callgrind over a whole ``bench_worker`` run, README "The compiled modules").
#: Never compiled: ``streams.monitoring.monitor`` (its Monitor is the facade tests and tools wrap),
#: ``streams.monitoring.strength`` (reads ``__file__`` at import, which a compiled module lacks),
#: ``streams.core.clock`` (the seam tests and ``bench_worker --digest`` patch), this module, and
#: ``connectors.kafka.emit``, which finds buffered messages by identity (``id(message)``): mypyc copies typed
#: tuples, so compiled, the metrics decoded every outcome again (measured), and ``discard``, which matches by
#: identity too, could not be trusted to take back a failed order's outputs.
COMPILED: tuple[str, ...] = (
    "streams.monitoring.baselines", "streams.monitoring.detectors", "streams.monitoring.anomaly",
    "streams.monitoring.onboarding", "streams.monitoring.peers", "streams.monitoring.open_cases",
    "streams.monitoring.evidence",
    "streams.domain.identifiers", "streams.domain.cms", "streams.domain.order_document", "streams.domain.x12_850",
    "streams.domain.products",
    "streams.pipeline.outcomes", "streams.pipeline.table_state",
    "streams.pipeline.agents.verify", "streams.pipeline.agents.monitor",
)
#: The directory the dotted names are relative to (the one holding ``streams`` and ``connectors``).
ROOT = Path(__file__).resolve().parents[2]
#: Written by setup.py at build time: {"mypy": version, "sources": {dotted module: sha256 of its .py}}.
MANIFEST = Path(__file__).resolve().parent / "native-manifest.json"
#: The shared library the compiled modules load (setup.py's mypyc ``group_name``).
RUNTIME = "csos_native__mypyc"


def source_path(module: str, directory: Path = ROOT) -> Path:
    """The ``.py`` file of a dotted module name under ``directory``."""
    return directory.joinpath(*module.split(".")).with_suffix(".py")


def source_hash(path: Path) -> str:
    """The SHA-256 of a source file, as setup.py records it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiled_files(module: str, directory: Path = ROOT) -> list[Path]:
    """The extension files built for ``module`` (``.../baselines.cpython-311-x86_64-linux-gnu.so``, ...)."""
    base = directory.joinpath(*module.split("."))
    return [p for p in (base.with_name(base.name + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)
            if p.exists()]


def stale(manifest: dict[str, object] | None, directory: Path = ROOT,
          modules: Sequence[str] = COMPILED) -> list[str]:
    """The compiled modules whose source differs from the one they were built from (or has no record)."""
    recorded = manifest.get("sources") if manifest else None
    if not isinstance(recorded, dict):
        recorded = {}
    return [m for m in modules if compiled_files(m, directory)
            and recorded.get(m) != source_hash(source_path(m, directory))]


def read_manifest(path: Path = MANIFEST) -> dict[str, object] | None:
    """The build's manifest, or None when there is none (a pure-Python install) or it is unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _FromSource(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' ``.py`` files ahead of the extensions beside them."""

    def __init__(self, directory: Path, modules: Sequence[str]) -> None:
        self.paths = {m: source_path(m, directory) for m in modules}

    def find_spec(self, fullname: str, path: object = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        source = self.paths.get(fullname)
        return importlib.util.spec_from_file_location(fullname, source) if source is not None else None


def compiled_in_use() -> dict[str, bool]:
    """Per compiled module (dotted name), whether the imported one is the extension (for tests and benchmarks)."""
    out = {}
    for m in COMPILED:
        module = sys.modules.get(m)
        out[m] = module is not None and not str(getattr(module, "__file__", "")).endswith(".py")
    return out


def install() -> str:
    """Decide, before any compiled module is imported, whether they run compiled; returns the mode.

    ``"compiled"``: the extensions match their sources. ``"source"``: none was
    built, ``CSOS_PURE_PYTHON=1``, or a source changed since the build (warned).
    """
    if not any(compiled_files(m) for m in COMPILED):
        return "source"
    forced = os.environ.get("CSOS_PURE_PYTHON", "") == "1"
    changed = [] if forced else stale(read_manifest())
    runtime = importlib.util.find_spec(RUNTIME) is not None
    if not forced and not changed and runtime:
        return "compiled"
    if not runtime and not forced:
        log.warning("the compiled modules are there without their shared library %s (a partial build): "
                    "running the .py sources instead, slower; `make install` rebuilds them", RUNTIME)
    elif changed:
        log.warning("the compiled modules were built from other sources (%s changed since the build): "
                    "running the .py sources instead, slower; `make install` rebuilds them", ", ".join(changed))
    if not any(isinstance(f, _FromSource) for f in sys.meta_path):
        sys.meta_path.insert(0, _FromSource(ROOT, COMPILED))
    return "source"


MODE = install()


def main() -> int:
    """Print the mode; 1 when a build exists but is stale (``make install`` then rebuilds it).

    ``make install`` runs it and reinstalls (rebuilds) on 1, so ``make test`` after an edit or a pull
    tests the compiled build of the sources it has.
    """
    changed = stale(read_manifest())
    print(f"compiled modules: {MODE}" + (f" (stale build: {', '.join(changed)} changed)" if changed else ""))
    return 1 if changed else 0
