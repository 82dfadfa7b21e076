"""The `expertmesh` command: start a node, pull and list models, ask a question."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from node.config import DEFAULT_PORT, load_settings, overrides_from
from node.errors import NodeError
from node.serving import catalog

log = logging.getLogger("expertmesh")

DEFAULT_NODE_URL = f"http://127.0.0.1:{DEFAULT_PORT}"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description="A peer-to-peer marketplace node for LLM experts.")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("start", help="start a node (pulls the default expert on first run)")
    start.add_argument("--config", type=Path, help="TOML settings file")
    start.add_argument("--host", help="address of the user API (default 127.0.0.1)")
    start.add_argument("--port", type=int, help=f"port of the user API (default {DEFAULT_PORT}; 0 picks a free one)")
    start.add_argument("--model", action="append", dest="models", help="catalog name or .gguf path (repeatable)")
    start.add_argument(
        "--expert", action="append", dest="experts",
        help="specialist definition: a .toml file or a shipped name (repeatable; <data-dir>/experts/ is read too)",
    )
    start.add_argument("--data-dir", type=Path, help="node key, database and learned state")
    start.add_argument("--models-dir", type=Path, help="cache of pulled models")
    start.add_argument("--n-ctx", type=int, help="context length per expert (default 2048)")
    start.add_argument("--threads", type=int, dest="n_threads", help="CPU threads per expert (default: llama.cpp's)")
    start.add_argument("--n-gpu-layers", type=int, help="layers offloaded to the GPU (default -1: all)")
    start.add_argument(
        "--safe-cpu-kernels", choices=("auto", "true", "false"),
        help="llama.cpp without AMX/repacked kernels: auto (default: a self-check decides), true, false",
    )
    start.add_argument("--queue-size", type=int, help="requests waiting per expert before 429 (default 8)")
    start.add_argument("--parallel", type=int, help="sequence slots per expert, decoded together (default 8 with a GPU, 4 on a CPU)")
    start.add_argument("--peer", action="append", dest="peers", help="bootstrap peer URL (repeatable)")
    start.add_argument("--no-mdns", action="store_false", dest="mdns", default=None, help="do not use mDNS")
    start.add_argument(
        "--mdns-interface", action="append", dest="mdns_interfaces", help="address of an interface for mDNS (default all)"
    )
    start.add_argument("--advertise-url", action="append", dest="advertise_urls", help="URL peers should use for us")
    start.add_argument("--community-secret", help="shared secret every peer request must prove (HMAC)")
    start.add_argument("--peer-dead-after-s", type=float, help="seconds without a hello before a peer is dead (15)")
    start.add_argument("--hello-interval-s", type=float, help="seconds between hellos to each peer (5)")
    start.add_argument("--spot-check-interval-s", type=float, help="seconds between spot checks of peers (300; 0 off)")
    start.add_argument("--peer-idle-timeout-s", type=float, help="give up on a peer silent this long mid-answer (60)")
    start.add_argument("--join", action="append", help="invite from a community's node (repeatable; kept once redeemed)")
    start.add_argument("--relay", action="append", dest="relays", help="URL of a relay to stay reachable through (repeatable)")
    start.add_argument(
        "--offer-relay", action=argparse.BooleanOptionalAction, default=None, dest="relay",
        help="relay for home nodes admitted by invite (a public node)",
    )
    start.add_argument("--relay-open", action="store_true", default=None, help="relay for any node, invite or not")
    start.add_argument("--relay-max-streams", type=int, help="relayed requests in flight at once (64)")
    start.add_argument("--relay-max-bytes-per-s", type=float, help="relayed bytes per second, all tunnels together (2e6)")
    start.add_argument("--api-key", help="key the user API requires (Authorization: Bearer KEY)")
    start.add_argument(
        "--require-api-key", action=argparse.BooleanOptionalAction, default=None,
        help="require the API key (default: only when listening beyond loopback)",
    )
    start.add_argument(
        "--no-share-learning", action="store_false", dest="share_learning", default=None,
        help="do not publish the summary of what this node's users taught",
    )
    start.add_argument(
        "--no-community-learning", action="store_false", dest="use_community_learning", default=None,
        help="do not weigh other nodes' summaries into routing",
    )
    start.add_argument("--no-judge", action="store_false", dest="judge_on_start", default=None, help="do not judge at start")
    start.add_argument("--judge-expert", help="local expert (id or name) that grades open-ended probes")
    start.add_argument("--judge-items", type=int, dest="judge_items_per_dimension", help="probes per dimension (default all)")

    judge = commands.add_parser("judge", help="judge experts on the capability suites (local, or a peer's)")
    judge.add_argument("expert", nargs="?", help="expert id (default: every local expert)")
    judge.add_argument("--peer", help="node id of the peer hosting EXPERT: judge it independently")
    judge.add_argument("--dimensions", nargs="+", help="only these dimensions")
    judge.add_argument("--items", type=int, dest="items_per_dimension", help="probes per dimension (default all; 8 for a peer)")
    judge.add_argument("--force", action="store_true", help="judge again even if a card is stored")
    judge.add_argument("--node", default=os.environ.get("EXPERTMESH_NODE", DEFAULT_NODE_URL), help="node URL")
    judge.add_argument("--api-key", default=os.environ.get("EXPERTMESH_API_KEY"), help="the node's user API key")

    invite = commands.add_parser("invite", help="print a one-line invite to this node (run on a reachable node)")
    invite.add_argument("--ttl-s", type=float, default=24 * 3600, help="seconds the invite stays valid (one day)")
    invite.add_argument("--reusable", action="store_true", help="may be redeemed by many nodes until it expires")
    invite.add_argument("--node", default=os.environ.get("EXPERTMESH_NODE", DEFAULT_NODE_URL), help="node URL")
    invite.add_argument("--api-key", default=os.environ.get("EXPERTMESH_API_KEY"), help="the node's user API key")

    revoke = commands.add_parser("revoke", help="revoke one node's admission (its relay, its hellos), for good")
    revoke.add_argument("node_id")
    revoke.add_argument("--node", default=os.environ.get("EXPERTMESH_NODE", DEFAULT_NODE_URL), help="node URL")
    revoke.add_argument("--api-key", default=os.environ.get("EXPERTMESH_API_KEY"), help="the node's user API key")

    pull = commands.add_parser("pull", help="fetch a model into the cache")
    pull.add_argument("name", help=f"one of {', '.join(catalog.CATALOG)} or a .gguf path")
    pull.add_argument("--models-dir", type=Path)

    models = commands.add_parser("models", help="list pulled models")
    models.add_argument("--models-dir", type=Path)

    peers = commands.add_parser("peers", help="list the peers a node knows")
    peers.add_argument("--node", default=os.environ.get("EXPERTMESH_NODE", DEFAULT_NODE_URL), help="node URL")
    peers.add_argument("--api-key", default=os.environ.get("EXPERTMESH_API_KEY"), help="the node's user API key")

    ask = commands.add_parser("ask", help="ask a node a question")
    ask.add_argument("text")
    ask.add_argument("--node", default=os.environ.get("EXPERTMESH_NODE", DEFAULT_NODE_URL), help="node URL")
    ask.add_argument("--api-key", default=os.environ.get("EXPERTMESH_API_KEY"), help="the node's user API key")
    ask.add_argument("--model", default="auto", help="expert id or auto (default)")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--max-tokens", type=int, default=256)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--decompose", action="store_true", help="split a compound question across experts")
    ask.add_argument("--rate", choices=("up", "down"), help="rate the answer without asking (for scripts)")
    ask.add_argument("--no-rate", action="store_true", help="do not ask for a rating")

    doctor = commands.add_parser("doctor", help="check this machine: Python, llama.cpp backend, CPU, disk, port, mDNS")
    doctor.add_argument("--config", type=Path, help="TOML settings file")
    doctor.add_argument("--host", help="address the node would listen on (default 127.0.0.1)")
    doctor.add_argument("--port", type=int, help=f"port the node would use (default {DEFAULT_PORT})")
    doctor.add_argument("--data-dir", type=Path)
    doctor.add_argument("--models-dir", type=Path)
    doctor.add_argument("--safe-cpu-kernels", choices=("auto", "true", "false"))

    experts = commands.add_parser("experts", help="list specialist definitions: shipped, in the data dir, or given")
    experts.add_argument("files", nargs="*", type=Path, help="more .toml definitions to check and list")
    experts.add_argument("--data-dir", type=Path, help="the node's data dir (its experts/ folder)")
    experts.add_argument("--models-dir", type=Path)

    adopt = commands.add_parser("adopt", help="serve a peer's specialist here (fetched, verified, saved)")
    adopt.add_argument("expert", help="the specialist's expert id, name@digest")
    adopt.add_argument("--dry-run", action="store_true", help="fetch and verify only; print the definition")
    adopt.add_argument("--node", default=os.environ.get("EXPERTMESH_NODE", DEFAULT_NODE_URL), help="node URL")
    adopt.add_argument("--api-key", default=os.environ.get("EXPERTMESH_API_KEY"), help="the node's user API key")

    report = commands.add_parser("report", help="what the router learned, from the ledger")
    report.add_argument("--data-dir", type=Path, help="the node's data dir")
    return parser


def _models_dir(args: argparse.Namespace) -> Path:
    return args.models_dir or load_settings().models_dir


def _cmd_start(args: argparse.Namespace) -> int:
    from node.http.app import serve

    settings = load_settings(args.config, overrides_from(args))
    _setup_logging(settings.log_level)
    # A native fault in llama.cpp (SIGILL, SIGSEGV) cannot be caught; at least the log says where it happened.
    faulthandler.enable(all_threads=True)
    asyncio.run(serve(settings))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from node.doctor import diagnose, render

    checks = diagnose(load_settings(args.config, overrides_from(args)))
    sys.stdout.write(render(checks))
    return 1 if any(check.status == "fail" for check in checks) else 0


def _cmd_pull(args: argparse.Namespace) -> int:
    model = catalog.resolve(args.name, _models_dir(args), progress=True)
    sys.stdout.write(f"{model.name}\t{model.path}\t{model.size_bytes}\t{model.sha256}\n")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    rows = catalog.list_models(_models_dir(args))
    if not rows:
        sys.stdout.write("no models pulled yet; try: expertmesh pull smollm2-135m\n")
        return 0
    sys.stdout.write(f"{'NAME':<20} {'SIZE':>10}  SHA256                                                            PATH\n")
    for model in rows:
        size = f"{model.size_bytes / 1e6:.1f} MB"
        sys.stdout.write(f"{model.name:<20} {size:>10}  {model.sha256}  {model.path}\n")
    return 0


async def _ask(args: argparse.Namespace) -> int:
    body: dict = {
        "model": args.model,
        "messages": [{"role": "user", "content": args.text}],
        "max_tokens": args.max_tokens,
        "stream": args.stream,
    }
    if args.decompose:
        body["expertmesh"] = {"decompose": True}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    url = args.node.rstrip("/") + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with _session(args, timeout) as session:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                sys.stderr.write(f"error {response.status}: {_error_message(await response.text())}\n")
                return 1
            if not args.stream:
                data = await response.json()
                sys.stdout.write(data["choices"][0]["message"]["content"].strip() + "\n")
                provenance = data.get("expertmesh", {})
            else:
                provenance = {}
                finished = False
                try:
                    async for raw in response.content:
                        line = raw.decode("utf-8").strip()
                        if line == "data: [DONE]":
                            finished = True
                        if not line.startswith("data: ") or finished:
                            continue
                        chunk = json.loads(line[len("data: "):])
                        if "error" in chunk:
                            sys.stderr.write(f"\nerror: {chunk['error'].get('message')}\n")
                            return 1
                        provenance = chunk.get("expertmesh", provenance)
                        for choice in chunk.get("choices", []):
                            sys.stdout.write(choice.get("delta", {}).get("content") or "")
                            sys.stdout.flush()
                except aiohttp.ClientError:
                    finished = False
                if not finished:
                    # The node went away mid-answer: most likely llama.cpp crashed it (see `expertmesh doctor`).
                    sys.stderr.write(
                        f"\nerror: the node closed the connection while expert {provenance.get('expert', '?')} was "
                        "answering; it may have crashed (check its log, run `expertmesh doctor`)\n"
                    )
                    return 1
                sys.stdout.write("\n")
            sys.stderr.write(f"-- answered by {provenance.get('expert')} on node {provenance.get('node')}\n")
            if provenance.get("decision_id") and not args.no_rate:
                return await _rate(session, args, provenance)
    return 0


def _ask_rating() -> str | None:
    """Ask the person at the terminal for a thumbs up or down."""
    if not sys.stdin.isatty():
        return None
    answer = input("rate this answer: [u]p, [d]own, Enter to skip: ").strip().lower()
    return {"u": "up", "up": "up", "d": "down", "down": "down", "+": "up", "-": "down"}.get(answer)


async def _rate(session: aiohttp.ClientSession, args: argparse.Namespace, provenance: dict) -> int:
    rating = args.rate or _ask_rating()
    if rating is None:
        return 0
    body = {"decision_id": provenance["decision_id"], "token": provenance["feedback_token"], "rating": rating}
    async with session.post(args.node.rstrip("/") + "/v1/feedback", json=body) as response:
        if response.status != 200:
            sys.stderr.write(f"rating not recorded: {response.status}: {_error_message(await response.text())}\n")
            return 1
    sys.stderr.write(f"-- rated {rating}, thank you\n")
    return 0


def _cmd_experts(args: argparse.Namespace) -> int:
    from node.serving.specialists import describe_definitions

    settings = load_settings()
    rows = describe_definitions(
        [Path(f) for f in args.files], args.data_dir or settings.data_dir, args.models_dir or settings.models_dir
    )
    sys.stdout.write(f"{'ID':<32} {'VERSION':<8} {'BASE':<14} {'STYLE':<10} {'SOURCE':<24} DESCRIPTION\n")
    for row in rows:
        sys.stdout.write(
            f"{row['id']:<32} {row['version']:<8} {row['base']:<14} {row['prompt_style']:<10} "
            f"{row['source']:<24} {row['description'][:60]}\n"
        )
    return 0


async def _adopt(args: argparse.Namespace) -> int:
    body = {"expert": args.expert, "dry_run": args.dry_run}
    async with _session(args, aiohttp.ClientTimeout(total=600, sock_connect=10)) as session:
        async with session.post(args.node.rstrip("/") + "/v1/experts/adopt", json=body) as response:
            if response.status != 200:
                sys.stderr.write(f"error {response.status}: {_error_message(await response.text())}\n")
                return 1
            data = await response.json()
    sys.stdout.write(json.dumps(data["definition"], indent=2, ensure_ascii=False) + "\n")
    if data["served"]:
        sys.stderr.write(f"-- adopted {data['id']} from node {data['from_node']} on base {data['base']}; saved to {data['path']}\n")
    else:
        sys.stderr.write(f"-- {data['id']} from node {data['from_node']} verified (dry run: not served)\n")
    return 0


async def _peers(args: argparse.Namespace) -> int:
    async with _session(args, aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(args.node.rstrip("/") + "/v1/peers") as response:
            if response.status != 200:
                sys.stderr.write(f"error {response.status}: {_error_message(await response.text())}\n")
                return 1
            data = await response.json()
    sys.stdout.write(f"node {data['node_id']}: {len(data['data'])} peers\n")
    sys.stdout.write(f"{'ID':<22} {'ALIVE':<6} {'RTT MS':>7} {'SEEN S AGO':>10}  {'REACHED':<30} {'URL':<28} EXPERTS\n")
    now_ms = time.time() * 1000
    for peer in data["data"]:
        rtt = "-" if peer["rtt_ms"] is None else f"{peer['rtt_ms']:.1f}"
        seen = f"{(now_ms - peer['last_seen_ms']) / 1000:.0f}"
        experts = ", ".join(peer["experts"])
        reach = peer.get("reach") or {"kind": "direct"}
        how = "direct" if reach["kind"] == "direct" else f"{reach['kind']} via {reach.get('via') or reach.get('via_url')}"
        sys.stdout.write(
            f"{peer['id']:<22} {'yes' if peer['alive'] else 'no':<6} {rtt:>7} {seen:>10}  {how:<30} {peer['url']:<28} {experts}\n"
        )
    return 0


async def _invite(args: argparse.Namespace) -> int:
    body = {"ttl_s": args.ttl_s, "one_time": not args.reusable}
    async with _session(args, aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(args.node.rstrip("/") + "/v1/invites", json=body) as response:
            if response.status != 200:
                sys.stderr.write(f"error {response.status}: {_error_message(await response.text())}\n")
                return 1
            data = await response.json()
    sys.stdout.write(data["invite"] + "\n")
    left_h = (data["expires_ms"] / 1000 - time.time()) / 3600
    kind = "one-time" if data["one_time"] else "reusable"
    relay = "; this node relays for whoever joins" if data["relay"] else ""
    sys.stderr.write(f"-- {kind} invite, valid {left_h:.1f} h{relay}; join with: expertmesh start --join <invite>\n")
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    async with _session(args, aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(args.node.rstrip("/") + f"/v1/admissions/{args.node_id}/revoke") as response:
            if response.status != 200:
                sys.stderr.write(f"error {response.status}: {_error_message(await response.text())}\n")
                return 1
    sys.stdout.write(f"revoked {args.node_id}\n")
    return 0


async def _judge(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    body = {"expert": args.expert, "peer": args.peer, "dimensions": args.dimensions, "force": args.force}
    if args.items_per_dimension:
        body["items_per_dimension"] = args.items_per_dimension
    bars: dict[str, tqdm] = {}
    cards: list[dict] = []
    failed = False
    async with _session(args, aiohttp.ClientTimeout(total=None, sock_connect=10)) as session:
        async with session.post(args.node.rstrip("/") + "/v1/judge", json=body) as response:
            if response.status != 200:
                sys.stderr.write(f"error {response.status}: {_error_message(await response.text())}\n")
                return 1
            async for raw in response.content:
                line = json.loads(raw)
                if line["type"] == "progress":
                    bar = bars.get(line["expert"])
                    if bar is None:
                        bar = bars[line["expert"]] = tqdm(total=line["total"], desc=line["expert"], unit="probe")
                    bar.update(line["done"] - bar.n)
                elif line["type"] == "card":
                    cards.append(line["card"])
                elif line["type"] == "error":
                    sys.stderr.write(f"error: {line['error']['message']}\n")
                    failed = True
    for bar in bars.values():
        bar.close()
    for card in cards:
        sys.stdout.write(
            f"\n{card['expert']} judged by {card['judge']} ({card['sample']}, suite {card['suite_version']})\n"
            f"{'DIMENSION':<16} {'SCORE':>6}  {'95% CI':<13} {'N':>4}\n"
        )
        for dimension, score in card["scores"].items():
            interval = f"{score['ci_low']:.2f}-{score['ci_high']:.2f}"
            sys.stdout.write(f"{dimension:<16} {score['mean']:>6.3f}  {interval:<13} {score['n']:>4}\n")
        perf = card["performance"]
        sys.stdout.write(f"{'speed':<16} {perf['tokens_per_s']:>6.1f} tokens/s, ttft {perf['ttft_ms']:.0f} ms, context {perf['n_ctx']}\n")
    return 1 if failed else 0


def _session(args: argparse.Namespace, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """A client session that sends the API key when one was given."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if getattr(args, "api_key", None) else None
    return aiohttp.ClientSession(timeout=timeout, headers=headers)


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:500]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `expertmesh` command."""
    args = _parser().parse_args(argv)
    if args.command != "start":
        _setup_logging(args.log_level or "INFO")
    try:
        if args.command == "start":
            return _cmd_start(args)
        if args.command == "pull":
            return _cmd_pull(args)
        if args.command == "models":
            return _cmd_models(args)
        if args.command == "experts":
            return _cmd_experts(args)
        if args.command == "adopt":
            return asyncio.run(_adopt(args))
        if args.command == "peers":
            return asyncio.run(_peers(args))
        if args.command == "judge":
            return asyncio.run(_judge(args))
        if args.command == "doctor":
            return _cmd_doctor(args)
        if args.command == "invite":
            return asyncio.run(_invite(args))
        if args.command == "revoke":
            return asyncio.run(_revoke(args))
        if args.command == "report":
            from node.routing.report import render

            sys.stdout.write(render(args.data_dir or load_settings().data_dir))
            return 0
        return asyncio.run(_ask(args))
    except NodeError as exc:
        sys.stderr.write(f"expertmesh: {exc.message}\n")
        return 2
    except aiohttp.ClientConnectorError as exc:
        sys.stderr.write(f"expertmesh: cannot reach the node: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
