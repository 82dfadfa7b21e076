"""Running probe suites against an expert and turning the answers into a signed capability card."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from node.judging.cards import (
    CapabilityCard,
    CardStore,
    Performance,
    SignedCapabilityCard,
    sample_label,
    sign_capability_card,
)
from node.judging.scorers import JudgeOutputError, judge_prompt, parse_judge_score, score
from node.judging.stats import DimensionScore, summarize
from node.judging.suites import (
    ProbeItem,
    Suite,
    SuiteError,
    combined_version,
    load_suites,
    parse_suite,
    sample_items,
    suite_digest,
)
from node.serving.expert import Expert, Local, run
from node.serving.experts import ChatMessage, Delta, GenerationParams, ServedExpert
from peers.identity import NodeIdentity

log = logging.getLogger(__name__)

PRIVATE_PROBES_FILE = "private_probes.json"
# A judge's reply is two short lines: a score and a one-sentence rationale.
JUDGE_MAX_TOKENS = 64


@dataclass(frozen=True)
class ProbeAnswer:
    """An expert's answer to one probe, with its timing."""

    text: str
    ttft_s: float
    completion_tokens: int
    elapsed_s: float


class ProbeResult(NamedTuple):
    """A probe, the answer it got and that answer's score in [0, 1]."""

    item: ProbeItem
    answer: ProbeAnswer
    score: float


Ask = Callable[[ProbeItem], Awaitable[ProbeAnswer]]
# Asks the designated judge expert a grading prompt; returns its reply text.
JudgeAsk = Callable[[str], Awaitable[str]]
OnItem = Callable[[ProbeResult], None]


async def run_probes(
    ask: Ask,
    items: Sequence[ProbeItem],
    *,
    progress: bool = False,
    on_item: OnItem | None = None,
    judge_ask: JudgeAsk | None = None,
) -> list[ProbeResult]:
    """Ask and score each item in turn; `llm_judge` items without a `judge_ask` are skipped."""
    results: list[ProbeResult] = []
    skipped = 0
    with tqdm(total=len(items), desc="judging", unit="probe", file=sys.stderr, disable=not progress) as bar:
        for item in items:
            result = await _run_one(ask, item, judge_ask)
            if result is None:
                skipped += 1
                bar.set_postfix(skipped=skipped)
            else:
                results.append(result)
                if on_item is not None:
                    on_item(result)
            bar.update(1)
    if skipped:
        log.info("skipped %d of %d probe items (llm_judge without a usable judge)", skipped, len(items))
    return results


async def _run_one(ask: Ask, item: ProbeItem, judge_ask: JudgeAsk | None) -> ProbeResult | None:
    """The scored answer to one item, or None when it cannot be scored here."""
    if item.scorer != "llm_judge":
        answer = await ask(item)
        return ProbeResult(item, answer, score(item, answer.text))
    if judge_ask is None:
        return None
    answer = await ask(item)
    reply = await judge_ask(judge_prompt(item, answer.text))
    try:
        value, _ = parse_judge_score(reply)
    except JudgeOutputError as exc:
        # The judge's failure says nothing about the expert: leave the item out.
        log.warning("skipping %s: %s", item.id, exc.message)
        return None
    return ProbeResult(item, answer, value)


def summarize_run(
    results: Sequence[ProbeResult], expert_id: str, model_sha256: str, n_ctx: int
) -> tuple[tuple[DimensionScore, ...], Performance]:
    """Per-dimension scores (sorted by dimension) and the speed seen while judging."""
    by_dimension: dict[str, list[float]] = {}
    for result in results:
        by_dimension.setdefault(result.item.dimension, []).append(result.score)
    scores = tuple(summarize(dimension, by_dimension[dimension]) for dimension in sorted(by_dimension))
    # The first token's time belongs to TTFT, so decode speed counts the tokens after it.
    decode_tokens = sum(max(0, r.answer.completion_tokens - 1) for r in results)
    decode_s = sum(max(0.0, r.answer.elapsed_s - r.answer.ttft_s) for r in results)
    tokens_per_s = decode_tokens / decode_s if decode_s > 0 else 0.0
    ttft_ms = statistics.median(r.answer.ttft_s * 1000 for r in results) if results else 0.0
    log.info(
        "judged %s (%s): %d answers, %.1f tokens/s, median ttft %.0f ms",
        expert_id,
        model_sha256[:12],
        len(results),
        tokens_per_s,
        ttft_ms,
    )
    return scores, Performance(tokens_per_s=tokens_per_s, ttft_ms=ttft_ms, n_ctx=n_ctx)


async def ask(expert: Expert, prompt: str, *, max_tokens: int, seed: int = 0) -> ProbeAnswer:
    """One greedy answer from any expert, local or on a peer, to `prompt` as a single user message."""
    prepared = await expert.prepare([ChatMessage("user", prompt)])
    # Solo: a clean one-sequence run, so a card is reproducible whatever else the expert serves meanwhile.
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, seed=seed, solo=True)
    started_s = time.perf_counter()
    ttft_s: float | None = None
    texts: list[str] = []
    completion_tokens = 0
    async with aclosing(run(expert, prepared, params)) as events:
        async for event in events:
            if isinstance(event, Delta):
                if ttft_s is None:
                    ttft_s = time.perf_counter() - started_s
                texts.append(event.text)
            else:
                completion_tokens = event.completion_tokens
    elapsed_s = time.perf_counter() - started_s
    return ProbeAnswer("".join(texts), elapsed_s if ttft_s is None else ttft_s, completion_tokens, elapsed_s)


async def ask_expert(expert: ServedExpert, prompt: str, *, max_tokens: int, seed: int = 0) -> ProbeAnswer:
    """One greedy answer from a local expert to `prompt` as a single user message."""
    return await ask(Local(expert, ""), prompt, max_tokens=max_tokens, seed=seed)


def local_ask(expert: ServedExpert, *, seed: int = 0) -> Ask:
    """Ask a local expert each probe's prompt, greedily, within the probe's max_tokens."""

    async def ask(item: ProbeItem) -> ProbeAnswer:
        return await ask_expert(expert, item.prompt, max_tokens=item.max_tokens, seed=seed)

    return ask


def local_judge_ask(judge: ServedExpert, *, seed: int = 0, max_tokens: int = JUDGE_MAX_TOKENS) -> JudgeAsk:
    """Ask a local expert, as the designated judge, to grade with `scorers.judge_prompt` text."""

    async def ask(prompt: str) -> str:
        return (await ask_expert(judge, prompt, max_tokens=max_tokens, seed=seed)).text

    return ask


def load_private_items(path: Path) -> list[ProbeItem]:
    """Judge-local probe items (a JSON list of suite objects); [] when the file does not exist."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: cannot read private probes: {exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, list):
        raise SuiteError(f"{path}: top level must be a list of suite objects")
    items: list[ProbeItem] = []
    for index, suite in enumerate(raw):
        items.extend(parse_suite(json.dumps(suite), f"{path}[{index}]").items)
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise SuiteError(f"{path}: private item ids are not unique")
    return items


def choose_independent_items(
    suites: Mapping[str, Suite],
    n_per_dimension: int,
    rng: random.Random,
    private_items: Sequence[ProbeItem] = (),
) -> list[ProbeItem]:
    """Per dimension (sorted): `n_per_dimension` random public items plus that dimension's private ones."""
    unused = sorted({item.dimension for item in private_items} - set(suites))
    if unused:
        log.warning("private probes of dimensions %s have no suite here and are not used", unused)
    chosen: list[ProbeItem] = []
    for dimension in sorted(suites):
        private = [item for item in private_items if item.dimension == dimension]
        chosen.extend(sample_items(suites[dimension], n_per_dimension, rng, private))
    return chosen


def scorable_suites(suites: Mapping[str, Suite], has_judge: bool) -> dict[str, Suite]:
    """The suites a run can score: without a judge expert, those made only of `llm_judge` items are left out."""
    if has_judge:
        return dict(suites)
    return {d: s for d, s in suites.items() if any(item.scorer != "llm_judge" for item in s.items)}


async def judge_local_expert(
    expert: ServedExpert,
    identity: NodeIdentity,
    store: CardStore,
    *,
    dimensions: Sequence[str] | None = None,
    items_per_dimension: int | None = None,
    rng_seed: int = 0,
    progress: bool = False,
    force: bool = False,
    ask: Ask | None = None,
    judge_ask: JudgeAsk | None = None,
    now_ms: int | None = None,
) -> SignedCapabilityCard:
    """This node's card on its own expert: the stored one when it matches, else judge, sign and store."""
    spec = expert.spec
    suites = scorable_suites(load_suites(dimensions), judge_ask is not None)
    version, digest = combined_version(suites), suite_digest(suites)
    sample = sample_label(items_per_dimension)
    if not force:
        cached = await asyncio.to_thread(store.get, spec.sha256, version, identity.node_id)
        # Same key but other dimensions or another sample size is a different measurement.
        wanted = (digest, sample, spec.id, identity.node_id)
        if cached is not None and (
            cached.card.suite_digest,
            cached.card.sample,
            cached.card.expert_id,
            cached.card.owner_node_id,
        ) == wanted:
            log.info("expert %s: using the stored card issued at %d ms", spec.id, cached.card.issued_ms)
            return cached
    if items_per_dimension is None:
        items = [item for dimension in sorted(suites) for item in suites[dimension].items]
    else:
        items = choose_independent_items(suites, items_per_dimension, random.Random(rng_seed))
    log.info("judging expert %s on %d probes (%s)", spec.id, len(items), sample)
    results = await run_probes(
        ask or local_ask(expert, seed=rng_seed), items, progress=progress, judge_ask=judge_ask
    )
    scores, performance = summarize_run(results, spec.id, spec.sha256, spec.n_ctx)
    card = CapabilityCard(
        expert_id=spec.id,
        model_sha256=spec.sha256,
        scores=scores,
        performance=performance,
        suite_version=version,
        suite_digest=digest,
        judge_node_id=identity.node_id,
        judge_public_key=identity.public_key_raw,
        owner_node_id=identity.node_id,
        issued_ms=int(time.time() * 1000) if now_ms is None else now_ms,
        sample=sample,
    )
    signed = sign_capability_card(card, identity)
    await asyncio.to_thread(store.put, signed)
    log.info(
        "expert %s judged: %s",
        spec.id,
        ", ".join(f"{s.dimension} {s.mean:.3f} (n={s.n})" for s in signed.card.scores),
    )
    return signed
