"""Query -> context features and expert -> action features, in VW text format."""

from __future__ import annotations

import enum
import functools
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NewType

ExpertId = NewType("ExpertId", str)
NodeId = NewType("NodeId", str)

MAX_WORDS = 64
TASK_SCORE_FEATURE = "task_score"

# Namespaces: q query words, t task/meta (shared); a identity, s judged scores, l load.
# Task x identity and task x scores let a score matter per task; words x identity learns
# what the task rules miss.
INTERACTIONS: tuple[str, ...] = ("ta", "ts", "qa")


class Task(enum.StrEnum):
    """The kind of work a query asks for; also the name of a judged score dimension."""

    KNOWLEDGE = "knowledge"
    ARITHMETIC = "arithmetic"
    TRANSLATION = "translation"
    CLASSIFICATION = "classification"
    INSTRUCTION = "instruction"
    CODE = "code"
    CHAT = "chat"


@dataclass(frozen=True)
class QueryFeatures:
    """What the router knows about a query before choosing an expert."""

    words: tuple[str, ...]
    length: str
    script: str
    lang: str
    task: Task

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the ledger."""
        return {
            "words": list(self.words),
            "length": self.length,
            "script": self.script,
            "lang": self.lang,
            "task": self.task.value,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QueryFeatures:
        """Inverse of `to_dict`."""
        return cls(
            words=tuple(data["words"]),
            length=data["length"],
            script=data["script"],
            lang=data["lang"],
            task=Task(data["task"]),
        )


@dataclass(frozen=True)
class ExpertFeatures:
    """What the router knows about one candidate expert."""

    expert_id: ExpertId
    node_id: NodeId
    family: str
    params: str
    quantization: str
    scores: Mapping[str, float] = field(default_factory=dict)
    latency_ms_avg: float | None = None
    queue_depth: int = 0
    local: bool = True
    running: int = 0  # requests holding a sequence slot
    waiting: int = 0  # requests queued for a slot: the part of the queue that costs time
    tokens_per_s: float | None = None  # all slots together, recently (local) or as judged (remote)
    # A specialist's base model sha256 and definition digest (12 hex each; empty for a plain model), so what is
    # learned about one specialist carries to its siblings on the same base or with the same prompt.
    base: str = ""
    definition: str = ""

    def __post_init__(self) -> None:
        # A read-only copy, so a caller's later edits cannot change a logged decision.
        object.__setattr__(self, "scores", types.MappingProxyType(dict(self.scores)))

    def __hash__(self) -> int:
        return hash(
            (
                self.expert_id,
                self.node_id,
                self.family,
                self.params,
                self.quantization,
                tuple(sorted(self.scores.items())),
                self.latency_ms_avg,
                self.queue_depth,
                self.local,
                self.running,
                self.waiting,
                self.tokens_per_s,
                self.base,
                self.definition,
            )
        )

    @functools.cached_property
    def vw_line(self) -> str:
        """The task-independent part of this expert's VW action line (built once)."""
        return _action_base(self)

    def task_score(self, task: Task) -> float | None:
        """The judged score for `task`, clamped to 0..1, or None when not judged."""
        value = self.scores.get(task.value)
        if value is None or not math.isfinite(value):
            return None
        return min(1.0, max(0.0, float(value)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the ledger."""
        return {
            "expert_id": self.expert_id,
            "node_id": self.node_id,
            "family": self.family,
            "params": self.params,
            "quantization": self.quantization,
            "scores": dict(self.scores),
            "latency_ms_avg": self.latency_ms_avg,
            "queue_depth": self.queue_depth,
            "local": self.local,
            "running": self.running,
            "waiting": self.waiting,
            "tokens_per_s": self.tokens_per_s,
            "base": self.base,
            "definition": self.definition,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertFeatures:
        """Inverse of `to_dict`."""
        return cls(
            expert_id=ExpertId(data["expert_id"]),
            node_id=NodeId(data["node_id"]),
            family=data["family"],
            params=data["params"],
            quantization=data["quantization"],
            scores={str(k): float(v) for k, v in data.get("scores", {}).items()},
            latency_ms_avg=data.get("latency_ms_avg"),
            queue_depth=int(data.get("queue_depth", 0)),
            local=bool(data.get("local", True)),
            running=int(data.get("running", 0)),
            waiting=int(data.get("waiting", 0)),
            tokens_per_s=data.get("tokens_per_s"),
            base=str(data.get("base", "")),
            definition=str(data.get("definition", "")),
        )


_WORD_RE = re.compile(r"\w+", re.UNICODE)

_STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset(
        "the a an is are was of to and in on for with what who how why when where "
        "which this that it be do does you i my me your please can".split()
    ),
    "fr": frozenset(
        "le la les un une des est et de du en pour avec qui que quoi comment pourquoi "
        "quand où ce cette je tu vous il elle nous sont dans sur pas".split()
    ),
    "de": frozenset(
        "der die das ein eine ist und zu von mit für wer was wie warum wann wo "
        "ich du sie wir nicht auf den dem des im sind bitte".split()
    ),
    "es": frozenset(
        "el la los las un una es y de del en para con quién qué cómo por cuándo dónde "
        "yo tú usted que son está no se al".split()
    ),
}

_CODE_RE = re.compile(
    r"```|\bdef\s+\w+\s*\(|\bfunction\b|\bclass\s+\w+|\bpython\b|\bjavascript\b|"
    r"\btypescript\b|\bjava\b|\brust\b|\bgolang\b|\bc\+\+|\bsql\b|\bregex\b|"
    r"\bsnippet\b|\bcompiler?\b|\bstack ?trace\b|#include|\bimport \w+|"
    r"\b(?:write|fix|debug|refactor|review|this|the following|my) (?:\w+ )?code\b",
    re.IGNORECASE,
)
_LANGUAGES = (
    "english|french|german|spanish|italian|portuguese|dutch|russian|chinese|"
    "japanese|korean|arabic|hindi|polish|turkish|swedish"
)
_TRANSLATION_RE = re.compile(
    r"\btranslat\w*|\btradu\w*|\bübersetz\w*|\bhow do (?:you|i) say\b|"
    rf"\b(?:in|into|to) (?:{_LANGUAGES})\b|\b(?:{_LANGUAGES}) for\b",
    re.IGNORECASE,
)
_CLASSIFICATION_RE = re.compile(
    r"\bsentiment\b|\bclassif\w*|\bcategori[sz]\w*|\bpositive or negative\b|"
    r"\bnegative or positive\b|\bspam or\b|\bwhich category\b|\blabel (?:this|the)\b|"
    r"\btoxic or\b|\bis this (?:review|message|email|tweet) (?:positive|negative)",
    re.IGNORECASE,
)
_ARITHMETIC_RE = re.compile(
    r"\d+(?:\.\d+)?\s*[-+*/×÷^x%]\s*\(?\d|\bcompute\b|\bcalculat\w*|\bberechne\w*|"
    r"\bcalcule\w*|\bsum of\b|\bproduct of\b|\bhow much is\b|\bplus\b|\bminus\b|"
    r"\btimes\b\s*\d|\bdivided by\b|\bmultipl\w*|\bsquare root\b|\bpercent of\b|"
    r"\b\d+\s*% of\b|\bwhat is \d",
    re.IGNORECASE,
)
_INSTRUCTION_RE = re.compile(
    r"^\s*list\b|\blist (?:of |the |three |five |\d+ )|\bformat\w*\b|\bjson\b|\bbullet\w*\b|"
    r"\bexactly \w+ (?:words|sentences|lines|items)\b|\bin \w+ words\b|\btable\b|"
    r"\buppercase\b|\blowercase\b|\brewrite\b|\bsummari[sz]e\b|\bnumbered\b|"
    r"\bcomma[- ]separated\b|\bone (?:word|sentence|line)\b|\bwithout using\b|\bhaiku\b",
    re.IGNORECASE,
)
_KNOWLEDGE_RE = re.compile(
    r"^\s*(?:who|what|when|where|why|which|how|whose|whom)\b|\bexplain\b|\bdefine\b|"
    r"\btell me about\b|\bwhat (?:is|are|was|were)\b|\bqui\b|\bwer\b|\bquién\b|\?\s*$",
    re.IGNORECASE,
)

# Order matters: the first rule that matches wins, most specific first.
_TASK_RULES: tuple[tuple[Task, re.Pattern[str]], ...] = (
    (Task.CODE, _CODE_RE),
    (Task.TRANSLATION, _TRANSLATION_RE),
    (Task.CLASSIFICATION, _CLASSIFICATION_RE),
    (Task.ARITHMETIC, _ARITHMETIC_RE),
    (Task.INSTRUCTION, _INSTRUCTION_RE),
    (Task.KNOWLEDGE, _KNOWLEDGE_RE),
)


def detect_task(text: str) -> Task:
    """The task type of a query, by ordered rules; `chat` when none matches."""
    for task, pattern in _TASK_RULES:
        if pattern.search(text):
            return task
    return Task.CHAT


def detect_script(text: str) -> str:
    """The writing system most letters of `text` belong to."""
    counts = {"latin": 0, "cyrillic": 0, "cjk": 0, "arabic": 0, "other": 0}
    for ch in text:
        if not ch.isalpha():
            continue
        code = ord(ch)
        if code < 0x250:
            counts["latin"] += 1
        elif 0x400 <= code <= 0x52F:
            counts["cyrillic"] += 1
        elif (
            0x3040 <= code <= 0x30FF
            or 0x3400 <= code <= 0x4DBF
            or 0x4E00 <= code <= 0x9FFF
            or 0xAC00 <= code <= 0xD7AF
        ):
            counts["cjk"] += 1
        elif 0x600 <= code <= 0x6FF or 0x750 <= code <= 0x77F:
            counts["arabic"] += 1
        else:
            counts["other"] += 1
    best = max(counts, key=lambda k: counts[k])
    return best if counts[best] > 0 else "other"


def detect_lang(words: tuple[str, ...]) -> str:
    """A rough language guess among en/fr/de/es from stopword hits; `other` if unsure."""
    hits = {lang: sum(1 for w in words if w in stop) for lang, stop in _STOPWORDS.items()}
    ranked = sorted(hits.items(), key=lambda kv: kv[1], reverse=True)
    if ranked[0][1] == 0 or ranked[0][1] == ranked[1][1]:
        return "other"
    return ranked[0][0]


def length_bucket(n_words: int) -> str:
    """A coarse length class from the word count."""
    if n_words <= 8:
        return "short"
    if n_words <= 32:
        return "medium"
    if n_words <= 128:
        return "long"
    return "xlong"


def query_features(text: str) -> QueryFeatures:
    """Context features of a query text."""
    all_words = _WORD_RE.findall(text.lower())
    words = tuple(all_words[:MAX_WORDS])
    return QueryFeatures(
        words=words,
        length=length_bucket(len(all_words)),
        script=detect_script(text),
        lang=detect_lang(words),
        task=detect_task(text),
    )


_UNSAFE_RE = re.compile(r"[\s|:]+")


def sanitize(name: str) -> str:
    """A VW-safe feature name: no whitespace, `|` or `:`."""
    cleaned = _UNSAFE_RE.sub("_", name.strip())
    return cleaned or "_"


def _num(value: float) -> str:
    """A finite VW feature value as text."""
    if not math.isfinite(value):
        value = 0.0
    return f"{value:.4g}"


def context_line(query: QueryFeatures) -> str:
    """The shared (context) example of a multi_ex."""
    words = " ".join("w=" + sanitize(w) for w in query.words)
    meta = (
        f"task={query.task.value} len={sanitize(query.length)} "
        f"script={sanitize(query.script)} lang={sanitize(query.lang)}"
    )
    return f"shared |q {words} |t {meta}"


def action_line(expert: ExpertFeatures, task: Task | None = None, prior_scale: float = 1.0) -> str:
    """The action example of one expert; with `task`, adds its judged score for that task, times `prior_scale`."""
    if task is not None:
        score = expert.task_score(task)
        if score is not None:
            # VW merges a repeated namespace, so the per-query score can follow the cached part.
            return f"{expert.vw_line} |s {TASK_SCORE_FEATURE}:{_num(score * prior_scale)}"
    return expert.vw_line


def _action_base(expert: ExpertFeatures) -> str:
    """Identity, judged scores and load of an expert, in VW text."""
    identity = (
        f"id={sanitize(expert.expert_id)} node={sanitize(expert.node_id)} "
        f"fam={sanitize(expert.family)} size={sanitize(expert.params)} "
        f"quant={sanitize(expert.quantization)} {'local' if expert.local else 'remote'}"
    )
    if expert.base:
        identity += f" base={sanitize(expert.base[:12])}"
    if expert.definition:
        identity += f" def={sanitize(expert.definition[:12])}"
    scores = " ".join(
        f"{sanitize(dim)}:{_num(min(1.0, max(0.0, v)))}"
        for dim, v in sorted(expert.scores.items())
        if math.isfinite(v)
    )
    if expert.latency_ms_avg is None or not math.isfinite(expert.latency_ms_avg):
        latency = "lat_unknown"
    else:
        # Log scale: latencies span 10 ms to minutes and a linear value would dominate.
        latency = f"lat:{_num(math.log1p(max(0.0, expert.latency_ms_avg) / 1000.0))}"
    load = f"{latency} queue:{_num(math.log1p(max(0, expert.queue_depth)))}"
    # Batching: running requests share the slots, waiting ones wait; both only when present, so an idle
    # expert's line is what it was before slots existed.
    if expert.running > 0:
        load += f" run:{_num(math.log1p(expert.running))}"
    if expert.waiting > 0:
        load += f" wait:{_num(math.log1p(expert.waiting))}"
    if expert.tokens_per_s is not None and math.isfinite(expert.tokens_per_s) and expert.tokens_per_s > 0:
        load += f" tps:{_num(math.log1p(expert.tokens_per_s))}"
    return f"|a {identity} |s {scores} |l {load}" if scores else f"|a {identity} |l {load}"
