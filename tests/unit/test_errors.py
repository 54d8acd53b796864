"""One error root: every deliberate error has a stable code, and the CLI reports an unhandled one in one place."""
from __future__ import annotations

import inspect

import click
from click.testing import CliRunner

from streams.cli import main
from streams.core.errors import EXIT_CONFIG, ConfigError, CsosError


def _error_classes() -> list[type[CsosError]]:
    import importlib
    import pkgutil

    import connectors
    import streams
    found = []
    for pkg in (streams, connectors):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if ".tools" in info.name or info.name.endswith("app"):
                continue  # tools are not production; streams.pipeline.app builds a Faust app on import
            module = importlib.import_module(info.name)
            found += [c for _, c in inspect.getmembers(module, inspect.isclass)
                      if issubclass(c, BaseException) and c.__module__ == module.__name__
                      and not c.__name__.startswith("_")]  # private ones are control flow inside one module
    return list(dict.fromkeys(found))  # a module reached twice by the walk counts once


def test_every_error_class_of_production_code_derives_from_the_root_with_its_own_code() -> None:
    classes = _error_classes()
    assert len(classes) >= 15
    outside = [c.__qualname__ for c in classes if not issubclass(c, CsosError)]
    assert outside == []
    without = [c.__qualname__ for c in classes if "code" not in vars(c)]
    assert without == []  # each names its own code ...
    codes = [c.code for c in classes]
    assert len(set(codes)) == len(codes)  # ... and no two the same


def test_the_cli_prints_an_unhandled_error_with_its_code_and_exit_code() -> None:
    class Broken(ConfigError):
        code = "TEST_BROKEN"

    @main.command("raise-for-test", hidden=True)
    def raise_for_test() -> None:
        raise Broken("CSOS_SOMETHING is not a number")

    try:
        result = CliRunner().invoke(main, ["raise-for-test"])
    finally:
        main.commands.pop("raise-for-test")
    assert result.exit_code == EXIT_CONFIG
    assert "error [TEST_BROKEN] CSOS_SOMETHING is not a number" in result.output
    assert isinstance(main, click.Group)
