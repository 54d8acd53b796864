"""Stream processing for CSOS order receipt and suspicious order monitoring.

Pure logic (identifiers, order documents, verification, monitoring) lives in
modules with no Kafka or Faust imports, so the same code runs in the stream,
in the offline CLI, in the benchmark and in tests.
"""
