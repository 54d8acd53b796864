"""Configuration is read when a process asks for it (``Settings.from_env``, in sections), never at import time.

A value frozen at import ignores a variable a test, a tool or a child process sets afterwards, and makes
the result depend on which module happened to be imported first.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from connectors.kafka.io import producer_defaults
from streams.apps.review.dashboard import dashboard_url
from streams.apps.review.web import ReviewConfig, users_path
from streams.core.config import Settings

REPO = Path(__file__).resolve().parents[2]
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _import_time_env_reads(tree: ast.AST) -> list[int]:
    """Lines that touch ``os.environ`` / ``os.getenv`` outside any function (run when the module is imported)."""
    found: list[int] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, SCOPES):
            return
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                and node.attr in ("environ", "getenv"):
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_module_reads_the_environment_when_it_is_imported() -> None:
    offenders = {}
    for root in ("streams", "connectors"):
        for path in sorted((REPO / root).rglob("*.py")):
            lines = _import_time_env_reads(ast.parse(path.read_text(), str(path)))
            if lines:
                offenders[str(path.relative_to(REPO))] = lines
    assert offenders == {}


def test_producer_compression_follows_the_environment_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_COMPRESSION", "zstd")
    assert producer_defaults()["compression.type"] == "zstd"
    monkeypatch.delenv("KAFKA_COMPRESSION")
    assert producer_defaults()["compression.type"] == "lz4"
    assert Settings.from_env().kafka.compression == "lz4"


def test_the_review_section_is_read_with_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {"CSOS_REVIEW_PORT": "7002", "CSOS_REVIEW_HOST": "0.0.0.0", "CSOS_REVIEW_SECRET": "s3",
                        "CSOS_REVIEW_SECURE_COOKIES": " Auto ", "CSOS_REVIEW_USERS": str(tmp_path / "u.json"),
                        "CSOS_REVIEW_TRUSTED_PROXIES": "10.0.0.0/8"}.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    config = ReviewConfig.from_env(settings)
    assert (config.port, config.host, config.secret, config.secure_cookies) == (7002, "0.0.0.0", "s3", "auto")
    assert config.users_path == users_path(settings) == tmp_path / "u.json" and len(config.trusted_proxies) == 1
    assert dashboard_url(settings) == "http://0.0.0.0:7002/dashboard"
    assert "s3" not in repr(settings)  # secrets stay out of logs
