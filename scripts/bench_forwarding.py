"""Forwarding overhead: the same requests served by the hosting node directly and through a second node.

Starts node A (gemma3-270m) and node B (smollm2-135m, --peer A) on loopback; asks B's expert
on B, then on A (which forwards to B over the peer API), interleaved, at temperature 0.
Prints time to first token and decode tokens/s for both, the added latency and the ratio
(goal: <= 3 ms added, >= 0.97x tokens/s).

    python scripts/bench_forwarding.py [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serving import PROMPTS, Sample, http_sample, summary  # noqa: E402

from tests.nodes import SMOLLM2_ID, start_node  # noqa: E402


async def _wait_listed(session: aiohttp.ClientSession, url: str, expert_id: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with session.get(url + "/v1/models") as response:
            if expert_id in {m["id"] for m in (await response.json())["data"]}:
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{expert_id} never appeared at {url}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        a = start_node(Path(tmp) / "a", "--model", "gemma3-270m")
        b = start_node(Path(tmp) / "b", "--model", "smollm2-135m", "--peer", a.url)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
                await _wait_listed(session, a.url, SMOLLM2_ID)
                results: dict[str, list[Sample]] = {"direct (B)": [], "forwarded (A->B)": []}
                await http_sample(session, b.url, SMOLLM2_ID, PROMPTS[0], 8)
                await http_sample(session, a.url, SMOLLM2_ID, PROMPTS[0], 8)
                # Both paths reach the same llama.cpp context on B, which reuses a cached prompt prefix:
                # a numbered prompt per request keeps either path from riding on the other's cache.
                n = 0
                for _ in range(args.rounds):
                    for prompt in PROMPTS:
                        for name, url in (("direct (B)", b.url), ("forwarded (A->B)", a.url)):
                            n += 1
                            question = f"Question {n:03d}. {prompt}"
                            results[name].append(await http_sample(session, url, SMOLLM2_ID, question, args.max_tokens))
        finally:
            a.stop()
            b.stop()

    direct_tps, direct_ttft = summary(results["direct (B)"])
    sys.stdout.write(f"{len(PROMPTS)} prompts x {args.rounds} rounds, {args.max_tokens} tokens each, smollm2-135m on B\n")
    sys.stdout.write(f"{'path':<18} {'tokens/s':>9} {'ttft ms':>8} {'tps ratio':>10} {'ttft added ms':>14}\n")
    for name, samples in results.items():
        tps, ttft = summary(samples)
        sys.stdout.write(f"{name:<18} {tps:>9.1f} {ttft:>8.1f} {tps / direct_tps:>9.3f}x {ttft - direct_ttft:>+14.1f}\n")


if __name__ == "__main__":
    asyncio.run(main())
