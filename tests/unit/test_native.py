"""The monitor runs compiled only when built from the sources beside it, and decides the same either way.

``setup.py`` compiles the monitor's hot modules with mypyc at install;
``streams.monitoring.native`` imports their ``.py`` sources instead when one
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

import pytest

from streams.monitoring import native
from streams.tools.demo_core import EXPECTED

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.skipif(os.environ.get("CSOS_PURE_PYTHON") == "1", reason="installed as plain Python on purpose")
def test_this_install_runs_the_monitor_compiled() -> None:
    # `make install` builds the extensions (setup.py); the figures in README "Performance" assume them.
    in_use = native.compiled_in_use()
    assert native.MODE == "compiled" and all(in_use.values()), (
        f"the monitor runs from source ({in_use}): the mypyc build failed or is stale; "
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


def test_pure_python_mode_imports_every_compiled_module_from_its_source() -> None:
    r = _run("import streams.monitoring, streams.monitoring.native as n, sys\n"
             "import streams.monitoring.detectors, streams.monitoring.anomaly, streams.monitoring.onboarding\n"
             "import streams.monitoring.peers, streams.monitoring.open_cases, streams.monitoring.evidence\n"
             "print(n.MODE, sorted(m for m, c in n.compiled_in_use().items() if c))", CSOS_PURE_PYTHON="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "source []"


def test_the_demo_feed_decides_the_same_from_source_as_compiled() -> None:
    # tests/unit/test_demo_core.py checks this install's mode (compiled) against the same expected summary:
    # every rejection, hold and detector finding of the demo's fixed feed, byte for byte.
    r = _run("import sys, streams.monitoring.native as n\n"
             "from streams.tools.demo_core import core_summary\n"
             "assert n.MODE == 'source', n.MODE\n"
             "sys.stdout.write(core_summary())", CSOS_PURE_PYTHON="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == EXPECTED.read_text()
