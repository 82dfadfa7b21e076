"""Decomposed versus whole-query routing: judged score of both, on the same compound queries, in one run.

Starts one node with both real experts (smollm2-135m, gemma3-270m), lets it judge them
(`--judge-items N` per dimension), reads their capability cards from `/v1/experts` and picks
pairs of dimensions whose best expert differs. Each compound query joins one probe item of
each dimension of a pair ("What is 7 times 8? Translate \"dog\" into French.") such that
`node.routing.decompose.split_query` splits it into exactly those two items. Every query is asked
twice, interleaved, at temperature 0, with `model: "auto"`:

  (a) decomposed: `expertmesh: {"decompose": true}`, each part routed on its own;
  (b) whole: `expertmesh: {"decompose": false}`, the whole query routed once.

Each part's item is scored by a RELAXED scorer applied identically to both: the part's
reference appears (casefolded, accent-folded, as whole words; numbers compared numerically;
for `label` items exactly one allowed label is mentioned and it is the reference) in the text
that answers that part: for (a) that part's section of the composed answer (split on the
`**N. ...**` headings), for (b) the whole answer. Echoes of the parts' own prompts are cut from
the text first, in both. The items' own STRICT scorers are reported too: on (a)'s sections, and
on (b)'s whole answer only where they apply (the first part with any scorer, as strict scorers
read an answer's opening; a later part only with the position-free `contains`).

No feedback is sent, so both approaches see the same policy (the router may still explore:
which expert answered each part, and with what probability, is recorded). Items of the node's
judged sample are held out (the sample is reproduced from the judge's fixed seed).

    python scripts/bench_decompose.py [--queries 20] [--judge-items 6] [--max-tokens 48] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
import unicodedata
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bandit.features import Task, detect_task  # noqa: E402
from node.judging.runner import choose_independent_items  # noqa: E402
from node.judging.scorers import _NUMBER_RE, _number_value, fold  # noqa: E402  (the judge's own number reader)
from node.judging.scorers import score as strict_score  # noqa: E402
from node.judging.stats import DimensionScore, summarize  # noqa: E402
from node.judging.suites import ProbeItem, label_key, load_suites  # noqa: E402
from node.routing.decompose import split_query  # noqa: E402
from tests.nodes import start_node  # noqa: E402

MODELS = ("smollm2-135m", "gemma3-270m")
# Dimensions the router reads a judged score for (a detected task of the same name) and whose
# items have a reference to look for. `instruction` (format regexes) and `safety` (refusals)
# have none; `reasoning` items are detected as chat/knowledge, so the router never reads that score.
DEFAULT_DIMENSIONS = ("knowledge", "arithmetic", "translation", "classification")
REFERENCE_SCORERS = frozenset({"exact", "normalized", "contains", "numeric", "label"})
POSITION_FREE_SCORERS = frozenset({"contains"})
HEADING_RE = re.compile(r"^\*\*(\d+)\. .*\*\* — \*[^\n]*\*[ \t]*$", re.MULTILINE)
BOOTSTRAP_REPS = 4000


# ---- scoring ------------------------------------------------------------------------------


_QUOTED_IN_PROMPT_RE = re.compile(r'"([^"]+)"|“([^”]+)”')


def _cut_echoes(text: str, prompts: list[str]) -> str:
    """Folded `text` without verbatim echoes of the parts' prompts or of the text they quote."""
    folded = fold(text)
    echoes = [fold(p).strip() for p in prompts]
    for prompt in prompts:
        for m in _QUOTED_IN_PROMPT_RE.finditer(prompt):
            quoted = fold(m.group(1) or m.group(2)).strip().rstrip(".!?").strip()
            if quoted:
                echoes.append(quoted)
    for echo in sorted(echoes, key=len, reverse=True):
        folded = folded.replace(echo, " ")
    return folded


def _numbers(text: str) -> list[float]:
    normal = unicodedata.normalize("NFKC", text).replace("\u2212", "-")
    return [_number_value(m) for m in _NUMBER_RE.finditer(normal)]


def relaxed_score(item: ProbeItem, text: str, prompts: list[str]) -> float:
    """1.0 when the item's reference appears in `text` (see the module docstring)."""
    folded = _cut_echoes(text, prompts)
    if item.scorer == "numeric":
        reference = float(item.reference)  # type: ignore[arg-type]
        tolerance = max(item.tolerance, 1e-6)
        return 1.0 if any(abs(v - reference) <= tolerance for v in _numbers(folded)) else 0.0
    if item.scorer == "label":
        assert item.labels is not None
        keyed = f" {label_key(folded)} "
        mentioned = {label_key(label) for label in item.labels if f" {label_key(label)} " in keyed}
        return 1.0 if len(mentioned) == 1 and mentioned <= {label_key(r) for r in item.references()} else 0.0
    if item.scorer in ("contains", "exact", "normalized"):
        for text_reference in item.references():
            words = fold(text_reference).split()
            if words and re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", folded):
                return 1.0
        return 0.0
    raise ValueError(f"item {item.id}: scorer {item.scorer} has no reference to look for")


def sections(content: str, n_parts: int) -> list[str] | None:
    """The answers under the `**N. ...**` headings of a composed answer, in order; None if they do not parse."""
    headings = list(HEADING_RE.finditer(content))
    if [int(h.group(1)) for h in headings] != list(range(1, n_parts + 1)):
        return None
    bounds = [h.end() for h in headings]
    starts = [h.start() for h in headings[1:]] + [len(content)]
    return [content[b:e].strip() for b, e in zip(bounds, starts, strict=True)]


# ---- the node -----------------------------------------------------------------------------


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def ask(url: str, text: str, decompose: bool, max_tokens: int) -> tuple[dict[str, Any], float]:
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "expertmesh": {"decompose": decompose},
    }
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        data = json.load(response)
    return data, time.perf_counter() - started


def wait_judged(url: str, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        rows = [r for r in get_json(url + "/v1/experts")["data"] if r["local"]]
        states = [(r["id"], r["judging"] or {}) for r in rows]
        line = ", ".join(f"{e.split('@')[0]} {s.get('state')} {s.get('done', 0)}/{s.get('total', 0)}" for e, s in states)
        if line != last:
            print(f"  judging: {line}", flush=True)
            last = line
        if any(s.get("state") == "failed" for _, s in states):
            raise RuntimeError(f"judging failed: {states}")
        if rows and all(s.get("state") == "judged" and r["judged"] for (_, s), r in zip(states, rows, strict=True)):
            return rows
        if time.monotonic() > deadline:
            raise RuntimeError(f"experts not judged within {timeout_s:.0f} s: {line}")
        time.sleep(2)


def own_card(row: dict[str, Any], node_id: str) -> dict[str, Any]:
    cards = [c for c in row["cards"] if c["judge"] == node_id]
    if not cards:
        raise RuntimeError(f"no card by this node for {row['id']}")
    return max(cards, key=lambda c: c["issued_ms"])


# ---- choosing the queries -----------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    text: str
    items: tuple[ProbeItem, ProbeItem]
    pair: tuple[str, str]


@dataclass
class Outcome:
    query: Query
    relaxed: dict[str, list[float]] = field(default_factory=dict)  # approach -> per part
    strict: dict[str, list[float | None]] = field(default_factory=dict)
    experts: dict[str, list[str]] = field(default_factory=dict)  # approach -> who answered each part
    explored: dict[str, list[bool]] = field(default_factory=dict)
    probability: dict[str, list[float]] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)
    completion_tokens: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, bool] = field(default_factory=dict)
    content: dict[str, str] = field(default_factory=dict)
    whole_task: str = ""
    note: str = ""


def pick_pairs(
    scores: dict[str, dict[str, DimensionScore]], experts: list[str], dims: list[str], max_pairs: int
) -> tuple[list[tuple[str, str]], list[str]]:
    """Pairs (d1, d2) whose card leaders differ, largest smaller margin first; and notes."""
    a, b = experts
    gap = {d: scores[a][d].mean - scores[b][d].mean for d in dims}
    led_a = [d for d in dims if gap[d] > 0]
    led_b = [d for d in dims if gap[d] < 0]
    notes = []
    if led_a and led_b:
        pairs = sorted(itertools.product(led_a, led_b), key=lambda p: (-min(gap[p[0]], -gap[p[1]]), p))
        pairs = pairs[:max_pairs]
    else:
        # Ties go to the dimension both score higher on, so its items can be answered at all.
        level = {d: scores[a][d].mean + scores[b][d].mean for d in dims}
        d1 = max(dims, key=lambda d: (gap[d], level[d]))
        d2 = min((d for d in dims if d != d1), key=lambda d: (gap[d], -level[d]))
        notes.append(
            f"NO dimension separates the experts (one leads or ties everywhere): using the largest gap each way, "
            f"{d1} ({a.split('@')[0]} - {b.split('@')[0]} = {gap[d1]:+.3f}) and {d2} ({gap[d2]:+.3f})"
        )
        pairs = [(d1, d2)]
    for d1, d2 in pairs:
        for d in (d1, d2):
            sa, sb = scores[a][d], scores[b][d]
            if not (sa.ci_high < sb.ci_low or sb.ci_high < sa.ci_low):
                notes.append(f"{d}: the leader is by mean only; the two 95% intervals overlap (n={sa.n}, {sb.n})")
    return pairs, list(dict.fromkeys(notes))


def build_queries(
    suites, pairs: list[tuple[str, str]], n: int, held_out: set[str], max_prompt_chars: int
) -> tuple[list[Query], list[str]]:
    """`n` compound queries, round-robin over the pairs, short items first, each item used once where possible."""
    notes = []

    def candidates(dim: str) -> list[ProbeItem]:
        items = [
            i
            for i in suites[dim].items
            if i.scorer in REFERENCE_SCORERS
            and i.id not in held_out
            and len(i.prompt) <= max_prompt_chars
            and (dim not in {t.value for t in Task} or detect_task(i.prompt).value == dim)
        ]
        return sorted(items, key=lambda i: (len(i.prompt), i.id))

    pools = {d: candidates(d) for pair in pairs for d in pair}
    for d, pool in pools.items():
        if not pool:
            raise RuntimeError(f"no usable items for {d} (held out, too long, or detected as another task)")
    uses: Counter[str] = Counter()
    asked: set[tuple[str, str]] = set()
    splits: dict[tuple[str, str], bool] = {}
    queries: list[Query] = []
    for q in range(n):
        pair = pairs[q % len(pairs)]
        orders = [pair, pair[::-1]] if (q // len(pairs)) % 2 == 0 else [pair[::-1], pair]
        rank = {i.id: r for d in pair for r, i in enumerate(pools[d])}
        # Unused items first, then the least used; never the same two items twice; shortest first.
        combos = sorted(
            (c for c in itertools.product(pools[pair[0]], pools[pair[1]]) if (c[0].id, c[1].id) not in asked),
            key=lambda c: (uses[c[0].id] + uses[c[1].id], rank[c[0].id] + rank[c[1].id], c[0].id, c[1].id),
        )
        found = None
        for first, second in combos:
            for d_first, _ in orders:
                x, y = (first, second) if d_first == pair[0] else (second, first)
                text = f"{x.prompt} {y.prompt}"
                if (x.id, y.id) not in splits:
                    splits[(x.id, y.id)] = [p.text for p in split_query(text)] == [x.prompt, y.prompt]
                if splits[(x.id, y.id)]:
                    found = Query(text, (x, y), (x.dimension, y.dimension))
                    break
            if found:
                break
        if found is None:
            raise RuntimeError(f"no unasked pair of {pair} items splits cleanly")
        if any(uses[i.id] for i in found.items):
            notes.append(f"query {q + 1}: reuses an item (in a new combination)")
        uses.update(i.id for i in found.items)
        asked.add((found.items[0].id, found.items[1].id) if found.pair[0] == pair[0] else (found.items[1].id, found.items[0].id))
        queries.append(found)
    skipped = sum(1 for ok in splits.values() if not ok)
    for d in dict.fromkeys(d for pair in pairs for d in pair):
        distinct = {i.id for q in queries for i in q.items if i.dimension == d}
        notes.append(f"{d}: {len(pools[d])} usable items, {len(distinct)} distinct ones asked")
    notes.append(f"{skipped} ordered item combinations tried and skipped: split_query did not split them into exactly the two items")
    return queries, notes


# ---- running ------------------------------------------------------------------------------


def run_query(url: str, query: Query, index: int, max_tokens: int) -> Outcome:
    out = Outcome(query)
    prompts = [i.prompt for i in query.items]
    order = ("decomposed", "whole") if index % 2 == 0 else ("whole", "decomposed")
    for approach in order:
        data, latency = ask(url, query.text, approach == "decomposed", max_tokens)
        content = data["choices"][0]["message"]["content"] or ""
        mesh = data["expertmesh"]
        out.latency_s[approach] = latency
        out.completion_tokens[approach] = data["usage"]["completion_tokens"]
        # A composed answer's finish_reason is its last part's (the node reports no other).
        out.truncated[approach] = data["choices"][0]["finish_reason"] == "length"
        out.content[approach] = content
        if approach == "decomposed":
            parts = mesh.get("parts") or []
            texts = sections(content, len(prompts)) if mesh.get("decomposed") else None
            if [p["text"] for p in parts] != prompts or texts is None:
                out.note = "node did not decompose as split_query did, or headings did not parse: parts scored 0"
                texts = ["", ""]
                parts = parts if len(parts) == 2 else [{"expert": "?", "explanation": {"candidates": []}, "probability": 0}] * 2
            out.relaxed[approach] = [relaxed_score(item, t, prompts) for item, t in zip(query.items, texts, strict=True)]
            out.strict[approach] = [strict_score(item, t) for item, t in zip(query.items, texts, strict=True)]
            out.experts[approach] = [p["expert"] for p in parts]
            out.probability[approach] = [p["probability"] for p in parts]
            out.explored[approach] = [_explored(p["expert"], p["explanation"]) for p in parts]
        else:
            out.whole_task = mesh.get("explanation", {}).get("task", "")
            out.relaxed[approach] = [relaxed_score(item, content, prompts) for item in query.items]
            out.strict[approach] = [
                strict_score(item, content) if position == 0 or item.scorer in POSITION_FREE_SCORERS else None
                for position, item in enumerate(query.items)
            ]
            out.experts[approach] = [mesh["expert"]] * 2
            out.probability[approach] = [mesh["probability"]] * 2
            out.explored[approach] = [_explored(mesh["expert"], mesh["explanation"])] * 2
    return out


def _explored(expert: str, explanation: dict[str, Any]) -> bool:
    """Whether the answering expert was less probable than the policy's top candidate (a tie is no exploration)."""
    candidates = explanation.get("candidates") or []
    if not candidates:
        return False
    chosen = next((c["probability"] for c in candidates if c["expert"] == expert), 0.0)
    return chosen < candidates[0]["probability"] - 0.01


# ---- reporting ----------------------------------------------------------------------------


def fmt(s: DimensionScore) -> str:
    return f"{s.mean:5.3f} [{s.ci_low:4.2f},{s.ci_high:4.2f}] n={s.n}"


def short(expert: str) -> str:
    return expert.split("@")[0]


def paired_bootstrap(outcomes: list[Outcome], seed: int) -> tuple[float, float]:
    """95% percentile interval of the relaxed mean(a) - mean(b) over parts, resampling queries (parts stay paired)."""
    rng = random.Random(seed)
    per_query = [(sum(o.relaxed["decomposed"]), sum(o.relaxed["whole"])) for o in outcomes]
    diffs = []
    for _ in range(BOOTSTRAP_REPS):
        sample = [per_query[rng.randrange(len(per_query))] for _ in per_query]
        parts = 2 * len(sample)
        diffs.append((sum(a for a, _ in sample) - sum(b for _, b in sample)) / parts)
    diffs.sort()
    return diffs[int(0.025 * BOOTSTRAP_REPS)], diffs[int(0.975 * BOOTSTRAP_REPS) - 1]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "undefined (whole scores 0)"


def sign_test(a_only: int, b_only: int) -> float:
    """Exact two-sided binomial (McNemar) p-value for discordant pairs."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def report(outcomes: list[Outcome], leaders: dict[str, str], seed: int) -> None:
    approaches = ("decomposed", "whole")
    w = sys.stdout.write
    n_q = len(outcomes)

    w(
        "\n== per query (relaxed score per part; expert per part; * = a less probable expert than the policy's top one,"
        " i.e. exploration; ties are not) ==\n"
    )
    for i, o in enumerate(outcomes, 1):
        a_exp = ",".join(short(e) + ("*" if x else "") for e, x in zip(o.experts["decomposed"], o.explored["decomposed"], strict=True))
        b_exp = short(o.experts["whole"][0]) + ("*" if o.explored["whole"][0] else "")
        bits = lambda k, o=o: "".join(str(int(s)) for s in o.relaxed[k])  # noqa: E731
        w(
            f"{i:2d} {o.query.pair[0][:5]}+{o.query.pair[1][:5]}  "
            f"a:{bits('decomposed')} [{a_exp}] {o.latency_s['decomposed']:5.1f}s   "
            f"b:{bits('whole')} [{b_exp}, task {o.whole_task}] {o.latency_s['whole']:5.1f}s"
            f"{'  ' + o.note if o.note else ''}\n"
            f"     {o.query.text}\n"
        )

    w("\n== per approach (n = parts; 95% interval: Wilson) ==\n")
    w(f"{'approach':<11} {'relaxed':<28} {'strict':<28} {'latency s mean/median':>22} {'tokens':>7} {'finish=length':>15}\n")
    rel, strict_all = {}, {}
    for k in approaches:
        rel[k] = summarize(k, [s for o in outcomes for s in o.relaxed[k]])
        strict_vals = [s for o in outcomes for s in o.strict[k] if s is not None]
        strict_all[k] = summarize(k, strict_vals)
        lat = [o.latency_s[k] for o in outcomes]
        tok = statistics.mean(o.completion_tokens[k] for o in outcomes)
        trunc = sum(o.truncated[k] for o in outcomes)
        label = "strict (a) all parts" if k == "decomposed" else "strict (b) applicable parts"
        w(
            f"{k:<11} {fmt(rel[k]):<28} {fmt(strict_all[k]):<28} {statistics.mean(lat):10.2f} / {statistics.median(lat):<9.2f}"
            f" {tok:7.1f} {trunc:>7d}/{n_q}\n"
        )
        w(f"{'':<11} {'':<28} ({label})\n")
    # Strict on the same parts for both.
    same = [(o.strict["decomposed"][j], o.strict["whole"][j]) for o in outcomes for j in range(2) if o.strict["whole"][j] is not None]
    if same:
        same_a = summarize("a", [a for a, _ in same])  # type: ignore[misc]
        same_b = summarize("b", [b for _, b in same])  # type: ignore[misc]
        w(f"strict on the parts where it applies to (b) (part 1 any scorer, part 2 'contains' only): a {fmt(same_a)}  b {fmt(same_b)}\n")

    w("\n== per dimension (relaxed; strict (a); who answered that dimension's parts) ==\n")
    dims = sorted({d for o in outcomes for d in o.query.pair})
    for d in dims:
        idx = [(o, j) for o in outcomes for j in range(2) if o.query.pair[j] == d]
        ra = summarize(d, [o.relaxed["decomposed"][j] for o, j in idx])
        rb = summarize(d, [o.relaxed["whole"][j] for o, j in idx])
        sa = summarize(d, [o.strict["decomposed"][j] for o, j in idx])  # type: ignore[misc]
        ca = Counter(short(o.experts["decomposed"][j]) for o, j in idx)
        cb = Counter(short(o.experts["whole"][j]) for o, j in idx)
        leader = leaders.get(d, "?")
        to_leader_a = sum(o.experts["decomposed"][j] == leader for o, j in idx)
        to_leader_b = sum(o.experts["whole"][j] == leader for o, j in idx)
        tied = leader == "tie"
        w(f"{d:<15} card leader {'none (tie)' if tied else short(leader)}\n")
        w(f"  decomposed  relaxed {fmt(ra)}  strict {fmt(sa)}  experts {dict(ca)}  to leader {'-' if tied else to_leader_a}/{len(idx)}\n")
        w(f"  whole       relaxed {fmt(rb)}  {'':<31} experts {dict(cb)}  to leader {'-' if tied else to_leader_b}/{len(idx)}\n")
        pa = statistics.mean(o.probability["decomposed"][j] for o, j in idx)
        pb = statistics.mean(o.probability["whole"][j] for o, j in idx)
        w(f"  mean p(chosen expert): decomposed {pa:.3f}, whole {pb:.3f}\n")

    w("\n== routing ==\n")
    for k in approaches:
        parts = range(2) if k == "decomposed" else range(1)
        decisions = [(o.experts[k][j], o.explored[k][j], o.probability[k][j]) for o in outcomes for j in parts]
        explored = sum(x for _, x, _ in decisions)
        w(
            f"{k:<11} {len(decisions)} decisions, experts {dict(Counter(short(e) for e, _, _ in decisions))}, "
            f"{explored} less probable than the top one (exploration), mean p(chosen) {statistics.mean(p for _, _, p in decisions):.3f}\n"
        )
    w(f"whole-query detected task: {dict(Counter(o.whole_task for o in outcomes))}\n")
    w("relaxed, split by whether (a) gave the part to the same expert that answered the whole query in (b):\n")
    for same_expert in (True, False):
        idx = [(o, j) for o in outcomes for j in range(2) if (o.experts["decomposed"][j] == o.experts["whole"][j]) == same_expert]
        if idx:
            sa_ = summarize("a", [o.relaxed["decomposed"][j] for o, j in idx])
            sb_ = summarize("b", [o.relaxed["whole"][j] for o, j in idx])
            w(f"  {'same expert     ' if same_expert else 'different expert'}  a {fmt(sa_)}  b {fmt(sb_)}\n")
        else:
            w(f"  {'same expert     ' if same_expert else 'different expert'}  (no parts)\n")

    w("\n== decomposed / whole ==\n")
    a_only = sum(1 for o in outcomes for j in range(2) if o.relaxed["decomposed"][j] > o.relaxed["whole"][j])
    b_only = sum(1 for o in outcomes for j in range(2) if o.relaxed["whole"][j] > o.relaxed["decomposed"][j])
    low, high = paired_bootstrap(outcomes, seed)
    w(f"relaxed: {rel['decomposed'].mean:.3f} / {rel['whole'].mean:.3f} = {_ratio(rel['decomposed'].mean, rel['whole'].mean)}\n")
    w(
        f"paired difference a - b = {rel['decomposed'].mean - rel['whole'].mean:+.3f}, 95% bootstrap interval over queries "
        f"[{low:+.3f}, {high:+.3f}]; parts right only in a: {a_only}, only in b: {b_only}, exact sign test p = {sign_test(a_only, b_only):.3f}\n"
    )
    if same:
        w(f"strict (same applicable parts): {same_a.mean:.3f} / {same_b.mean:.3f} = {_ratio(same_a.mean, same_b.mean)} (n={len(same)})\n")

    w("\n== verdict ==\n")
    overlap = not (rel["decomposed"].ci_low > rel["whole"].ci_high or rel["whole"].ci_low > rel["decomposed"].ci_high)
    lines = []
    p_sign = sign_test(a_only, b_only)
    if p_sign < 0.05 and not low <= 0 <= high:
        lines.append(f"{'decomposed' if low > 0 else 'whole'} is better at this n (exact sign test p = {p_sign:.3f}, bootstrap interval excludes 0)")
    else:
        lines.append(
            f"no significant difference at this n: exact sign test on the {a_only + b_only} discordant parts p = {p_sign:.3f}"
            + ("" if low <= 0 <= high else " (the bootstrap interval excludes 0, but with so few discordant parts it is too optimistic)")
        )
    if overlap:
        lines.append("the two approaches' Wilson intervals overlap")
    if max(rel["decomposed"].mean, rel["whole"].mean) < 0.5:
        lines.append("both score under 0.5: the experts are weak on these items, so a routing difference is hard to see")
    gains = [(o, j) for o in outcomes for j in range(2) if o.relaxed["decomposed"][j] > o.relaxed["whole"][j]]
    if gains:
        n_same = sum(o.experts["decomposed"][j] == o.experts["whole"][j] for o, j in gains)
        lines.append(
            f"of the {len(gains)} parts right only when decomposed, {n_same} were answered by the same expert that "
            f"answered the whole query: that share of the gain comes from answering each part on its own, not from another expert"
        )
    for d in sorted({d for o in outcomes for d in o.query.pair}):
        idx = [(o, j) for o in outcomes for j in range(2) if o.query.pair[j] == d]
        p_mean = statistics.mean(o.probability["decomposed"][j] for o, j in idx) if idx else 1.0
        if p_mean < 0.6:
            lines.append(
                f"the router's choice for {d} parts is close to a coin flip (mean p {p_mean:.2f}, the cards tie or nearly): "
                "another run routes them differently and its numbers differ"
            )
        if idx and not any(o.relaxed["whole"][j] for o, j in idx):
            lines.append(f"whole-query answers never answered the {d} part ({len(idx)} parts): they answer one question of two")
    lines.append(
        "(b) is scored leniently: a reference anywhere in a whole answer counts (also inside the other part's answer); "
        "(a) gets max_tokens per part, (b) max_tokens in all"
    )
    for line in lines:
        w(f"- {line}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--judge-items", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-prompt-chars", type=int, default=130, help="only items with prompts this short")
    parser.add_argument("--pairs", type=int, default=2, help="at most this many dimension pairs")
    parser.add_argument("--dimensions", nargs="+", default=list(DEFAULT_DIMENSIONS))
    parser.add_argument("--data-dir", type=Path, help="reuse this node data dir (its cards) across runs")
    parser.add_argument("--judge-timeout-s", type=float, default=900)
    parser.add_argument("--show-answers", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args()

    print("command: python " + " ".join(sys.argv), flush=True)
    suites = load_suites()
    # The node judges with random.Random(0) and no private items unless the data dir has some.
    judged_sample = {i.id for i in choose_independent_items(suites, args.judge_items, random.Random(0))}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "node"
        if (data_dir / "private_probes.json").exists():
            print("note: the data dir has private probes; the held-out set is only the public sample")
        model_args = [a for m in MODELS for a in ("--model", m)]
        started = time.monotonic()
        node = start_node(data_dir, *model_args, "--judge-items", str(args.judge_items), judge=True)
        try:
            print(f"node {node.node_id} at {node.url}, data dir {data_dir}", flush=True)
            rows = wait_judged(node.url, args.judge_timeout_s)
            print(f"judged after {time.monotonic() - started:.0f} s", flush=True)
            experts = [r["id"] for r in rows]
            cards = {r["id"]: own_card(r, node.node_id) for r in rows}
            scores = {
                e: {d: DimensionScore(d, s["mean"], s["n"], s["ci_low"], s["ci_high"]) for d, s in c["scores"].items()}
                for e, c in cards.items()
            }
            print(f"\n== expert profiles (card by node {node.node_id[:8]}, sample {cards[experts[0]]['sample']}, 95% intervals) ==")
            print(f"{'dimension':<15}" + "".join(f"{short(e):<32}" for e in experts) + "leader")
            leaders = {}
            for d in sorted(scores[experts[0]]):
                means = {e: scores[e][d].mean for e in experts}
                best = max(means.values())
                top = [e for e in experts if means[e] == best]
                leaders[d] = top[0] if len(top) == 1 else "tie"
                print(f"{d:<15}" + "".join(f"{fmt(scores[e][d]):<32}" for e in experts) + (short(leaders[d]) if len(top) == 1 else "tie"))
            for e in experts:
                perf = cards[e]["performance"]
                print(f"{short(e)}: {perf['tokens_per_s']} tokens/s, ttft {perf['ttft_ms']} ms")

            if len(experts) != 2:
                raise RuntimeError(f"expected 2 experts, got {experts}")
            pairs, notes = pick_pairs(scores, experts, list(args.dimensions), args.pairs)
            print(f"\ndimension pairs (card leaders differ): {', '.join(f'{a}+{b}' for a, b in pairs)}")
            queries, build_notes = build_queries(suites, pairs, args.queries, judged_sample, args.max_prompt_chars)
            for note in notes + build_notes:
                print(f"note: {note}")
            print(f"{len(queries)} compound queries, items held out of the judged sample ({len(judged_sample)} items); "
                  f"temperature 0, max_tokens {args.max_tokens}, no feedback sent", flush=True)

            run_started = time.monotonic()
            outcomes = [run_query(node.url, q, i, args.max_tokens) for i, q in enumerate(queries)]
            print(f"asked {2 * len(queries)} requests in {time.monotonic() - run_started:.0f} s")
            stats = get_json(node.url + "/v1/router/stats")
        finally:
            node.stop()

    report(outcomes, leaders, args.seed)
    print(f"router: {stats['rated']} rated decisions in the ledger (no learning), policy version {stats['policy_version']}")
    if args.show_answers:
        print("\n== answers ==")
        for i, o in enumerate(outcomes, 1):
            print(f"--- {i}: {o.query.text}\n[a decomposed]\n{o.content['decomposed']}\n[b whole]\n{o.content['whole']}")


if __name__ == "__main__":
    main()
