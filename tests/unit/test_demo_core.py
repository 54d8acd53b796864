"""The demo's summary is the same for the same seed, before and after a refactor (issue 13, item 10).

``streams.tools.demo_core`` runs the demo's feed (fixed seed, population, days and end
date) through the verify and monitor processors in process and renders what
``csos demo`` prints from them. The rendering is compared with
``tests/data/demo-core-summary.txt``, written by the code before the issue-13
restructuring. A change of behaviour (a rejection code, a hold, a finding of any
detector, recorded or enforced) fails here; when the change is intended,
regenerate the file with
``.venv/bin/python -m streams.tools.demo_core --write tests/data/demo-core-summary.txt``
and say why in the commit.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from streams.tools.demo_core import EXPECTED, run_core


def test_the_demo_summary_for_the_fixed_seed_is_unchanged(tmp_path: Path) -> None:
    run = run_core(tmp_path)
    got, expected = run.render(), EXPECTED.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), got.splitlines(True), "expected", "now"))
    assert got == expected, f"the demo's summary changed (regenerate only for an intended change):\n{diff}"
    # The run is the demo's, not an empty one: every kind of outcome is present.
    s = run.summary()
    assert s.rejected and s.dead_lettered and s.released and s.held and s.conflicting == 0
