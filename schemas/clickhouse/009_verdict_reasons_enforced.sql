-- Whether a finding's detector decides (is in the monitor's hold_detectors). Findings of detectors that are
-- not enforced (e.g. the static reference rules) are recorded with enforced = false and never cause a HOLD.
-- Rows written before this column existed were all enforced. Idempotent: re-applied at every start.
ALTER TABLE verdict_reasons ADD COLUMN IF NOT EXISTS enforced Bool DEFAULT true
