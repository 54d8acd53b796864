"""The package layers of pyproject.toml's [tool.importlinter] hold, and cover every package.

A wrong import (the ClickHouse package reaching into Kafka, production code importing the simulator, a cycle)
fails here, so CI refuses it; README "Layout" is the map these contracts enforce.
"""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_every_import_keeps_the_layer_contracts() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_the_layers_contract_names_every_package() -> None:
    """A new top-level package (or module) must be given a layer, else the contract would not check it."""
    named = {m.strip() for layer in _contracts()["layers"]["layers"] for m in layer.split("|")}
    present = {f"{root}.{p.stem if p.suffix else p.name}" for root in ("streams", "connectors")
               for p in (REPO / root).iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").exists()}
    assert present - named == set(), f"not in any layer: {sorted(present - named)}"
    assert named - present == set(), f"layers naming no package: {sorted(named - present)}"
