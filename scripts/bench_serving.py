"""Serving overhead: the same prompts through a node's API and straight through llama-cpp-python, in one run.

Prints decode tokens/s and time to first token for each path, and the node's ratios against direct
(goal: >= 0.97x tokens/s, <= 5 ms added time to first token). When `llama_cpp.server` can be
imported (the `llama-cpp-python[server]` extra), it is measured the same way as a third path.

    python scripts/bench_serving.py [--model smollm2-135m] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.config import default_models_dir  # noqa: E402
from node.serving import catalog  # noqa: E402
from node.serving.native import load_llama  # noqa: E402
from tests.nodes import safe_cpu_kernels, start_node  # noqa: E402

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "List some good habits for programmers.",
    "Describe a cat to someone who has never seen one.",
    "What makes bread rise?",
]


@dataclass(frozen=True)
class Sample:
    """One generation's timing."""

    ttft_s: float
    decode_tokens: int
    decode_s: float


def summary(samples: list[Sample]) -> tuple[float, float]:
    """Decode tokens/s over all samples, and median time to first token in ms."""
    tokens = sum(s.decode_tokens for s in samples)
    seconds = sum(s.decode_s for s in samples)
    return tokens / seconds, statistics.median(s.ttft_s for s in samples) * 1000


def direct_sample(llama, prompt: str, max_tokens: int) -> Sample:
    """One streamed chat completion straight through llama-cpp-python."""
    started = time.perf_counter()
    first = last = None
    pieces = 0
    for chunk in llama.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, seed=1, stream=True
    ):
        if chunk["choices"][0]["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
            pieces += 1
    assert first is not None and last is not None, "no content was streamed"
    return Sample(first - started, pieces - 1, last - first)


async def http_sample(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    """One streamed chat completion through an OpenAI-compatible server."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1,
        "stream": True,
    }
    started = time.perf_counter()
    first = last = None
    pieces = 0
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                pieces += 1
    # Streamed content chunks are counted the same way on every path (one per token but for held-back text).
    assert first is not None and last is not None, "no content was streamed"
    return Sample(first - started, pieces - 1, last - first)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_llama_server(model_path: Path, n_ctx: int, threads: int | None) -> tuple[subprocess.Popen, str] | None:
    """`python -m llama_cpp.server` when its extra is installed."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None
    port = _free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--port", str(port),
               "--host", "127.0.0.1", "--n_ctx", str(n_ctx)]
    if threads:
        command += ["--n_threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    return None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    model = catalog.resolve(args.model, default_models_dir(), progress=True)
    n_ctx = 2048
    # The same kernels a node would pick on this CPU (its self-check verdict), or llama.cpp may die of AMX here.
    llama = load_llama(str(model.path), safe_cpu_kernels=safe_cpu_kernels(), n_ctx=n_ctx, n_threads=args.threads, verbose=False)
    with tempfile.TemporaryDirectory() as data_dir:
        extra = ["--model", args.model, "--n-ctx", str(n_ctx)] + (["--threads", str(args.threads)] if args.threads else [])
        node = start_node(Path(data_dir), *extra)
        server = _start_llama_server(model.path, n_ctx, args.threads)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
                async with session.get(node.url + "/v1/models") as response:
                    expert_id = (await response.json())["data"][1]["id"]
                results: dict[str, list[Sample]] = {"direct": [], "node": [], "llama_cpp.server": []}
                # Warm both paths, then interleave them prompt by prompt so drift hits both alike.
                direct_sample(llama, PROMPTS[0], 8)
                await http_sample(session, node.url, expert_id, PROMPTS[0], 8)
                if server:
                    await http_sample(session, server[1], args.model, PROMPTS[0], 8)
                for _ in range(args.rounds):
                    for prompt in PROMPTS:
                        results["direct"].append(direct_sample(llama, prompt, args.max_tokens))
                        results["node"].append(await http_sample(session, node.url, expert_id, prompt, args.max_tokens))
                        if server:
                            results["llama_cpp.server"].append(
                                await http_sample(session, server[1], args.model, prompt, args.max_tokens)
                            )
        finally:
            node.stop()
            if server:
                server[0].terminate()
                server[0].wait(timeout=30)

    direct_tps, direct_ttft = summary(results["direct"])
    sys.stdout.write(
        f"model {model.name}, {len(PROMPTS)} prompts x {args.rounds} rounds, {args.max_tokens} tokens each, "
        f"threads {args.threads or 'default'}, cpu count {os.cpu_count()}\n"
    )
    sys.stdout.write(f"{'path':<18} {'tokens/s':>9} {'ttft ms':>8} {'tps ratio':>10} {'ttft added ms':>14}\n")
    for name, samples in results.items():
        if not samples:
            sys.stdout.write(f"{name:<18} (not installed: pip install 'llama-cpp-python[server]')\n")
            continue
        tps, ttft = summary(samples)
        sys.stdout.write(f"{name:<18} {tps:>9.1f} {ttft:>8.1f} {tps / direct_tps:>9.3f}x {ttft - direct_ttft:>+14.1f}\n")


if __name__ == "__main__":
    asyncio.run(main())
