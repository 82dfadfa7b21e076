"""A node with a small queue under more requests than it holds: each is answered or refused, none hangs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.nodes import SMOLLM2_ID, RunningNode, start_node

pytestmark = pytest.mark.model

QUEUE_SIZE = 1
CONCURRENT_REQUESTS = 8
REQUEST_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def small_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    running = start_node(tmp_path_factory.mktemp("small"), "--model", "smollm2-135m", "--queue-size", str(QUEUE_SIZE))
    yield running
    running.stop()


async def _ask(session: aiohttp.ClientSession, url: str, n: int) -> tuple[int, dict, dict]:
    body = {
        "model": SMOLLM2_ID,
        "messages": [{"role": "user", "content": f"Tell me a fact about the number {n}."}],
        "max_tokens": 16,
    }
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        return response.status, dict(response.headers), await response.json()


async def _queue_depth(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/healthz") as response:
        return (await response.json())["experts"][0]["queue_depth"]


async def test_more_requests_than_the_queue_holds_are_answered_or_refused(small_node: RunningNode) -> None:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(_ask(session, small_node.url, n) for n in range(CONCURRENT_REQUESTS)))
        statuses = [status for status, _, _ in results]
        assert len(results) == CONCURRENT_REQUESTS
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 1 + QUEUE_SIZE
        assert statuses.count(429) >= 1
        for status, headers, body in results:
            if status == 429:
                assert int(headers["Retry-After"]) >= 1
                assert body["error"]["code"] == "expert_busy"
            else:
                assert body["choices"][0]["message"]["content"]
        # Once the burst is over the node takes requests again.
        status, _, _ = await _ask(session, small_node.url, 99)
        assert status == 200
        assert await _queue_depth(session, small_node.url) == 0


async def test_a_client_that_hangs_up_mid_stream_frees_the_expert(small_node: RunningNode) -> None:
    body = {
        "model": SMOLLM2_ID,
        "messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
        "max_tokens": 1500,
        "stream": True,
    }
    async with aiohttp.ClientSession() as session:
        response = await session.post(small_node.url + "/v1/chat/completions", json=body)
        assert response.status == 200
        await response.content.readline()
        response.close()  # hang up long before 1500 tokens (about 40 s at 40 tokens/s)
        for _ in range(100):
            if await _queue_depth(session, small_node.url) == 0:
                break
            await asyncio.sleep(0.1)
        assert await _queue_depth(session, small_node.url) == 0


def test_cli_ask_streams_an_answer(small_node: RunningNode) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node", "ask", "What is 2+2?", "--node", small_node.url, "--stream", "--max-tokens", "12"],
        capture_output=True,
        text=True,
        timeout=REQUEST_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert f"answered by {SMOLLM2_ID} on node {small_node.node_id}" in result.stderr


def test_cli_ask_reports_an_unknown_model(small_node: RunningNode) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node", "ask", "Hi", "--node", small_node.url, "--model", "nope@1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "error 404" in result.stderr and "nope@1" in result.stderr


def test_restart_keeps_node_id_and_expert_ids(tmp_path: Path) -> None:
    first = start_node(tmp_path / "data", "--model", "smollm2-135m")
    try:
        assert first.stop() == 0  # SIGTERM stops the node cleanly
    finally:
        first.stop()
    second = start_node(tmp_path / "data", "--model", "smollm2-135m")
    try:
        assert second.node_id == first.node_id
        assert f"serving {SMOLLM2_ID}" in second.log()
    finally:
        second.stop()
