"""Not production: simulator, scenarios, test PKI, demo, benchmarks, evaluation, chaos, a local broker.

Production packages never import this one (an import-linter contract in pyproject.toml)."""
