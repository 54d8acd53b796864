#!/usr/bin/env bash
# The freshness barrier under CPU load (issue 12): the revoked-before-receipt end-to-end case, N runs in a row
# (default 50), while one busy-loop process per core competes with the broker, the worker and the sink.
# Usage, from the repository root: tests/barrier_under_load.sh [RUNS]
set -euo pipefail
runs="${1:-50}"
hogs=()
trap 'kill "${hogs[@]}" 2>/dev/null || true' EXIT
for _ in $(seq "$(nproc)"); do
  .venv/bin/python -c 'while True: pass' &
  hogs+=($!)
done
CSOS_TEST_BARRIER_RUNS="$runs" .venv/bin/python -m pytest -q tests/e2e/test_verify_e2e.py \
  -k "revocation_published_just_before_receipt or revoked_after_signing or inactive_registration"
