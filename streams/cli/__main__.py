"""``python -m streams.cli``: the ``csos`` command (how the tools start worker and sink child processes)."""
from streams.cli import main

if __name__ == "__main__":  # imported (e.g. by a walk over the packages), it does nothing
    main()
