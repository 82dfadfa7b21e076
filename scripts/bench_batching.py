"""Continuous batching: N concurrent streams against this node, the old one-at-a-time node and sequential llama-cpp-python.

For N = 1, 2, 4, 8 (interleaved, round after round, so drift on a shared machine hits every path alike):

- `direct`: the same model in this process through llama-cpp-python, the N requests one after another
  (all N arrive at once, so the k-th waits for the k-1 before it: that is its time to first token);
- `old node`: the node as it was before batching (one worker thread per expert), checked out from git
  into a temporary folder, N concurrent streams over HTTP;
- `node`: this node (worker process, `--parallel 8`), N concurrent streams over HTTP.

Prints aggregate tokens/s, tokens per CPU-second (the serving processes' user+system time), p50/p99 time
to first token, the node's RSS at N = 8, and the ratios the issue asks for.

    python scripts/bench_batching.py [--model smollm2-135m] [--max-tokens 128] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.config import default_models_dir  # noqa: E402
from node.serving import catalog  # noqa: E402
from tests.nodes import (  # noqa: E402
    child_pids,
    direct_llama,  # noqa: E402
    start_node,
)

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market, with many details.",
    "Write a letter to a friend about your holidays.",
    "Explain the water cycle step by step, at length.",
    "Tell the history of the bicycle.",
    "Describe how to bake bread, step by step.",
    "Write a long poem about the mountains.",
]
STREAMS = (1, 2, 4, 8)
SAFE_KERNELS_SHIM = """
# Written by scripts/bench_batching.py: the old node's Llama loads without llama.cpp's repacked CPU kernels.
import llama_cpp.llama_cpp as _low

_original = _low.llama_model_default_params


def _safe_params():
    params = _original()
    params.use_extra_bufts = False
    return params


_low.llama_model_default_params = _safe_params
"""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Run:
    """N streams on one path: tokens, wall time, CPU time, times to first token."""

    tokens: int
    wall_s: float
    cpu_s: float
    ttfts_s: list[float]
    parent_cpu_s: float = 0.0  # the node process alone: HTTP, admission, reading the worker's pipe


def _tree(pid: int) -> list[int]:
    """`pid` and its child processes (the node and its inference workers)."""
    return [pid, *child_pids(pid)]


def cpu_s(pid: int, *, children: bool = True) -> float:
    """User+system CPU seconds of a process and (by default) its live children."""
    total = 0
    for p in _tree(pid) if children else [pid]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its live children, in MB."""
    total = 0
    for p in _tree(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except OSError:
            continue
    return total * PAGE_BYTES / 1e6


def old_node_source(target: Path) -> str:
    """Unpack the newest commit whose node/experts.py (before the move to node/serving/) ran one request at a time."""
    commits = subprocess.run(
        ["git", "-C", str(REPO), "log", "--format=%H", "--", "node/experts.py"], capture_output=True, text=True, check=True
    ).stdout.split()
    for commit in commits:
        text = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{commit}:node/experts.py"], capture_output=True, text=True
        ).stdout
        if "ThreadPoolExecutor" in text:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
            with tarfile.open(fileobj=BytesIO(archive)) as tar:
                tar.extractall(target, filter="data")
            return commit
    raise SystemExit("no commit with the one-at-a-time node found")


def direct_run(llama, n: int, max_tokens: int) -> Run:
    """N requests one after another in this process; all arrived at the start."""
    cpu0, started = time.process_time(), time.perf_counter()
    tokens = 0
    ttfts: list[float] = []
    for i in range(n):
        first = None
        for chunk in llama.create_chat_completion(
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=max_tokens, temperature=0, seed=1, stream=True,
        ):
            if chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                tokens += 1
        ttfts.append((first or time.perf_counter()) - started)
    return Run(tokens, time.perf_counter() - started, time.process_time() - cpu0, ttfts)


async def _stream(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int, started: float):
    body = {
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "seed": 1, "stream": True, "stream_options": {"include_usage": True},
    }
    first = None
    tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
    return tokens, (first or time.perf_counter()) - started


async def node_run(session, url: str, pid: int, model: str, n: int, max_tokens: int, rss: list[float]) -> Run:
    """N concurrent streams through a node's API."""
    cpu0, parent0, started = cpu_s(pid), cpu_s(pid, children=False), time.perf_counter()
    jobs = [asyncio.create_task(_stream(session, url, model, PROMPTS[i % len(PROMPTS)], max_tokens, started)) for i in range(n)]
    while not all(job.done() for job in jobs):
        rss.append(rss_mb(pid))
        await asyncio.wait(jobs, timeout=0.5)
    results = [job.result() for job in jobs]
    wall = time.perf_counter() - started
    parent = cpu_s(pid, children=False) - parent0
    return Run(sum(t for t, _ in results), wall, cpu_s(pid) - cpu0, [f for _, f in results], parent)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--streams", default=",".join(map(str, STREAMS)), help="concurrent stream counts, e.g. 1,2,4,8")
    args = parser.parse_args()
    streams = tuple(int(n) for n in args.streams.split(","))

    model = catalog.resolve(args.model, default_models_dir(), progress=True)
    n_ctx = 1024
    common = ["--model", args.model, "--n-ctx", str(n_ctx), "--threads", str(args.threads), "--queue-size", "16"]
    runs: dict[tuple[str, int], list[Run]] = {}
    rss: dict[str, list[float]] = {"node": [], "old node": []}
    with tempfile.TemporaryDirectory() as tmp:
        old_src = Path(tmp) / "old"
        commit = old_node_source(old_src)
        node = start_node(Path(tmp) / "new", *common, "--parallel", str(args.parallel))
        with urllib.request.urlopen(node.url + "/healthz") as response:
            safe = json.load(response)["experts"][0]["safe_cpu_kernels"]
        if safe:
            # This CPU dies in llama.cpp's repacked kernels (the node's worker fell back): the old node and
            # the direct path get the same safe kernels, or they would crash and the comparison be unfair.
            (old_src / "sitecustomize.py").write_text(SAFE_KERNELS_SHIM)
        llama = direct_llama(model.path, n_ctx=n_ctx, n_threads=args.threads, safe_cpu_kernels=safe)
        old = _start_in(old_src, Path(tmp) / "old-data", common, {"PYTHONPATH": str(old_src)})
        with urllib.request.urlopen(old.url + "/healthz") as response:
            if "parallel" in json.load(response)["experts"][0]:
                raise SystemExit("the old node runs this tree's code, not the old commit's")
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
                async with session.get(node.url + "/v1/models") as response:
                    expert_id = (await response.json())["data"][1]["id"]
                # Warm every path once.
                direct_run(llama, 1, 8)
                await node_run(session, node.url, node.process.pid, expert_id, 1, 8, [])
                await node_run(session, old.url, old.process.pid, expert_id, 1, 8, [])
                for _ in range(args.rounds):
                    for n in streams:
                        runs.setdefault(("direct", n), []).append(direct_run(llama, n, args.max_tokens))
                        for name, running in (("old node", old), ("node", node)):
                            samples = rss[name] if n == max(streams) else []
                            run = await node_run(session, running.url, running.process.pid, expert_id, n, args.max_tokens, samples)
                            runs.setdefault((name, n), []).append(run)
        finally:
            node.stop()
            old.stop()

    out = sys.stdout
    out.write(
        f"model {model.name}, {args.max_tokens} tokens per stream, {args.rounds} rounds, threads {args.threads}, "
        f"node --parallel {args.parallel}, old node = commit {commit[:10]}, cpu count {os.cpu_count()}, "
        f"safe CPU kernels {safe}\n"
    )
    out.write(f"{'path':<9} {'N':>2} {'tokens/s':>9} {'tok/CPU-s':>10} {'p50 ttft s':>11} {'p99 ttft s':>11}\n")
    table: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    for n in streams:
        for name in ("direct", "old node", "node"):
            measured = runs[(name, n)]
            tokens = sum(r.tokens for r in measured)
            tps = tokens / sum(r.wall_s for r in measured)
            tpc = tokens / sum(r.cpu_s for r in measured)
            ttfts = [t for r in measured for t in r.ttfts_s]
            table[(name, n)] = (tps, tpc, _p(ttfts, 0.5), _p(ttfts, 0.99))
            out.write(f"{name:<9} {n:>2} {tps:>9.1f} {tpc:>10.1f} {_p(ttfts, 0.5):>11.2f} {_p(ttfts, 0.99):>11.2f}\n")
    top = max(streams)
    out.write(f"RSS at N={top}: node {max(rss['node']):.0f} MB (node + worker), old node {max(rss['old node']):.0f} MB\n")
    out.write(
        f"N={top}: node tokens/CPU-s {table[('node', top)][1] / table[('direct', top)][1]:.2f}x sequential direct "
        f"(goal >= 1.4x), {table[('node', top)][1] / table[('old node', top)][1]:.2f}x old node; "
        f"p50 TTFT {table[('old node', top)][2] / table[('node', top)][2]:.1f}x lower than the old node (goal >= 4x)\n"
    )
    node_1 = runs[("node", 1)]
    tokens_1 = sum(r.tokens for r in node_1)
    out.write(
        f"N=1 streaming cost: node process (HTTP, SSE, worker pipe) {1000 * sum(r.parent_cpu_s for r in node_1) / tokens_1:.2f} "
        f"CPU-ms per token, worker {1000 * sum(r.cpu_s - r.parent_cpu_s for r in node_1) / tokens_1:.2f} CPU-ms per token\n"
    )
    out.write(
        f"N=1: node tokens/s {table[('node', 1)][0] / table[('direct', 1)][0]:.3f}x direct (goal >= 0.97x), "
        f"tokens/CPU-s {table[('node', 1)][1] / table[('direct', 1)][1]:.3f}x, "
        f"TTFT {1000 * (table[('node', 1)][2] - table[('direct', 1)][2]):+.1f} ms\n"
    )


def _start_in(source: Path, data_dir: Path, args: list[str], env: dict[str, str]):
    """Start a node from another source tree (the old node)."""
    here = os.getcwd()
    os.chdir(source)
    try:
        return start_node(data_dir, *args, env=env)
    finally:
        os.chdir(here)


if __name__ == "__main__":
    asyncio.run(main())
