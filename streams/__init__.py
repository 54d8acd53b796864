"""Stream processing for CSOS order receipt and suspicious order monitoring, in layers (README "Layout").

Pure logic (``domain``, ``verification``, ``monitoring``, ``cases``) has no Kafka or Faust imports, so the
same code runs in the stream, in the offline CLI, in the benchmark and in tests; ``pipeline`` runs it on
Kafka, ``apps`` serve analysts, ``tools`` are not production, ``cli`` is the ``csos`` command.

``streams.core.native`` runs first: it decides whether the mypyc-compiled modules (setup.py) or their
sources are imported.
"""
from streams.core import native  # before any module it may compile

__all__ = ["native"]
