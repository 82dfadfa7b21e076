"""The model guard (tests/model_guard.py): a test not marked `model` that loads a model fails, whichever way the model starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Command lines that name a model-loading module; `-c pass` makes each child exit at once, so no model loads here.
INNER = '''
import subprocess, sys
import pytest

WORKER = [sys.executable, "-c", "pass", "-m", "node.serving.worker"]


@pytest.fixture(scope="module")
def model_fixture():
    subprocess.run(WORKER, check=True)


@pytest.mark.model
def test_marked_may_start_one(model_fixture):
    pass


def test_unmarked_reusing_the_cached_fixture(model_fixture):
    pass


def test_unmarked_starting_a_node():
    subprocess.run([sys.executable, "-c", "pass", "-m", "node", "start"], check=True)


def test_unmarked_swallowing_the_failure():
    try:
        subprocess.run(WORKER, check=True)
    except BaseException:
        pass


def test_unmarked_without_a_model():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
'''


def test_the_guard_fails_unmarked_model_tests_only(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    model: starts a model\n")
    (tmp_path / "conftest.py").write_text("from tests.model_guard import *  # noqa: F403\n")
    (tmp_path / "test_inner.py").write_text(INNER)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "test_inner.py"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}, timeout=120,
    )
    out = result.stdout
    assert "PASSED test_inner.py::test_marked_may_start_one" in out, out
    assert "PASSED test_inner.py::test_unmarked_without_a_model" in out, out
    assert "uses fixture 'model_fixture', which starts a model" in out, out
    assert "test_unmarked_starting_a_node starts a node but is not marked" in out, out
    assert "test_unmarked_swallowing_the_failure starts an inference worker but is not marked" in out, out
    assert "3 failed, 2 passed" in out, out
