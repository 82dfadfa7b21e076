"""Continuous batching in a worker process: outputs match llama-cpp-python, slots free at once, crashes stay in the worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import aiohttp
import pytest

from node.errors import ExpertBusy
from node.serving import catalog
from node.serving.batching import common_prefix, stop_holdback, utf8_complete
from node.serving.experts import ChatMessage, Delta, Finished, GenerationParams, LocalExpert, load_expert
from tests.nodes import SMOLLM2_ID, RunningNode, child_pids, direct_llama, safe_cpu_kernels, start_node

N_CTX = 512
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about rain.",
    "List three fruits.",
    "Explain photosynthesis in one sentence.",
    "Say hello in Spanish.",
    "What is 12 plus 7?",
    "Name a famous painter.",
    "Describe the moon.",
)


# ---- pure helpers: what a stream may show ---------------------------------------------------


def test_text_that_could_start_a_stop_string_is_held_back() -> None:
    assert stop_holdback(b"Hello\nQ", (b"\nQ:",)) == 2
    assert stop_holdback(b"Hello\n", (b"\nQ:", b"\n\n")) == 1
    assert stop_holdback(b"Hello", (b"\nQ:",)) == 0
    assert stop_holdback(b"ab", (b"abc", b"b")) == 2  # the longest pending prefix wins
    assert stop_holdback(b"x", ()) == 0


def test_a_split_utf8_character_is_never_shown_half() -> None:
    text = "caf\u00e9 \U0001f30d".encode()  # a 2-byte and a 4-byte character
    assert utf8_complete(text, len(text)) == len(text)
    for cut in range(len(text) - 3, len(text)):
        assert utf8_complete(text, cut) == len(text) - 4
    assert utf8_complete(text, 4) == 3  # inside the \u00e9
    assert utf8_complete(b"", 0) == 0
    assert utf8_complete(b"\x80\x80", 2) == 2  # not UTF-8 at all: nothing to wait for


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], (1, 2, 4)) == 2
    assert common_prefix([], (1,)) == 0
    assert common_prefix([1, 2], (1, 2)) == 2


def _model(name: str = "smollm2-135m") -> catalog.ModelFile:
    return catalog.resolve(name, catalog.default_models_dir(), progress=False)


@pytest.fixture(scope="module")
def expert() -> Iterator[LocalExpert]:
    loaded = load_expert(_model(), n_ctx=N_CTX, n_threads=1, n_gpu_layers=0, queue_size=4, parallel=8, safe_cpu_kernels=safe_cpu_kernels())
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def direct(expert: LocalExpert):
    """The same model straight through llama-cpp-python, as the old one-at-a-time expert ran it."""
    llama = direct_llama(_model().path, n_ctx=N_CTX, n_threads=1, safe_cpu_kernels=expert.safe_cpu_kernels)
    yield llama
    llama.close()


def _direct(llama, tokens: list[int], stops: tuple[str, ...], max_tokens: int) -> tuple[str, str]:
    """Greedy text and finish reason from llama-cpp-python, from a clean context."""
    llama.reset()
    out = llama.create_completion(prompt=tokens, max_tokens=max_tokens, temperature=0.0, stop=list(stops), seed=1)
    return out["choices"][0]["text"], out["choices"][0]["finish_reason"]


async def _collect(expert: LocalExpert, tokens: list[int], stops: tuple[str, ...], params: GenerationParams):
    """Admit, run to the end and release; the text and the Finished event."""
    expert.admit()
    texts: list[str] = []
    finished = None
    try:
        async for event in expert.generate(tokens, stops, params):
            if isinstance(event, Delta):
                texts.append(event.text)
            else:
                finished = event
    finally:
        expert.release()
    return "".join(texts), finished


@pytest.mark.model
@pytest.mark.parametrize("solo", [False, True])
def test_single_stream_greedy_matches_llama_cpp_python(expert: LocalExpert, direct, solo: bool) -> None:
    for prompt in PROMPTS[:4]:
        tokens, stops = expert.tokenize_chat([ChatMessage("user", prompt)])
        expected_text, expected_reason = _direct(direct, tokens, stops, 40)
        params = GenerationParams(max_tokens=40, temperature=0.0, seed=1, solo=solo)
        text, finished = asyncio.run(_collect(expert, tokens, stops, params))
        assert text == expected_text, prompt
        assert finished.finish_reason == expected_reason
        assert finished.prompt_tokens == len(tokens)


@pytest.mark.model
def test_seeded_sampling_matches_llama_cpp_python(expert: LocalExpert, direct) -> None:
    tokens, stops = expert.tokenize_chat([ChatMessage("user", "Tell me a story about a fox.")])
    direct.reset()
    out = direct.create_completion(prompt=tokens, max_tokens=32, temperature=0.9, top_p=0.9, stop=list(stops), seed=42)
    params = GenerationParams(max_tokens=32, temperature=0.9, top_p=0.9, seed=42, solo=True)
    text, _ = asyncio.run(_collect(expert, tokens, stops, params))
    assert text == out["choices"][0]["text"]


@pytest.mark.model
def test_eight_concurrent_streams_with_their_own_stops_and_lengths(expert: LocalExpert, direct) -> None:
    # Each stream gets a stop string taken from the middle of its own greedy answer, or none, and its own length.
    cases = []
    for index, prompt in enumerate(PROMPTS):
        tokens, style_stops = expert.tokenize_chat([ChatMessage("user", prompt)])
        reference, _ = _direct(direct, tokens, style_stops, 48)
        words = reference.split()
        stop = (words[len(words) // 2],) if index % 2 == 0 and len(words) > 4 else ()
        max_tokens = 8 + 5 * index
        cases.append((tokens, style_stops, stop, max_tokens))

    async def run_all():
        jobs = [
            _collect(expert, tokens, style_stops, GenerationParams(max_tokens=max_tokens, temperature=0.0, stop=stop))
            for tokens, style_stops, stop, max_tokens in cases
        ]
        return await asyncio.gather(*jobs)

    started_s = time.perf_counter()
    results = asyncio.run(run_all())
    elapsed_s = time.perf_counter() - started_s
    same = 0
    for (tokens, style_stops, stop, max_tokens), (text, finished) in zip(cases, results, strict=True):
        expected, expected_reason = _direct(direct, tokens, (*stop, *style_stops), max_tokens)
        for s in (*stop, *style_stops):
            assert s not in text
        assert finished.prompt_tokens == len(tokens)
        assert finished.completion_tokens <= max_tokens
        assert (finished.finish_reason == "length") == (finished.completion_tokens == max_tokens)
        same += (text, finished.finish_reason) == (expected, expected_reason)
    # Batched greedy decoding may pick another token at a near-tie (a batch of 8 sums in another order than
    # a batch of 1), so one answer may drift; slots mixing their cells or samplers would change them all.
    assert same >= len(cases) - 2, same
    stopped = [f for (_, _, s, _), (t, f) in zip(cases, results, strict=True) if s and f.finish_reason == "stop"]
    assert len(stopped) >= 2
    assert any(f.finish_reason == "length" for _, f in results)
    assert expert.queue_depth == 0
    assert elapsed_s < 120


@pytest.mark.model
def test_a_cancelled_stream_frees_its_slot_at_once() -> None:
    two = load_expert(_model(), n_ctx=N_CTX, n_threads=1, n_gpu_layers=0, queue_size=0, parallel=2, safe_cpu_kernels=safe_cpu_kernels())
    try:
        tokens, stops = two.tokenize_text("Count from one to one thousand: one, two, three,"), ()
        long = GenerationParams(max_tokens=300, temperature=0.0)

        async def scenario() -> tuple[float, bool]:
            two.admit()
            two.admit()
            cancelled = two.generate(tokens, stops, long)
            kept = two.generate(tokens, stops, long)
            await cancelled.__anext__()
            await kept.__anext__()
            with pytest.raises(ExpertBusy) as refused:
                two.admit()  # both slots and no queue: a third is refused
            assert refused.value.status == 429
            await cancelled.aclose()  # type: ignore[attr-defined]  # an async generator; the client hung up
            two.release()
            two.admit()
            started_s = time.perf_counter()
            third = two.generate(tokens, stops, GenerationParams(max_tokens=4, temperature=0.0))
            await third.__anext__()
            first_token_s = time.perf_counter() - started_s
            async for _ in third:
                pass
            two.release()
            kept_done = False
            # The kept stream is still far from its 300 tokens: the third one did not wait for it.
            async for event in kept:
                kept_done = kept_done or isinstance(event, Finished)
                break
            await kept.aclose()  # type: ignore[attr-defined]  # an async generator
            two.release()
            return first_token_s, kept_done

        first_token_s, kept_done = asyncio.run(scenario())
        assert not kept_done
        assert first_token_s < 2.0
        assert two.queue_depth == 0
    finally:
        two.close()


# ---- crashes, through a real node ----------------------------------------------------------


@pytest.fixture(scope="module")
def crash_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    running = start_node(
        tmp_path_factory.mktemp("crash"), "--model", "smollm2-135m", "--parallel", "2", "--threads", "1", "--n-ctx", "512"
    )
    yield running
    running.stop()


async def _stream_and_kill(url: str, sig: signal.Signals, node_pid: int) -> tuple[list[dict], int]:
    """Stream a long answer, kill the worker after the first token; the SSE chunks and the killed pid."""
    body = {
        "model": SMOLLM2_ID,
        "messages": [{"role": "user", "content": "Count from one to five hundred, in words."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    chunks: list[dict] = []
    killed = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunks.append(json.loads(line[6:]))
                if not killed and chunks[-1].get("choices") and chunks[-1]["choices"][0]["delta"].get("content"):
                    (killed,) = child_pids(node_pid)
                    os.kill(killed, sig)
    return chunks, killed


async def _answer(url: str) -> dict:
    body = {"model": SMOLLM2_ID, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            return {"status": response.status, **(await response.json())}


async def _health(url: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/healthz") as response:
            return await response.json()


async def _metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/metrics") as response:
            text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + "{") and SMOLLM2_ID in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.model
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGILL])
def test_a_crashed_worker_ends_its_stream_with_an_error_and_restarts(crash_node: RunningNode, sig: signal.Signals) -> None:
    restarts_before = asyncio.run(_metric(crash_node.url, "expertmesh_worker_restarts"))
    chunks, killed = asyncio.run(_stream_and_kill(crash_node.url, sig, crash_node.process.pid))
    assert killed
    errors = [c["error"] for c in chunks if "error" in c]
    assert len(errors) == 1, chunks[-3:]
    assert SMOLLM2_ID in errors[0]["message"] and sig.name in errors[0]["message"]
    assert errors[0]["code"] == "expert_failed"
    assert crash_node.process.poll() is None  # the node survived
    # The next request succeeds once the new worker has loaded.
    deadline_s = time.monotonic() + 60
    answer = asyncio.run(_answer(crash_node.url))
    while answer["status"] != 200 and time.monotonic() < deadline_s:
        time.sleep(0.5)
        answer = asyncio.run(_answer(crash_node.url))
    assert answer["status"] == 200, answer
    assert answer["choices"][0]["message"]["content"]
    assert asyncio.run(_metric(crash_node.url, "expertmesh_worker_restarts")) == restarts_before + 1
    assert child_pids(crash_node.process.pid) != [killed]
    assert f"died ({sig.name})" in crash_node.log()
    if sig == signal.SIGILL:
        # After an illegal instruction the worker runs without llama.cpp's repacked CPU kernels.
        health = asyncio.run(_health(crash_node.url))
        assert health["experts"][0]["safe_cpu_kernels"] is True


def test_load_features_show_running_waiting_and_speed_only_when_present() -> None:
    from bandit.features import ExpertFeatures, ExpertId, NodeId, action_line

    idle = ExpertFeatures(expert_id=ExpertId("e@1"), node_id=NodeId("n"), family="llama", params="135M", quantization="Q4_1")
    busy = ExpertFeatures(
        expert_id=ExpertId("e@1"), node_id=NodeId("n"), family="llama", params="135M", quantization="Q4_1",
        queue_depth=10, running=8, waiting=2, tokens_per_s=70.0,
    )
    assert " run:" not in action_line(idle) and " wait:" not in action_line(idle) and " tps:" not in action_line(idle)
    line = action_line(busy)
    assert " run:2.197" in line and " wait:1.099" in line and " tps:4.263" in line
    assert ExpertFeatures.from_dict(busy.to_dict()) == busy


@pytest.mark.model
def test_a_continuing_conversation_reuses_its_prompt_cells(expert: LocalExpert) -> None:
    first = [ChatMessage("user", "Name three rivers in Europe.")]
    tokens, stops = expert.tokenize_chat(first)
    greedy = GenerationParams(max_tokens=24, temperature=0.0)
    answer, finished = asyncio.run(_collect(expert, tokens, stops, greedy))
    second = [*first, ChatMessage("assistant", answer), ChatMessage("user", "Which one is the longest?")]
    next_tokens, _ = expert.tokenize_chat(second)
    _, next_finished = asyncio.run(_collect(expert, next_tokens, stops, greedy))
    # The whole first prompt comes from the slot's cells; only the answer (as re-tokenized) and the new turn
    # are decoded again.
    assert next_finished.cached_tokens >= len(tokens), (next_finished.cached_tokens, len(tokens))
    assert next_finished.cached_tokens < len(next_tokens)
