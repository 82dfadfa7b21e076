"""Bounded load on one node and on a three-node network, and a memory soak of the router's pure parts.

(a) N clients send `model: "auto"` chat completions (max_tokens 4) to one node; (b) the same clients
spread the same requests over three nodes joined with --peer. Each client sends at most R requests
and starts none after T seconds (those in flight may take up to the request timeout). 200 and 429
with Retry-After are the expected answers; anything else (5xx, other 4xx, 429 without Retry-After, a
timeout or a dropped connection) is a failure, and so is a queue depth above 0 once the load is
over (a leaked slot). Printed per phase: requests/s, p50/p99 latency, counts by status, peak RSS
(VmHWM) of each node process. The summary gives the ratio of (b) to (a) requests/s, both measured
in this run.

The soak drives `bandit.policy.Policy` and `bandit.ledger.Ledger` (no HTTP, no models) through
D decisions with feedback in this process, printing RSS every 2,000 decisions and the growth ratio.

    python scripts/bench_load.py [--clients 8] [--requests 40] [--duration-s 60] [--soak-decisions 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bandit.features import ExpertFeatures, query_features  # noqa: E402
from bandit.ledger import Decision, DecisionId, Ledger, new_feedback_token, query_sha256, token_sha256  # noqa: E402
from bandit.policy import Policy, rng_for_decision, sample_index  # noqa: E402
from bandit.simulate import synthetic_experts  # noqa: E402
from tests.nodes import RunningNode, start_node  # noqa: E402

log = logging.getLogger("bench_load")

PROMPTS = [
    "What is the capital of Peru?",
    "What is 17 times 23?",
    "Translate 'good morning' into French.",
    "Is this review positive or negative: 'the food was cold'?",
    "Answer in exactly three words: what is rain?",
    "Write a Python function that adds two numbers.",
    "Hi! How are you today?",
    "Who wrote Don Quixote?",
]
MEET_TIMEOUT_S = 60.0
IDLE_SETTLE_S = 2.0  # after the last answer, before reading queue depths
SOAK_REPORT_EVERY = 2000


@dataclass
class LoadResult:
    """What one phase saw."""

    name: str
    elapsed_s: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)  # of answered (200) requests
    failures: list[str] = field(default_factory=list)
    feedback: Counter[str] = field(default_factory=Counter)
    served_by: Counter[str] = field(default_factory=Counter)  # node that answered
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    idle_queue_depth: dict[str, int] = field(default_factory=dict)  # after the load: anything but 0 is a leaked slot

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def requests_per_s(self) -> float:
        return self.total / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def answered_per_s(self) -> float:
        return self.statuses["200"] / self.elapsed_s if self.elapsed_s else 0.0


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank quantile; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


def _proc_status_kib(pid: int | str, key: str) -> int:
    """A `VmRSS`/`VmHWM` figure from /proc/<pid>/status, in KiB (0 when it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


async def _client(
    index: int,
    session: aiohttp.ClientSession,
    urls: list[str],
    n_requests: int,
    deadline_s: float,
    timeout_s: float,
    result: LoadResult,
) -> None:
    """One client: requests in turn over the nodes, politely waiting out a 429."""
    for n in range(n_requests):
        if time.monotonic() >= deadline_s:
            return
        url = urls[(index + n) % len(urls)]
        body = {
            "model": "auto",
            "messages": [{"role": "user", "content": f"{PROMPTS[(index + n) % len(PROMPTS)]} ({index}.{n})"}],
            "max_tokens": 4,
        }
        started_s = time.perf_counter()
        try:
            async with session.post(url + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                answer = await response.json(content_type=None)
                status, retry_after = response.status, response.headers.get("Retry-After")
        except TimeoutError:
            result.statuses["timeout"] += 1
            result.failures.append(f"client {index} request {n} to {url}: no answer in {timeout_s} s")
            continue
        except (aiohttp.ClientError, ValueError) as exc:
            result.statuses["error"] += 1
            result.failures.append(f"client {index} request {n} to {url}: {type(exc).__name__}: {exc}")
            continue
        latency_s = time.perf_counter() - started_s
        if status == 429 and retry_after is None:
            result.statuses["429 without Retry-After"] += 1
            result.failures.append(f"client {index} request {n}: 429 without Retry-After")
            continue
        result.statuses[str(status)] += 1
        if status == 429:
            assert retry_after is not None  # counted as a failure above
            await asyncio.sleep(min(float(retry_after), 2.0))
            continue
        if status != 200:
            result.failures.append(f"client {index} request {n} to {url}: {status} {str(answer)[:200]}")
            continue
        result.latencies_s.append(latency_s)
        provenance = answer.get("expertmesh", {})
        result.served_by[provenance.get("node", "?")] += 1
        if n % 2 == 0 and "decision_id" in provenance:
            # Half the answers are rated, so the ledger and the learner work under load too.
            rating = {"decision_id": provenance["decision_id"], "token": provenance["feedback_token"], "rating": "up" if n % 4 else "down"}
            try:
                async with session.post(url + "/v1/feedback", json=rating, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                    result.feedback[str(response.status)] += 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                result.feedback[type(exc).__name__] += 1


async def run_load(
    name: str, nodes: list[RunningNode], clients: int, n_requests: int, duration_s: float, timeout_s: float
) -> LoadResult:
    """Every client at once against `nodes`; bounded by requests per client and by time."""
    result = LoadResult(name)
    urls = [n.url for n in nodes]
    connector = aiohttp.TCPConnector(limit=clients * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        started_s = time.monotonic()
        deadline_s = started_s + duration_s
        tasks = [_client(i, session, urls, n_requests, deadline_s, timeout_s, result) for i in range(clients)]
        await asyncio.gather(*tasks)
        result.elapsed_s = time.monotonic() - started_s
        await asyncio.sleep(IDLE_SETTLE_S)
        for node in nodes:
            async with session.get(node.url + "/healthz", timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                depth = sum(e["queue_depth"] for e in (await response.json())["experts"])
            result.idle_queue_depth[node.node_id] = depth
            if depth:
                result.failures.append(f"{node.url}: queue depth {depth} with no request in flight (leaked slots)")
    result.peak_rss_kib = {n.node_id: _proc_status_kib(n.process.pid, "VmHWM") for n in nodes}
    return result


async def wait_until_meshed(nodes: list[RunningNode], timeout_s: float = MEET_TIMEOUT_S) -> float:
    """Seconds until every node sees every other node alive (and its expert in /v1/models)."""
    started_s = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.monotonic() - started_s < timeout_s:
            ready = 0
            for node in nodes:
                async with session.get(node.url + "/v1/peers") as response:
                    peers = (await response.json())["data"]
                if sum(p["alive"] for p in peers) >= len(nodes) - 1:
                    ready += 1
            if ready == len(nodes):
                return time.monotonic() - started_s
            await asyncio.sleep(0.25)
    raise RuntimeError(f"the nodes did not all meet within {timeout_s} s")


def _experts(n: int) -> list[ExpertFeatures]:
    """`n` plausible candidates with judged cards."""
    return synthetic_experts(n, nodes=3)


@dataclass(frozen=True)
class SoakResult:
    """RSS in KiB through the soak."""

    decisions: int
    elapsed_s: float
    rss_before_kib: int
    rss_warm_kib: int  # after the first report interval: VW, SQLite and the interpreter have settled
    rss_after_kib: int
    maxrss_kib: int
    lines: list[str]


def soak(n_decisions: int, directory: Path, seed: int = 0) -> SoakResult:
    """Route, record, rate and learn `n_decisions` times with one policy and one ledger in `directory`."""
    rng = random.Random(seed)
    experts = _experts(6)
    lines = [f"{'decisions':>9} {'VmRSS MiB':>10} {'VmHWM MiB':>10} {'ledger MiB':>11} {'s':>6}"]
    ledger_path = directory / "ledger.db"

    def report(done: int, started_s: float) -> int:
        rss = _proc_status_kib("self", "VmRSS")
        size = sum(p.stat().st_size for p in directory.glob("ledger.db*"))
        lines.append(
            f"{done:>9} {rss / 1024:>10.1f} {_proc_status_kib('self', 'VmHWM') / 1024:>10.1f}"
            f" {size / 2**20:>11.1f} {time.monotonic() - started_s:>6.1f}"
        )
        return rss

    policy = Policy(seed=seed)
    ledger = Ledger(ledger_path)
    started_s = time.monotonic()
    rss_before = report(0, started_s)
    rss_warm = rss_before
    try:
        for i in range(n_decisions):
            text = f"{PROMPTS[i % len(PROMPTS)]} variant {rng.randrange(1_000_000)}"
            query = query_features(text)
            candidates = experts[: 2 + i % 5]
            probabilities = policy.probabilities(query, candidates)
            decision_id = DecisionId(f"soak-{i:06d}")
            chosen = sample_index(probabilities, rng_for_decision(decision_id))
            token = new_feedback_token()
            decision = Decision(
                decision_id=decision_id,
                created_ms=1_700_000_000_000 + i,
                query_sha256=query_sha256(text),
                query=query,
                candidates=tuple(candidates),
                probabilities=tuple(probabilities),
                chosen_index=chosen,
                policy_version=policy.version,
                token_sha256=token_sha256(token),
            )
            ledger.record_decision(decision)
            reward = 1.0 if rng.random() < 0.3 + 0.1 * chosen else 0.0
            ledger.record_reward(decision_id, reward, now_ms=1_700_000_000_000 + i)
            policy.learn(query, candidates, chosen, probabilities[chosen], reward)
            done = i + 1
            if done % SOAK_REPORT_EVERY == 0 or done == n_decisions:
                rss = report(done, started_s)
                if done == SOAK_REPORT_EVERY:
                    rss_warm = rss
    finally:
        ledger.close()
        policy.close()
    elapsed_s = time.monotonic() - started_s
    return SoakResult(
        decisions=n_decisions,
        elapsed_s=elapsed_s,
        rss_before_kib=rss_before,
        rss_warm_kib=rss_warm,
        rss_after_kib=_proc_status_kib("self", "VmRSS"),
        maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        lines=lines,
    )


def _load_lines(result: LoadResult, names: dict[str, str]) -> list[str]:
    ok = sorted(result.latencies_s)
    lines = [
        f"({result.name}) {result.total} requests in {result.elapsed_s:.1f} s: {result.requests_per_s:.2f} requests/s,"
        f" {result.answered_per_s:.2f} answered/s",
        f"    latency of answered requests: p50 {_percentile(ok, 0.5) * 1000:.0f} ms, p99 {_percentile(ok, 0.99) * 1000:.0f} ms",
        "    statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(result.statuses.items())),
        "    feedback statuses: " + (", ".join(f"{k}: {v}" for k, v in sorted(result.feedback.items())) or "none"),
        "    answered by: " + ", ".join(f"{names.get(k, k)}: {v}" for k, v in sorted(result.served_by.items())),
        "    peak RSS (VmHWM): " + ", ".join(f"{names.get(k, k)} {v / 1024:.0f} MiB" for k, v in result.peak_rss_kib.items()),
        "    queue depth when idle: " + ", ".join(f"{names.get(k, k)} {v}" for k, v in result.idle_queue_depth.items()),
        f"    failures: {len(result.failures)}",
    ]
    lines += [f"      {f}" for f in result.failures[:10]]
    return lines


async def _bench_nodes(args: argparse.Namespace, tmp: Path) -> tuple[LoadResult, LoadResult, dict[str, str], float]:
    common = ("--model", args.model, "--threads", str(args.threads), "--hello-interval-s", "1")
    names: dict[str, str] = {}
    log.info("(a) one node")
    single = start_node(tmp / "single", *common)
    try:
        names[single.node_id] = "single"
        result_a = await run_load("a: one node", [single], args.clients, args.requests, args.duration_s, args.timeout_s)
    finally:
        single.stop()
    log.info("(b) three nodes")
    nodes: list[RunningNode] = []
    try:
        nodes.append(start_node(tmp / "n1", *common))
        nodes.append(start_node(tmp / "n2", *common, "--peer", nodes[0].url))
        nodes.append(start_node(tmp / "n3", *common, "--peer", nodes[0].url))
        names.update({n.node_id: f"n{i + 1}" for i, n in enumerate(nodes)})
        meet_s = await wait_until_meshed(nodes)
        log.info("meshed in %.1f s", meet_s)
        result_b = await run_load(
            "b: three nodes", nodes, args.clients, args.requests, args.duration_s, args.timeout_s
        )
    finally:
        for node in nodes:
            node.stop()
    return result_a, result_b, names, meet_s


def main(argv: list[str] | None = None) -> int:
    """Run the phases and write the report to stdout; exit 1 when a load phase had failures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=40, help="requests per client, at most")
    parser.add_argument("--duration-s", type=float, default=60.0, help="per load phase, at most")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per request; longer counts as hung")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per node")
    parser.add_argument("--soak-decisions", type=int, default=10_000)
    parser.add_argument("--soak-dir", type=Path, default=None, help="default: a temporary dir (on /dev/shm when present)")
    parser.add_argument("--skip-load", action="store_true", help="only the soak")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    out: list[str] = [
        f"bench_load: {args.clients} clients x {args.requests} requests (at most {args.duration_s:.0f} s per phase),"
        f" max_tokens 4, model auto over {args.model}, {args.threads} llama.cpp thread(s) per node,"
        f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        "",
    ]
    failed = False
    ratio = None
    if not args.skip_load:
        with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
            result_a, result_b, names, meet_s = asyncio.run(_bench_nodes(args, Path(tmp)))
        out += _load_lines(result_a, names) + [""]
        out += [f"(b) nodes met in {meet_s:.1f} s; requests spread round-robin over n1, n2, n3"]
        out += _load_lines(result_b, names) + [""]
        failed = bool(result_a.failures or result_b.failures)
        ratio = result_b.requests_per_s / result_a.requests_per_s if result_a.requests_per_s else float("nan")
        answered_ratio = result_b.answered_per_s / result_a.answered_per_s if result_a.answered_per_s else float("nan")

    log.info("soak: %d decisions", args.soak_decisions)
    shm = Path("/dev/shm")
    soak_parent = args.soak_dir or (shm if shm.is_dir() else None)
    with tempfile.TemporaryDirectory(prefix="bench-soak-", dir=soak_parent) as soak_tmp:
        result = soak(args.soak_decisions, Path(soak_tmp))
    growth_total = result.rss_after_kib / result.rss_before_kib
    growth_warm = result.rss_after_kib / result.rss_warm_kib
    out += [
        f"(soak) Policy + Ledger in {soak_parent or tempfile.gettempdir()}: {result.decisions} decisions with feedback"
        f" in {result.elapsed_s:.1f} s ({result.decisions / result.elapsed_s:.0f}/s)",
        *("    " + line for line in result.lines),
        f"    RSS before {result.rss_before_kib / 1024:.1f} MiB, after {result.rss_after_kib / 1024:.1f} MiB"
        f" (growth x{growth_total:.3f}; x{growth_warm:.3f} after the first {min(SOAK_REPORT_EVERY, result.decisions)});"
        f" getrusage maxrss {result.maxrss_kib / 1024:.1f} MiB",
        "",
        "Summary:",
    ]
    if ratio is not None:
        out.append(
            f"    (b)/(a) requests/s: {ratio:.2f}x (answered/s {answered_ratio:.2f}x);"
            f" failures: a {len(result_a.failures)}, b {len(result_b.failures)}"
        )
    out.append(f"    soak RSS growth after warm-up: x{growth_warm:.3f}")
    sys.stdout.write("\n".join(out) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
