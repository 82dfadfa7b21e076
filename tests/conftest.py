"""Shared fixtures (real nodes with real models on loopback) and the model guard that keeps `-m "not model"` fast."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.model_guard import (  # noqa: F401 - hooks pytest finds here
    pytest_configure,
    pytest_fixture_setup,
    pytest_runtest_call,
    pytest_runtest_protocol,
)
from tests.nodes import GEMMA3_ID, SMOLLM2_ID, RunningNode, nat_internet, start_node


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


@pytest.fixture()
def internet() -> Iterator[dict[str, str]]:
    """Network namespaces: a public net, two NAT home routers and two homes (see tests/nodes.py: nat_internet)."""
    with nat_internet() as namespaces:
        yield namespaces
