"""Community learning on real nodes: a fresh node routes well from its first queries with what two other nodes' users taught.

On loopback, with the two real models: node A serves smollm2-135m, node B gemma3-270m, each
sees the other's expert. A scripted user who likes gemma3 for arithmetic and smollm2 for
translation rates `--teach` answers on A and as many on B. Then a fresh node C (smollm2,
sharing on) joins A and B and routes `--fresh` queries of the same user; a fresh node D,
the same but with `--no-community-learning`, routes the same queries. Prints, for C and D,
the accuracy (the better expert for the task was chosen), the better expert's share per
task, and the share of C's decisions in which community evidence weighed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.nodes import GEMMA3_ID, SMOLLM2_ID, RunningNode, start_node  # noqa: E402

log = logging.getLogger("demo_community")

ARITHMETIC = ("What is {a} plus {b}?", "Compute {a} * {b}.", "What is {a} minus {b}?", "Calculate {a} + {b}.")
TRANSLATION = (
    "Translate 'house' into French.",
    "Translate 'good morning' to Spanish.",
    "How do you say 'dog' in German? Translate it.",
    "Translate 'thank you' into Italian.",
)
PREFERRED = {"arithmetic": GEMMA3_ID, "translation": SMOLLM2_ID}
# Cheap on CPU: one thread per model, two tokens per answer, quick hellos.
NODE_ARGS = ("--threads", "1", "--hello-interval-s", "1", "--peer-dead-after-s", "6")
MEET_TIMEOUT_S = 120.0


def _request(url: str, body: dict | None = None, timeout_s: float = 180.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def query(event: int) -> tuple[str, str]:
    """The user's `event`-th query and its task kind: arithmetic and translation in turn."""
    if event % 2 == 0:
        return "arithmetic", ARITHMETIC[(event // 2) % 4].format(a=event + 3, b=event % 7 + 2)
    return "translation", TRANSLATION[(event // 2) % 4]


def ask_and_rate(node: RunningNode, event: int) -> dict:
    """Ask `node` (model auto) and rate the answer as the scripted user would; the routing object."""
    task, text = query(event)
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 2,
        "temperature": 0,
    }
    routing = _request(node.url + "/v1/chat/completions", body)["expertmesh"]
    if routing["explanation"]["task"] != task:
        raise RuntimeError(f"{text!r} was read as {routing['explanation']['task']}, not {task}")
    liked = routing["expert"] == PREFERRED[task]
    rating = {"decision_id": routing["decision_id"], "token": routing["feedback_token"], "rating": "up" if liked else "down"}
    _request(node.url + "/v1/feedback", rating)
    return routing


def _wait(condition, what: str, timeout_s: float = MEET_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}")


def _models(node: RunningNode) -> set[str]:
    return {m["id"] for m in _request(node.url + "/v1/models")["data"]}


def _verified(node: RunningNode) -> set[str]:
    """Experts this node has verified by its own evidence (local, a greedy probe, or its own judging probes)."""
    return {e["id"] for e in _request(node.url + "/v1/experts")["data"] if e.get("verified")}


def _reporters(node: RunningNode) -> int:
    community = _request(node.url + "/v1/router/stats").get("community", {})
    return len(community.get("reporters", []))


@dataclass
class FreshRun:
    """What a fresh node did with its first queries."""

    correct: int = 0
    community: int = 0
    reporters: list[int] = field(default_factory=list)
    by_task: dict[str, list[int]] = field(default_factory=dict)  # task -> [better expert chosen, queries]

    def add(self, task: str, routing: dict) -> None:
        better = routing["expert"] == PREFERRED[task]
        self.correct += better
        counts = self.by_task.setdefault(task, [0, 0])
        counts[0] += better
        counts[1] += 1
        weighed = routing["explanation"].get("community")
        self.community += weighed is not None
        self.reporters.append(weighed["reporters"] if weighed else 0)


def fresh_node_run(node: RunningNode, n_queries: int) -> FreshRun:
    """The fresh node's first `n_queries` queries, each rated by the user."""
    run = FreshRun()
    for event in range(n_queries):
        task, _ = query(event)
        run.add(task, ask_and_rate(node, event))
    return run


def teach_and_join(tmp: Path, teach: int, fresh: int) -> dict[str, FreshRun]:
    """Teach A and B, then run the fresh nodes with and without community learning."""
    nodes: list[RunningNode] = []
    try:
        a = start_node(tmp / "a", "--model", "smollm2-135m", *NODE_ARGS)
        nodes.append(a)
        b = start_node(tmp / "b", "--model", "gemma3-270m", "--peer", a.url, *NODE_ARGS)
        nodes.append(b)
        _wait(lambda: GEMMA3_ID in _models(a) and SMOLLM2_ID in _models(b), "A and B to see each other's expert")
        started = time.perf_counter()
        for event in range(teach):
            ask_and_rate(a, event)
            ask_and_rate(b, event)
        log.info("taught A and B %d rated queries each in %.0f s", teach, time.perf_counter() - started)
        results = {}
        for name, extra in (("with sharing", ()), ("without sharing", ("--no-community-learning",))):
            c = start_node(
                tmp / name.replace(" ", "-"), "--model", "smollm2-135m", "--peer", a.url, "--peer", b.url,
                "--spot-check-interval-s", "1", *NODE_ARGS, *extra,
            )
            nodes.append(c)
            _wait(lambda c=c: GEMMA3_ID in _models(c) and SMOLLM2_ID in _models(c), "the fresh node to list both experts")
            # Unverified remote experts get a capped share of traffic (README: Trust): the fresh node first checks
            # B's expert with its own probes, whatever A's and B's users taught.
            _wait(lambda c=c: GEMMA3_ID in _verified(c), "the fresh node to verify B's expert", timeout_s=300.0)
            if not extra:
                _wait(lambda c=c: _reporters(c) == 2, "the fresh node to hold A's and B's summaries")
            results[name] = fresh_node_run(c, fresh)
            c.stop()
        return results
    finally:
        for node in nodes:
            node.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the demo and print the fresh nodes' figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teach", type=int, default=100, help="rated queries on each of A and B (default 100: 200 in all)")
    parser.add_argument("--fresh", type=int, default=20, help="queries of the fresh node (default 20)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="expertmesh-community-") as tmp:
        results = teach_and_join(Path(tmp), args.teach, args.fresh)
    out = sys.stdout
    out.write(f"A and B taught by a scripted user: {2 * args.teach} rated queries; better expert: {PREFERRED}\n")
    for name, run in results.items():
        shares = ", ".join(f"{task} {c}/{n}" for task, (c, n) in sorted(run.by_task.items()))
        out.write(
            f"fresh node {name}: first {args.fresh} queries, better expert chosen {run.correct}/{args.fresh} "
            f"({100.0 * run.correct / args.fresh:.0f}%; {shares}); community evidence weighed in "
            f"{run.community}/{args.fresh} decisions (reporters per decision: {sorted(set(run.reporters))})\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
