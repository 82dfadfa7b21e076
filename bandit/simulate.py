"""Offline environments, baseline choosers, metrics and off-policy estimators."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

from bandit.features import (
    ExpertFeatures,
    ExpertId,
    NodeId,
    QueryFeatures,
    Task,
    query_features,
)
from bandit.policy import Policy, sample_index

CHECKPOINTS = (100, 500, 1000, 2000)


@dataclass(frozen=True)
class Drift:
    """From event `at_event` on, expert `expert_index` answers with `new_probs` per category."""

    at_event: int
    expert_index: int
    new_probs: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class World:
    """K experts, C query categories, and the true chance each expert satisfies each."""

    experts: tuple[ExpertFeatures, ...]
    categories: tuple[Task, ...]
    reward_probs: np.ndarray  # shape (K, C): P(thumbs up | expert, category)
    templates: Mapping[Task, tuple[str, ...]]
    category_weights: tuple[float, ...]
    slots: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    drift: Drift | None = None

    def __post_init__(self) -> None:
        probs = np.array(self.reward_probs, dtype=float)
        if probs.shape != (len(self.experts), len(self.categories)):
            raise ValueError("reward_probs must be experts x categories")
        probs.setflags(write=False)
        object.__setattr__(self, "reward_probs", probs)

    def probs_at(self, event_index: int) -> np.ndarray:
        """The reward matrix in force at `event_index` (after drift, if any)."""
        if self.drift is None or event_index < self.drift.at_event:
            return self.reward_probs
        probs = np.array(self.reward_probs)
        probs[self.drift.expert_index] = self.drift.new_probs
        return probs

    def with_drift(self, drift: Drift) -> World:
        """The same world with a mid-run change."""
        return World(
            experts=self.experts,
            categories=self.categories,
            reward_probs=self.reward_probs,
            templates=self.templates,
            category_weights=self.category_weights,
            slots=self.slots,
            drift=drift,
        )

    def query_text(self, category: Task, rng: np.random.Generator) -> str:
        """A realistic query of `category`, from a template with its slots filled."""
        templates = self.templates[category]
        template = templates[int(rng.integers(len(templates)))]
        values = {
            name: options[int(rng.integers(len(options)))]
            for name, options in self.slots.items()
            if "{" + name + "}" in template
        }
        numbers = {f"n{i}": str(int(rng.integers(2, 999))) for i in range(3)}
        return template.format(**values, **numbers)


@dataclass(frozen=True)
class Event:
    """One simulated query: its text, features and true category."""

    index: int
    text: str
    query: QueryFeatures
    category_index: int


@dataclass(frozen=True)
class Choice:
    """The expert a chooser picked and the probability it picked it with."""

    index: int
    probability: float


class Chooser(Protocol):
    """Anything that picks an expert per event and may learn from the reward."""

    name: str

    def choose(self, event: Event, world: World, rng: random.Random) -> Choice:
        """Pick an expert for `event`."""
        ...

    def observe(self, event: Event, world: World, choice: Choice, reward: float) -> None:
        """Learn from the reward of the pick (no-op for fixed choosers)."""
        ...


@dataclass(frozen=True)
class RunResult:
    """Per-event outcome of one run."""

    rewards: np.ndarray  # realised 0/1 rewards
    expected: np.ndarray  # true P(reward) of the chosen expert
    oracle_expected: np.ndarray  # true P(reward) of the best expert for the event
    chosen: np.ndarray
    categories: np.ndarray


class VWChooser:
    """Routes through the real `Policy`: probabilities, sample, learn."""

    def __init__(self, policy: Policy, name: str = "vw") -> None:
        self.name = name
        self.policy = policy

    def choose(self, event: Event, world: World, rng: random.Random) -> Choice:
        """Sample from the policy's probabilities."""
        probs = self.policy.probabilities(event.query, world.experts)
        index = sample_index(probs, rng)
        return Choice(index, probs[index])

    def observe(self, event: Event, world: World, choice: Choice, reward: float) -> None:
        """Learn with the logged probability."""
        self.policy.learn(event.query, world.experts, choice.index, choice.probability, reward)


class RandomChooser:
    """Uniformly random expert."""

    name = "random"

    def choose(self, event: Event, world: World, rng: random.Random) -> Choice:
        """Any expert, equally likely."""
        k = len(world.experts)
        return Choice(rng.randrange(k), 1.0 / k)

    def observe(self, event: Event, world: World, choice: Choice, reward: float) -> None:
        """Random never learns."""


class BestSingleChooser:
    """The one expert with the best expected reward over the query mix (in hindsight)."""

    name = "best-single"

    def choose(self, event: Event, world: World, rng: random.Random) -> Choice:
        """Always the same expert."""
        weights = np.asarray(world.category_weights)
        return Choice(int(np.argmax(world.reward_probs @ weights)), 1.0)

    def observe(self, event: Event, world: World, choice: Choice, reward: float) -> None:
        """Fixed in hindsight; nothing to learn."""


class JudgeGreedyChooser:
    """The expert whose card scores best on the detected task."""

    name = "judge-greedy"

    def choose(self, event: Event, world: World, rng: random.Random) -> Choice:
        """Highest judged score for the query's detected task; ties to the first."""
        scores = [e.task_score(event.query.task) or 0.0 for e in world.experts]
        return Choice(int(np.argmax(scores)), 1.0)

    def observe(self, event: Event, world: World, choice: Choice, reward: float) -> None:
        """Judged scores are fixed; nothing to learn."""


class OracleChooser:
    """The truly best expert for the event's true category, at that moment."""

    name = "oracle"

    def choose(self, event: Event, world: World, rng: random.Random) -> Choice:
        """Argmax of the true reward probabilities."""
        probs = world.probs_at(event.index)[:, event.category_index]
        return Choice(int(np.argmax(probs)), 1.0)

    def observe(self, event: Event, world: World, choice: Choice, reward: float) -> None:
        """The oracle already knows."""


def sample_events(world: World, n_events: int, rng: np.random.Generator) -> list[Event]:
    """A stream of queries drawn from the world's category mix."""
    weights = np.asarray(world.category_weights, dtype=float)
    cats = rng.choice(len(world.categories), size=n_events, p=weights / weights.sum())
    events = []
    for t, c in enumerate(cats):
        text = world.query_text(world.categories[int(c)], rng)
        events.append(Event(t, text, query_features(text), int(c)))
    return events


def run(
    world: World, chooser: Chooser, n_events: int, rng: np.random.Generator
) -> RunResult:
    """Play `n_events` queries; the same seed gives every chooser the same queries and luck."""
    events = sample_events(world, n_events, rng)
    luck = rng.random(n_events)  # common random numbers: reward = luck < P(reward)
    choice_rng = random.Random(int(rng.integers(2**63)))
    rewards = np.zeros(n_events)
    expected = np.zeros(n_events)
    oracle = np.zeros(n_events)
    chosen = np.zeros(n_events, dtype=int)
    for event in events:
        probs = world.probs_at(event.index)[:, event.category_index]
        choice = chooser.choose(event, world, choice_rng)
        reward = 1.0 if luck[event.index] < probs[choice.index] else 0.0
        chooser.observe(event, world, choice, reward)
        rewards[event.index] = reward
        expected[event.index] = probs[choice.index]
        oracle[event.index] = probs.max()
        chosen[event.index] = choice.index
    categories = np.array([e.category_index for e in events], dtype=int)
    return RunResult(rewards, expected, oracle, chosen, categories)


def percent_of_oracle(result: RunResult, n_events: int | None = None) -> float:
    """Expected reward collected over the first `n_events`, as % of the oracle's."""
    n = len(result.expected) if n_events is None else n_events
    return 100.0 * float(result.expected[:n].sum() / result.oracle_expected[:n].sum())


def cumulative_regret(result: RunResult, n_events: int | None = None) -> float:
    """Expected reward the oracle would have collected beyond ours over the first `n_events`."""
    n = len(result.expected) if n_events is None else n_events
    return float((result.oracle_expected[:n] - result.expected[:n]).sum())


def drift_recovery_events(
    world: World,
    result: RunResult,
    *,
    window: int = 10,
    share: float = 0.5,
) -> int | None:
    """Events after the drift until the new best's choice share recovers.

    Looks only at queries of categories whose best expert the drift changed; the share
    is a moving average over the last `window` such queries. None if it never recovers.
    """
    if world.drift is None:
        raise ValueError("world has no drift")
    at = world.drift.at_event
    before = world.reward_probs.argmax(axis=0)
    after = world.probs_at(at).argmax(axis=0)
    changed = {c for c in range(len(world.categories)) if before[c] != after[c]}
    hits: list[float] = []
    for t in range(at, len(result.chosen)):
        c = int(result.categories[t])
        if c not in changed:
            continue
        hits.append(1.0 if result.chosen[t] == after[c] else 0.0)
        if len(hits) >= window and sum(hits[-window:]) / window >= share:
            return t - at + 1
    return None


def ips(
    rewards: ArrayLike,
    logged_probs: ArrayLike,
    target_probs: ArrayLike,
) -> float:
    """Inverse propensity estimate of a target policy's mean reward from logged events.

    `logged_probs[i]` is the probability the logging policy gave the action it took;
    `target_probs[i]` the probability the target policy gives that same action.
    """
    r, w = _weights(rewards, logged_probs, target_probs)
    return float((w * r).sum() / len(r))


def snips(
    rewards: ArrayLike,
    logged_probs: ArrayLike,
    target_probs: ArrayLike,
) -> float:
    """Self-normalized IPS: like `ips` but divided by the sum of the importance weights."""
    r, w = _weights(rewards, logged_probs, target_probs)
    total = w.sum()
    return float((w * r).sum() / total) if total > 0 else 0.0


def _weights(
    rewards: ArrayLike, logged_probs: ArrayLike, target_probs: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Rewards and importance weights, validated."""
    r = np.asarray(rewards, dtype=float)
    p = np.asarray(logged_probs, dtype=float)
    q = np.asarray(target_probs, dtype=float)
    if not (len(r) == len(p) == len(q)) or len(r) == 0:
        raise ValueError("rewards, logged_probs and target_probs need the same non-zero length")
    if np.any(p <= 0) or np.any(p > 1):
        raise ValueError("logged probabilities must be in (0, 1]")
    return r, q / p


_CATEGORIES = (
    Task.KNOWLEDGE,
    Task.ARITHMETIC,
    Task.TRANSLATION,
    Task.CLASSIFICATION,
    Task.INSTRUCTION,
)

_TEMPLATES: dict[Task, tuple[str, ...]] = {
    Task.KNOWLEDGE: (
        "What is the capital of {country}?",
        "Who wrote {book}?",
        "When did {event} happen?",
        "Explain how {thing} works.",
        "Why do {animal} migrate?",
        "Where is {country} located on the map?",
        "Which river flows through the capital of {country}?",
        "Tell me about the history of {country}.",
        "What are {animal} known for",
        "who invented the {thing}",
    ),
    Task.ARITHMETIC: (
        "What is {n0} * {n1}?",
        "Compute {n0} + {n1}.",
        "Calculate {n0} minus {n1}",
        "How much is {n0} divided by {n1}?",
        "{n0} + {n1} - {n2} = ?",
        "What is {n0}% of {n1}?",
        "Multiply {n0} by {n1} please",
        "What is the square root of {n0}?",
        "If I have {n0} {animal} and buy {n1} more, what is the sum of them?",
        "I bought {n0} apples at {n1} cents each, how many cents did I spend?",
    ),
    Task.TRANSLATION: (
        "Translate '{phrase}' into French.",
        "How do you say '{phrase}' in Spanish?",
        "Translate to German: {phrase}",
        "What is '{phrase}' in Italian?",
        "Please translate this sentence into English: '{fphrase}'",
        "Give me the Spanish translation of '{phrase}'.",
        "Traduire en anglais : {fphrase}",
        "Render '{phrase}' into Portuguese.",
        "'{phrase}' in Japanese please",
        "'{phrase}' auf Deutsch?",
    ),
    Task.CLASSIFICATION: (
        "Classify the sentiment of this review: '{review}'",
        "Is this review positive or negative? '{review}'",
        "Sentiment of: {review}",
        "Categorize this email as spam or not: '{email}'",
        "Which category does this headline belong to: '{headline}'?",
        "Label this tweet as positive, negative or neutral: '{review}'",
        "Classify the topic of: '{headline}'",
        "Is the following message toxic or friendly? '{review}'",
        "Spam or ham? {email}",
        "Would you say this customer is happy: '{review}'",
    ),
    Task.INSTRUCTION: (
        "List three {things}.",
        "Give me a bulleted list of {things}.",
        "Format the following as JSON: name {name}, age {n0}.",
        "Write exactly five words about {thing}.",
        "Summarize in one sentence: {review}",
        "Rewrite this in uppercase: {phrase}",
        "Write a haiku about {animal}.",
        "Produce a numbered list of steps to {chore}.",
        "Make a table of {things} and their colors.",
        "Answer with only yes or no: is {country} in Europe?",
    ),
}

_SLOTS: dict[str, tuple[str, ...]] = {
    "country": ("France", "Japan", "Peru", "Kenya", "Norway", "Vietnam", "Chile", "Egypt"),
    "book": ("Hamlet", "Don Quixote", "War and Peace", "Beloved", "Dune", "Ulysses"),
    "event": ("the fall of the Berlin Wall", "the moon landing", "the French Revolution"),
    "thing": ("a refrigerator", "photosynthesis", "a jet engine", "the telephone", "radar"),
    "animal": ("geese", "salmon", "whales", "monarch butterflies", "swallows"),
    "phrase": ("good morning", "where is the station", "I love reading", "thank you very much"),
    "fphrase": ("je suis fatigué", "où est la gare", "merci beaucoup", "il fait beau"),
    "review": (
        "the food was cold and the staff rude",
        "absolutely loved this phone, battery lasts forever",
        "it was fine I guess",
        "worst purchase I have ever made",
    ),
    "email": ("WIN a free cruise now!!!", "Meeting moved to 3pm", "Your invoice is attached"),
    "headline": ("Stocks rally after rate cut", "Local team wins the cup", "New vaccine approved"),
    "things": ("fruits", "European capitals", "prime numbers", "programming languages"),
    "name": ("Ada", "Linus", "Grace", "Alan"),
    "chore": ("bake bread", "change a tire", "plant a tree"),
}


def default_world() -> World:
    """Four specialists over five categories, with a judge that is right only mostly.

    Truth: each expert is best (0.8) at its own category; knowledge's runner-up is
    clear (0.6), so a drift of the knowledge expert has a definite new best. The judge
    overrates `babel` at classification and `atlas` at instruction, so judge-greedy
    loses there; everything a router needs beyond the cards must be learned.
    """
    ids = ("atlas", "abacus", "babel", "sorter")
    families = (("llama", "1B", "q4_k_m"), ("qwen", "0.5B", "q8_0"), ("gemma", "270M", "q4_0"),
                ("smollm", "360M", "q4_k_m"))
    # Columns: knowledge, arithmetic, translation, classification, instruction.
    truth = np.array(
        [
            [0.80, 0.35, 0.40, 0.45, 0.45],
            [0.60, 0.80, 0.30, 0.40, 0.40],
            [0.40, 0.30, 0.80, 0.40, 0.45],
            [0.35, 0.40, 0.45, 0.80, 0.80],
        ]
    )
    judged = np.array(
        [
            [0.75, 0.40, 0.35, 0.50, 0.70],
            [0.55, 0.70, 0.30, 0.35, 0.50],
            [0.40, 0.35, 0.75, 0.65, 0.45],
            [0.30, 0.45, 0.40, 0.55, 0.60],
        ]
    )
    experts = tuple(
        ExpertFeatures(
            expert_id=ExpertId(ids[k]),
            node_id=NodeId(f"node-{k % 2}"),
            family=families[k][0],
            params=families[k][1],
            quantization=families[k][2],
            scores={cat.value: float(judged[k, c]) for c, cat in enumerate(_CATEGORIES)},
            latency_ms_avg=200.0 + 100.0 * k,
            queue_depth=0,
            local=k % 2 == 0,
        )
        for k in range(len(ids))
    )
    return World(
        experts=experts,
        categories=_CATEGORIES,
        reward_probs=truth,
        templates=_TEMPLATES,
        category_weights=(0.3, 0.2, 0.15, 0.15, 0.2),
        slots=_SLOTS,
    )


def drift_world(at_event: int = 1000) -> World:
    """The default world where `atlas` degrades to 0.2 everywhere at `at_event`."""
    world = default_world()
    k = len(world.categories)
    return world.with_drift(Drift(at_event=at_event, expert_index=0, new_probs=(0.2,) * k))


def synthetic_experts(n: int, *, nodes: int = 17) -> list[ExpertFeatures]:
    """`n` plausible candidates with judged cards, for latency and memory measurements."""
    rng = random.Random(n)
    dims = ("knowledge", "arithmetic", "translation", "classification", "instruction")
    return [
        ExpertFeatures(
            expert_id=ExpertId(f"expert-{i}"),
            node_id=NodeId(f"node-{i % nodes}"),
            family=("llama", "qwen", "gemma", "smollm")[i % 4],
            params=("135M", "360M", "0.5B", "1B")[i % 4],
            quantization=("q4_k_m", "q8_0")[i % 2],
            scores={d: round(rng.random(), 2) for d in dims},
            latency_ms_avg=rng.uniform(50, 2000),
            queue_depth=rng.randrange(4),
            local=i % 3 == 0,
        )
        for i in range(n)
    ]
