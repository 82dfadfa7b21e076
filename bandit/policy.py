"""Vowpal Wabbit cb_explore_adf wrapper: rank candidates, learn from rewards, save, load."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import vowpalwabbit

from bandit.features import (
    INTERACTIONS,
    TASK_SCORE_FEATURE,
    ExpertFeatures,
    QueryFeatures,
    Task,
    action_line,
    context_line,
)

log = logging.getLogger(__name__)

EXPLORATIONS = ("squarecb", "epsilon", "softmax")
SCORE_NAMESPACE = "s"

_MAGIC = b"expertmesh-policy\n"
_FORMAT = 1
# VW's fixed hash for the implicit "Constant" feature, and its FNV multiplier for interactions.
_VW_CONSTANT_HASH = 11650396
_VW_FNV_PRIME = 16777619


class PolicyError(Exception):
    """Base of the errors the policy raises on purpose."""


class PolicyLoadError(PolicyError):
    """A saved policy is missing, corrupt or unreadable; rebuild it from the ledger."""


def reward_to_cost(reward: float) -> float:
    """VW minimises cost; ours is the negated reward (the one place this sign flips)."""
    return -float(reward)


def cost_to_reward(cost: float) -> float:
    """The inverse of `reward_to_cost` (the same negation, read the other way)."""
    return reward_to_cost(cost)


def vw_args(
    exploration: str,
    *,
    epsilon: float,
    gamma_scale: float,
    gamma_exponent: float = 0.0,
    softmax_lambda: float = 10.0,
    seed: int,
    learning_rate: float,
    power_t: float,
    interactions: Sequence[str] = INTERACTIONS,
) -> list[str]:
    """The VW command line for a fresh policy."""
    if exploration == "squarecb":
        explore = [
            "--squarecb",
            "--gamma_scale",
            str(gamma_scale),
            "--gamma_exponent",
            str(gamma_exponent),
        ]
    elif exploration == "epsilon":
        explore = ["--epsilon", str(epsilon)]
    elif exploration == "softmax":
        explore = ["--softmax", "--lambda", str(softmax_lambda)]
    else:
        raise ValueError(f"exploration must be one of {EXPLORATIONS}, got {exploration!r}")
    quadratics = [arg for pair in interactions for arg in ("-q", pair)]
    return [
        "--cb_explore_adf",
        "--cb_type",
        "mtr",
        *explore,
        *quadratics,
        "-l",
        str(learning_rate),
        "--power_t",
        str(power_t),
        "--random_seed",
        str(seed),
        "--quiet",
    ]


def sample_index(probabilities: Sequence[float], rng: random.Random) -> int:
    """Draw an index from a probability vector (need not sum exactly to 1)."""
    if not probabilities:
        raise ValueError("cannot sample from an empty probability vector")
    total = math.fsum(p for p in probabilities if p > 0)
    if total <= 0:
        raise ValueError("probabilities must have a positive entry")
    draw = rng.random() * total
    cumulative = 0.0
    last_positive = 0
    for index, p in enumerate(probabilities):
        if p <= 0:
            continue
        last_positive = index
        cumulative += p
        if draw < cumulative:
            return index
    return last_positive


def rng_for_decision(decision_id: str) -> random.Random:
    """A generator seeded from the decision id, so each choice can be replayed exactly."""
    digest = hashlib.sha256(decision_id.encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _normalize(raw: Sequence[float], n: int) -> list[float]:
    """Clean a pmf: finite, non-negative, summing to 1; uniform if VW gave nothing usable."""
    probs = [p if math.isfinite(p) and p > 0 else 0.0 for p in raw]
    total = math.fsum(probs)
    if len(probs) != n or total <= 0:
        return [1.0 / n] * n
    return [p / total for p in probs]


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # Some filesystems cannot fsync a directory; the file itself was fsynced.
    finally:
        os.close(fd)


class Policy:
    """A contextual bandit over experts, backed by one `vowpalwabbit.Workspace`.

    Not thread-safe: the workspace is mutable native state, so callers serialize every
    call (one owner, or a lock around it). `model_path` (or `Policy.load`) restores a
    saved policy, whose settings then come from the file.

    Cold start from judged cards: each action carries `|s task_score:X`, the expert's
    judged score for the query's detected task. A fresh model sets the weight of that
    one feature to `-prior_weight` in VW's own weight vector, so before any feedback the
    predicted cost of an expert is `-prior_weight * task_score`, i.e. with the default
    1.0 the judged score is read as the expected reward. The pmf is still VW's (the
    exploration algorithm sees those predicted costs), no synthetic examples are learned,
    and feedback moves that weight like any other. Experts without a judged score for
    the task get no prior. A loaded model keeps whatever weight it has learned.

    With `prior_evidence` k > 0 the judged score of one expert on one task fades as this
    policy learns ratings there: its feature value is scaled by k / (k + n), n the rewards
    learned for that (expert, task) cell, so the judges' items count as k ratings and the
    node's own evidence takes over (the counts are saved with the model). An expert never
    tried on the task keeps its full prior. Off by default: on `default_world`, whose cards
    are accurate, it costs reward (scripts/bench_router.py), while on the specialists'
    benchmark, whose cards come from a few judge items, it helps (README, "Specialists measured").

    Defaults were tuned on `bandit.simulate.default_world` (see scripts/bench_router.py):
    - SquareCB with a constant gamma (`gamma_exponent=0`): VW's growing schedule starts
      at gamma 0, a uniform pmf that would ignore the cards, and it never stops shrinking
      exploration, which slows recovery when an expert degrades.
    - Constant learning rate (`power_t=0`) so the model keeps tracking a changing network.
    - The importance weight 1/p handed to VW is capped at `max_importance_weight`: with
      raw IPS weights (up to ~100 here) one lucky reward on a rarely explored expert
      flipped the greedy choice for hundreds of queries. SquareCB's regression oracle
      does not need the weights; the ledger still logs the exact probability, which is
      what the off-policy estimators use.
    """

    def __init__(
        self,
        exploration: str = "squarecb",
        *,
        epsilon: float = 0.05,
        gamma_scale: float = 400.0,
        gamma_exponent: float = 0.0,
        softmax_lambda: float = 10.0,
        seed: int = 0,
        model_path: Path | None = None,
        learning_rate: float = 0.5,
        power_t: float = 0.0,
        prior_weight: float = 1.0,
        max_importance_weight: float = 5.0,
        interactions: Sequence[str] = INTERACTIONS,
        prior_evidence: float = 0.0,
    ) -> None:
        if max_importance_weight < 1.0:
            raise ValueError("max_importance_weight must be at least 1")
        self._exploration = exploration
        self._max_importance_weight = max_importance_weight
        self.version = 0
        self._prior_evidence = max(0.0, float(prior_evidence))
        self._ratings: dict[str, int] = {}  # rewards learned per (expert, task) cell: this node's own evidence
        self.meta: dict[str, Any] = {}  # what the caller saved beside the model (e.g. what it has learned)
        if model_path is not None:
            header, self._workspace = _load_workspace(Path(model_path), seed)
            self.meta = dict(header.get("meta") or {})
            self._args = [str(a) for a in header.get("args", [])]
            self.version = int(header.get("version", 0))
            self._max_importance_weight = float(
                header.get("max_importance_weight", max_importance_weight)
            )
            self._exploration = _exploration_of(self._args, exploration)
            self._prior_evidence = float(header.get("prior_evidence", 0.0))
            self._ratings = {str(k): int(v) for k, v in (header.get("ratings") or {}).items()}
        else:
            self._args = vw_args(
                exploration,
                epsilon=epsilon,
                gamma_scale=gamma_scale,
                gamma_exponent=gamma_exponent,
                softmax_lambda=softmax_lambda,
                seed=seed,
                learning_rate=learning_rate,
                power_t=power_t,
                interactions=interactions,
            )
            self._workspace = vowpalwabbit.Workspace(arg_list=self._args)
        self._interactions = tuple(_interactions_of(self._args))
        self._mask = self._workspace.num_weights() - 1
        if model_path is None:
            self._set_prior(prior_weight)

    @classmethod
    def load(cls, path: Path, *, seed: int = 0) -> Policy:
        """A policy restored from `save`; raises PolicyLoadError if it cannot be trusted."""
        return cls(seed=seed, model_path=path)

    @property
    def exploration(self) -> str:
        """The exploration algorithm in use."""
        return self._exploration

    def probabilities(
        self, query: QueryFeatures, experts: Sequence[ExpertFeatures]
    ) -> list[float]:
        """The probability of choosing each expert, in the order given."""
        if not experts:
            raise ValueError("no candidate experts")
        if len(experts) == 1:
            return [1.0]
        prediction = self._workspace.predict(self._lines(query, experts))
        raw = _pmf_in_order(prediction, len(experts))
        if len(raw) != len(experts) or not math.isclose(math.fsum(raw), 1.0, abs_tol=1e-3):
            log.warning("VW returned an odd pmf %r for %d candidates", raw, len(experts))
        return _normalize(raw, len(experts))

    def learn(
        self,
        query: QueryFeatures,
        experts: Sequence[ExpertFeatures],
        chosen_index: int,
        probability: float,
        reward: float,
    ) -> None:
        """Update on one logged decision; `probability` is the one it was chosen with.

        VW sees at most `max_importance_weight` as 1/probability (see the class docstring).
        """
        if not 0 <= chosen_index < len(experts):
            raise ValueError(f"chosen_index {chosen_index} out of range for {len(experts)}")
        if not (0.0 < probability <= 1.0):
            raise ValueError(f"probability must be in (0, 1], got {probability}")
        if not math.isfinite(reward):
            raise ValueError("reward must be finite")
        lines = self._lines(query, experts)
        learn_probability = max(probability, 1.0 / self._max_importance_weight)
        label = f"0:{reward_to_cost(reward):.6g}:{learn_probability:.6g} "
        lines[chosen_index + 1] = label + lines[chosen_index + 1]
        self._workspace.learn(lines)
        self.version += 1
        if self._prior_evidence > 0:
            key = _cell(experts[chosen_index], query.task)
            self._ratings[key] = self._ratings.get(key, 0) + 1

    def top_features(
        self, query: QueryFeatures, expert: ExpertFeatures, k: int = 5
    ) -> list[tuple[str, float]]:
        """The features that weighed most for `expert` on `query`, as (name, reward share).

        Looks up each feature's weight (interactions included) in VW's weight vector by
        the same hashing VW 9 uses (namespace-seeded feature hash; FNV product for
        quadratics). The shares add up to the reward VW predicts for the expert, so they
        rank experts as VW does; a positive share pushes towards choosing the expert.
        """
        contributions: dict[str, float] = {}
        shared = _parse_line(context_line(query))
        action = _parse_line(action_line(expert, query.task, self.prior_scale(expert, query.task)))
        features = shared + action
        for ns, name, value in features:
            weight = self._workspace.get_weight(self._index(ns, name))
            key = f"{ns}^{name}"
            contributions[key] = contributions.get(key, 0.0) + value * weight
        by_ns: dict[str, list[tuple[str, float]]] = {}
        for ns, name, value in features:
            by_ns.setdefault(ns, []).append((name, value))
        for pair in self._interactions:
            left, right = tuple(pair)  # "-q ab" pairs namespaces a and b
            for name1, v1 in by_ns.get(left, []):
                h1 = self._index(left, name1)
                for name2, v2 in by_ns.get(right, []):
                    index = ((h1 * _VW_FNV_PRIME) ^ self._index(right, name2)) & self._mask
                    weight = self._workspace.get_weight(index)
                    key = f"{left}^{name1}*{right}^{name2}"
                    contributions[key] = contributions.get(key, 0.0) + v1 * v2 * weight
        constant = self._workspace.get_weight(_VW_CONSTANT_HASH & self._mask)
        contributions["Constant"] = constant
        ranked = sorted(
            ((name, cost_to_reward(c)) for name, c in contributions.items() if c != 0.0),
            key=lambda item: abs(item[1]),
            reverse=True,
        )
        return ranked[:k]

    def save(self, path: Path, *, meta: dict[str, Any] | None = None) -> None:
        """Write the model atomically (temp file, fsync, rename), with a checksum and the caller's `meta`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".policy-") as tmp:
            raw_path = Path(tmp) / "model.vw"
            self._workspace.save(str(raw_path))
            model = raw_path.read_bytes()
            header = {
                "format": _FORMAT,
                "version": self.version,
                "args": self._args,
                "max_importance_weight": self._max_importance_weight,
                "prior_evidence": self._prior_evidence,
                "ratings": dict(sorted(self._ratings.items())),
                "size": len(model),
                "sha256": hashlib.sha256(model).hexdigest(),
                "meta": meta or {},
            }
            framed = Path(tmp) / "policy"
            with open(framed, "wb") as out:
                out.write(_MAGIC)
                out.write(json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n")
                out.write(model)
                out.flush()
                os.fsync(out.fileno())
            os.replace(framed, path)
        _fsync_dir(path.parent)
        log.debug("saved policy version %d to %s", self.version, path)

    def close(self) -> None:
        """Release the native workspace."""
        self._workspace.finish()

    def _lines(self, query: QueryFeatures, experts: Sequence[ExpertFeatures]) -> list[str]:
        """The multi_ex text: shared context first, then one line per expert."""
        return [context_line(query)] + [
            action_line(e, query.task, self.prior_scale(e, query.task)) for e in experts
        ]

    def prior_scale(self, expert: ExpertFeatures, task: Task) -> float:
        """How much the judged score still counts for `expert` on `task`: k / (k + ratings learned there)."""
        if self._prior_evidence <= 0:
            return 1.0
        return self._prior_evidence / (self._prior_evidence + self._ratings.get(_cell(expert, task), 0))

    def _index(self, namespace: str, name: str) -> int:
        """The weight index VW gives a feature."""
        ws = self._workspace
        return ws.hash_feature(name, ws.hash_space(namespace)) & self._mask

    def _set_prior(self, prior_weight: float) -> None:
        """Start the task-score weight at the prior (see the class docstring)."""
        index = self._index(SCORE_NAMESPACE, TASK_SCORE_FEATURE)
        self._workspace.set_weight(index, 0, reward_to_cost(prior_weight))


def _cell(expert: ExpertFeatures, task: Task) -> str:
    """The key of one (expert, task) cell in the evidence counts."""
    return f"{expert.expert_id} {task.value}"


def _interactions_of(args: Sequence[str]) -> list[str]:
    """The quadratic namespace pairs named in saved args."""
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "-q"]


def _exploration_of(args: Sequence[str], default: str) -> str:
    """The exploration name recorded in saved args."""
    for name, flag in (("squarecb", "--squarecb"), ("softmax", "--softmax")):
        if flag in args:
            return name
    if "--epsilon" in args:
        return "epsilon"
    return default


def _pmf_in_order(prediction: Any, n: int) -> list[float]:
    """VW's prediction as probabilities by candidate index.

    pyvw gives a list of floats already in action order for action_probs; older or
    other bindings give (action, probability) pairs, which are put back in order here.
    """
    if prediction and isinstance(prediction[0], tuple):
        ordered = [0.0] * n
        for action, prob in prediction:
            if 0 <= int(action) < n:
                ordered[int(action)] = float(prob)
        return ordered
    return [float(p) for p in prediction]


def _parse_line(line: str) -> list[tuple[str, str, float]]:
    """(namespace, feature, value) triples of one of our own VW text lines."""
    features: list[tuple[str, str, float]] = []
    for segment in line.split("|")[1:]:
        tokens = segment.split()
        if not tokens:
            continue
        namespace, rest = tokens[0], tokens[1:]
        for token in rest:
            name, _, value = token.partition(":")
            features.append((namespace, name, float(value) if value else 1.0))
    return features


def _read_frame(path: Path) -> tuple[dict[str, Any], bytes]:
    """Header and VW model bytes of a saved policy, verified against its checksum."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyLoadError(f"cannot read policy file {path}: {exc}") from exc
    if not data.startswith(_MAGIC):
        raise PolicyLoadError(f"{path} is not an expertmesh policy file")
    header_end = data.find(b"\n", len(_MAGIC))
    if header_end < 0:
        raise PolicyLoadError(f"{path} has a truncated header")
    try:
        header = json.loads(data[len(_MAGIC) : header_end])
    except ValueError as exc:
        raise PolicyLoadError(f"{path} has a corrupt header") from exc
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise PolicyLoadError(f"{path} has an unknown format")
    model = data[header_end + 1 :]
    if len(model) != header.get("size") or hashlib.sha256(model).hexdigest() != header.get(
        "sha256"
    ):
        raise PolicyLoadError(f"{path} failed its checksum (truncated or corrupt)")
    return header, model


def _load_workspace(path: Path, seed: int) -> tuple[dict[str, Any], vowpalwabbit.Workspace]:
    """Header and workspace restored from a saved policy."""
    header, model = _read_frame(path)
    with tempfile.TemporaryDirectory(prefix="expertmesh-policy-") as tmp:
        raw_path = Path(tmp) / "model.vw"
        raw_path.write_bytes(model)
        try:
            # The model file carries its reductions and interactions; only the seed is not kept.
            workspace = vowpalwabbit.Workspace(
                arg_list=["-i", str(raw_path), "--quiet", "--random_seed", str(seed)]
            )
        except RuntimeError as exc:
            raise PolicyLoadError(f"VW could not load {path}: {exc}") from exc
    return header, workspace
