"""A pytest plugin (loaded by conftest): a test not marked `model` that loads a model fails, however the model starts.

A model loads through llama.cpp in this process or in a child process (a node, an inference worker, a CPU
self-check probe, a catalog pull); the guard watches both, and remembers fixtures that loaded one, so a test
reusing a cached fixture is caught too.
"""

from __future__ import annotations

import subprocess
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

# Child processes that load a model: a node, an inference worker, a CPU self-check probe, a catalog pull.
_MODEL_MODULES = {"node.serving.worker": "an inference worker", "node.serving.selfcheck": "a CPU self-check probe"}


def _model_process(args: Any) -> str | None:
    """What model-loading process `args` would start, or None."""
    argv = [str(arg) for arg in args] if isinstance(args, (list, tuple)) else str(args).split()
    if "-m" in argv[:-1]:
        module, rest = argv[argv.index("-m") + 1], argv[argv.index("-m") + 2:]
        if module in _MODEL_MODULES:
            return _MODEL_MODULES[module]
        if module in ("node", "node.cli") and rest[:1] == ["start"]:
            return "a node"
        if module == "pip" and rest[:1] == ["download"]:
            return "a catalog pull"
    if argv and Path(argv[0]).name == "expertmesh" and argv[1:2] == ["start"]:
        return "a node"
    return None


class _ModelGuard:
    """Fails a test not marked `model` that loads a model, itself or through a fixture (even a cached one)."""

    def __init__(self) -> None:
        self.item: pytest.Item | None = None
        self.setting_up: list[Any] = []  # the fixture definitions being set up, innermost last
        self.model_fixtures: set[Any] = set()  # definitions whose setup loaded a model
        self.violations: dict[str, str] = {}

    def saw(self, what: str) -> None:
        """Called where a model is about to load; raises if the running test is not marked `model`."""
        if self.setting_up:
            self.model_fixtures.add(self.setting_up[-1])
        item = self.item
        if item is not None and item.get_closest_marker("model") is None:
            message = f"{item.nodeid} starts {what} but is not marked @pytest.mark.model"
            self.violations[item.nodeid] = message
            pytest.fail(message, pytrace=False)

    def unmarked_use(self, item: pytest.Item) -> str | None:
        """Why `item` breaks the rule, if it does: it loaded a model or uses a fixture that did."""
        if item.get_closest_marker("model") is not None:
            return None
        if item.nodeid in self.violations:
            return self.violations[item.nodeid]
        definitions = getattr(item, "_fixtureinfo", None)
        for name, defs in (definitions.name2fixturedefs.items() if definitions is not None else ()):
            if defs and defs[-1] in self.model_fixtures:
                return f"{item.nodeid} uses fixture {name!r}, which starts a model, but is not marked @pytest.mark.model"
        return None


_guard = _ModelGuard()


def pytest_configure(config: pytest.Config) -> None:
    """Watch the places a model loads: llama.cpp in this process, and model-loading child processes."""
    popen_init = subprocess.Popen.__init__

    def watched_popen_init(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
        what = _model_process(args)
        if what is not None:
            _guard.saw(what)
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = watched_popen_init  # type: ignore[method-assign]
    try:
        from llama_cpp import Llama
    except ImportError:
        return
    llama_init = Llama.__init__

    def watched_llama_init(self: Any, *args: Any, **kwargs: Any) -> None:
        _guard.saw("llama.cpp in this process")
        llama_init(self, *args, **kwargs)

    Llama.__init__ = watched_llama_init  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    _guard.item = item
    try:
        return (yield)
    finally:
        _guard.item = None


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: Any) -> Generator[None, object, object]:
    _guard.setting_up.append(fixturedef)
    try:
        return (yield)
    finally:
        _guard.setting_up.pop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    # Before the test body: a cached fixture that started a model counts too.
    reason = _guard.unmarked_use(item)
    if reason is not None:
        pytest.fail(reason, pytrace=False)
    result = yield
    # After it: a model load whose exception the code under test swallowed still fails the test.
    reason = _guard.unmarked_use(item)
    if reason is not None:
        pytest.fail(reason, pytrace=False)
    return result
