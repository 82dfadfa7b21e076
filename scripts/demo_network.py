"""Start three local nodes with different models and watch them meet, then ask each expert through one node.

    python scripts/demo_network.py            # nodes meet by mDNS on loopback
    python scripts/demo_network.py --no-mdns  # nodes meet through --peer and peer exchange
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

from tests.nodes import RunningNode, start_node  # noqa: E402

MEET_TIMEOUT_S = 60


async def _get(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url) as response:
        return await response.json()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-mdns", action="store_true", help="use --peer and peer exchange instead of mDNS")
    args = parser.parse_args()
    mdns = not args.no_mdns
    fast = ("--hello-interval-s", "1")
    with tempfile.TemporaryDirectory() as tmp:
        nodes: list[RunningNode] = []
        try:
            nodes.append(start_node(Path(tmp) / "ana", "--model", "smollm2-135m", *fast, mdns=mdns))
            bootstrap = () if mdns else ("--peer", nodes[0].url)
            nodes.append(start_node(Path(tmp) / "ben", "--model", "gemma3-270m", *bootstrap, *fast, mdns=mdns))
            bootstrap = () if mdns else ("--peer", nodes[1].url)
            nodes.append(
                start_node(Path(tmp) / "chloe", "--model", "smollm2-135m", "--model", "gemma3-270m", *bootstrap, *fast, mdns=mdns)
            )
            names = {n.node_id: name for n, name in zip(nodes, ("ana", "ben", "chloe"), strict=True)}
            for node in nodes:
                sys.stdout.write(f"started {names[node.node_id]:<6} {node.node_id} at {node.url}\n")
            sys.stdout.write(f"discovery: {'mDNS on 127.0.0.1' if mdns else '--peer and peer exchange'}\n")
            async with aiohttp.ClientSession() as session:
                seen: set[tuple[str, str]] = set()
                started_s = time.monotonic()
                while len(seen) < 6 and time.monotonic() - started_s < MEET_TIMEOUT_S:
                    for node in nodes:
                        peers = (await _get(session, node.url + "/v1/peers"))["data"]
                        for peer in peers:
                            if peer["alive"] and (node.node_id, peer["id"]) not in seen:
                                seen.add((node.node_id, peer["id"]))
                                sys.stdout.write(
                                    f"{time.monotonic() - started_s:5.1f} s  {names[node.node_id]:<6} met "
                                    f"{names.get(peer['id'], peer['id']):<6} ({peer['source']}, rtt {peer['rtt_ms']} ms)\n"
                                )
                    await asyncio.sleep(0.2)
                models = (await _get(session, nodes[0].url + "/v1/models"))["data"]
                sys.stdout.write(f"\nana's /v1/models: {', '.join(m['id'] for m in models)}\n")
                for model in models:
                    if model["id"] == "auto":
                        continue
                    body = {
                        "model": model["id"],
                        "messages": [{"role": "user", "content": "What is the capital of France?"}],
                        "max_tokens": 16,
                        "temperature": 0,
                    }
                    async with session.post(nodes[0].url + "/v1/chat/completions", json=body) as response:
                        answer = await response.json()
                    who = answer["expertmesh"]
                    sys.stdout.write(
                        f"asked ana for {who['expert']}: answered on {names.get(who['node'], who['node'])}: "
                        f"{answer['choices'][0]['message']['content'].strip()!r}\n"
                    )
        finally:
            for node in nodes:
                node.stop()


if __name__ == "__main__":
    asyncio.run(main())
