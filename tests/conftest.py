"""Shared fixtures: real nodes with real models on loopback."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.nodes import GEMMA3_ID, SMOLLM2_ID, RunningNode, start_node


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """One node serving smollm2-135m (chat) and gemma3-270m (completion style)."""
    running = start_node(tmp_path_factory.mktemp("node"), "--model", "smollm2-135m", "--model", "gemma3-270m")
    yield running
    running.stop()


@pytest.fixture(scope="session")
def expert_ids() -> tuple[str, str]:
    """The ids of the two test experts."""
    return SMOLLM2_ID, GEMMA3_ID
