"""The hot modules run compiled only when built from the sources beside them, and decide the same either way.

``setup.py`` compiles a worker's hot modules (the monitor's, the order parsers, the
processors, the emitter) with mypyc at install;
``streams.core.native`` imports their ``.py`` sources instead when one
changed since the build (else a ``git pull`` would silently run old code) or
when ``CSOS_PURE_PYTHON=1``. What a user relies on: the speed of the install
they made (the compiled modules are in use), no stale code, and the same
holds and releases in both modes.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import shutil

import pytest

from streams.core import native
from streams.tools.demo_core import EXPECTED

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.skipif(os.environ.get("CSOS_PURE_PYTHON") == "1", reason="installed as plain Python on purpose")
def test_this_install_runs_the_hot_modules_compiled() -> None:
    # `make install` builds the extensions (setup.py); the figures in README "Performance" assume them.
    r = _run("import importlib, streams.core.native as n\n"
             "for m in n.COMPILED: importlib.import_module(m)\n"
             "print(n.MODE, sorted(m for m, c in n.compiled_in_use().items() if not c))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "compiled []", (
        f"some hot modules run from source ({r.stdout.strip()}): the mypyc build failed or is stale; "
        "see the output of `make install` (a C compiler is needed)")


def _fake_build(tmp_path: Path, source: str) -> dict[str, object]:
    (tmp_path / "hot.py").write_text(source)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (tmp_path / f"hot{suffix}").write_bytes(b"")
    return {"sources": {"hot": hashlib.sha256(source.encode()).hexdigest()}}


def test_a_source_edited_after_the_build_is_stale(tmp_path: Path) -> None:
    manifest = _fake_build(tmp_path, "x = 1\n")
    assert native.stale(manifest, tmp_path, ["hot"]) == []
    (tmp_path / "hot.py").write_text("x = 2\n")
    assert native.stale(manifest, tmp_path, ["hot"]) == ["hot"]


def test_a_module_of_a_package_is_found_by_its_dotted_name(tmp_path: Path) -> None:
    package = tmp_path / "connectors" / "kafka"
    package.mkdir(parents=True)
    (package / "emit.py").write_text("x = 1\n")
    (package / f"emit{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    manifest = {"sources": {"connectors.kafka.emit": hashlib.sha256(b"x = 1\n").hexdigest()}}
    assert native.compiled_files("connectors.kafka.emit", tmp_path) != []
    assert native.stale(manifest, tmp_path, ["connectors.kafka.emit"]) == []
    (package / "emit.py").write_text("x = 2\n")
    assert native.stale(manifest, tmp_path, ["connectors.kafka.emit"]) == ["connectors.kafka.emit"]


def test_a_build_without_a_manifest_or_a_record_is_stale(tmp_path: Path) -> None:
    _fake_build(tmp_path, "x = 1\n")
    assert native.stale(None, tmp_path, ["hot"]) == ["hot"]
    assert native.stale({"sources": {}}, tmp_path, ["hot"]) == ["hot"]
    assert native.stale({"sources": "garbage"}, tmp_path, ["hot"]) == ["hot"]


def test_a_module_that_was_not_compiled_is_never_stale(tmp_path: Path) -> None:
    (tmp_path / "cold.py").write_text("x = 1\n")
    assert native.stale(None, tmp_path, ["cold"]) == []


def test_the_manifest_records_the_sources_the_extensions_were_built_from() -> None:
    if not any(native.compiled_files(m) for m in native.COMPILED):
        pytest.skip("no compiled build in this install")
    manifest = json.loads(native.MANIFEST.read_text())
    assert set(manifest["sources"]) == set(native.COMPILED)
    assert native.stale(manifest) == []


def test_the_compiled_list_covers_the_worker_hot_path_and_never_the_seams() -> None:
    # What tests and `bench_worker --digest` patch, or what must stay a plain class, is never compiled.
    assert {"streams.domain.cms", "streams.domain.x12_850", "streams.pipeline.agents.verify",
            "streams.pipeline.agents.monitor"} <= set(native.COMPILED)
    # connectors.kafka.emit finds buffered messages by identity (id(message)), which mypyc's copies of typed
    # tuples break: compiled, the metrics decoded every outcome again, and discard() matches by identity too.
    assert not {"streams.core.native", "streams.core.clock", "streams.monitoring.monitor",
                "streams.monitoring.strength", "connectors.kafka.emit"} & set(native.COMPILED)
    assert all(native.source_path(m).is_file() for m in native.COMPILED)


def test_pure_python_mode_imports_every_compiled_module_from_its_source() -> None:
    r = _run("import importlib, streams.core.native as n\n"
             "for m in n.COMPILED: importlib.import_module(m)\n"
             "print(n.MODE, sorted(m for m, c in n.compiled_in_use().items() if c))", CSOS_PURE_PYTHON="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "source []"


@pytest.mark.parametrize("edited", ["streams.pipeline.agents.verify", "streams.domain.x12_850",
                                    "streams.pipeline.outcomes", "streams.monitoring.baselines"])
def test_an_edited_source_sends_every_compiled_module_back_to_its_source(tmp_path: Path, edited: str) -> None:
    # A copy of this install (extensions, shared library and manifest included) with one source edited after
    # the build: the copy warns and imports all the compiled modules from their .py files, none stale-compiled.
    if not any(native.compiled_files(m) for m in native.COMPILED):
        pytest.skip("no compiled build in this install")
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("streams", "connectors"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    for runtime in ROOT.glob(f"{native.RUNTIME}*"):
        shutil.copy(runtime, tmp_path)
    (tmp_path / "schemas").symlink_to(ROOT / "schemas")
    source = native.source_path(edited, tmp_path)
    source.write_text(source.read_text() + "\n# edited after the build\n")
    r = subprocess.run([sys.executable, "-c",
                        "import importlib, logging, streams.core.native as n\n"
                        "for m in n.COMPILED: importlib.import_module(m)\n"
                        "print(n.MODE, n.ROOT, sorted(m for m, c in n.compiled_in_use().items() if c))"],
                       cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "CSOS_PURE_PYTHON"},
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["source", str(tmp_path), "[]"]
    assert f"{edited} changed since the build" in r.stderr


def test_the_demo_feed_decides_the_same_from_source_as_compiled() -> None:
    # tests/unit/test_demo_core.py checks this install's mode (compiled) against the same expected summary:
    # every rejection, hold and detector finding of the demo's fixed feed, byte for byte.
    r = _run("import sys, streams.core.native as n\n"
             "from streams.tools.demo_core import core_summary\n"
             "assert n.MODE == 'source', n.MODE\n"
             "sys.stdout.write(core_summary())", CSOS_PURE_PYTHON="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == EXPECTED.read_text()
