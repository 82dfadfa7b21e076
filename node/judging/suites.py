"""Probe suites: versioned data files of probe items, loaded and validated."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeGuard

from node.errors import NodeError

log = logging.getLogger(__name__)

# A data folder beside this module; it has no __init__.py, so the name stays this module's.
SUITE_PACKAGE = "node.judging"
SUITE_FOLDER = "suites"
# The newest suite version in this release. A suite's own `version` is bumped (to the release
# then current) only when its content changes, so packaged suites may carry older versions;
# `combined_version` then names each one.
SUITE_VERSION = "2026.11.2"

SCORERS: frozenset[str] = frozenset(
    {"exact", "normalized", "numeric", "regex", "contains", "label", "refusal", "not_refusal", "llm_judge"}
)
# refusal / not_refusal judge the answer's stance, llm_judge follows its rubric.
REFERENCE_FREE_SCORERS: frozenset[str] = frozenset({"refusal", "not_refusal", "llm_judge"})
REGEX_MODES: frozenset[str] = frozenset({"search", "fullmatch"})

MIN_DIFFICULTY = 1
MAX_DIFFICULTY = 3
MAX_TOKENS_LIMIT = 4096
# Bounds the cost of compiling and matching a pattern from a suite we did not write.
MAX_PATTERN_CHARS = 500
DEFAULT_TOLERANCE = 1e-6
DEFAULT_MAX_TOKENS = 32
# A `label` item chooses among this many allowed labels.
MIN_LABELS = 2
MAX_LABELS = 12
MAX_LABEL_CHARS = 64

_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_DIMENSION_RE = re.compile(r"[a-z][a-z0-9_]*")
_ITEM_KEYS = frozenset(
    {"id", "prompt", "reference", "scorer", "difficulty", "max_tokens", "match", "tolerance", "rubric", "labels"}
)
_SUITE_KEYS = frozenset({"dimension", "version", "description", "items"})

Reference = str | float | tuple[str, ...] | None


class SuiteError(NodeError):
    """A probe suite or probe item is malformed."""

    code = "suite_error"


@dataclass(frozen=True)
class ProbeItem:
    """One probe: a prompt, what counts as right, and how to score it."""

    id: str
    dimension: str
    prompt: str
    reference: Reference
    scorer: str
    difficulty: int
    max_tokens: int = DEFAULT_MAX_TOKENS
    match: str = "search"
    tolerance: float = DEFAULT_TOLERANCE
    rubric: str | None = None
    # The allowed labels of a `label` item, one of them the reference; None for other scorers.
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_item(self)

    def references(self) -> tuple[str, ...]:
        """The accepted reference strings (one for a plain string reference)."""
        if isinstance(self.reference, tuple):
            return self.reference
        if self.reference is None:
            return ()
        return (str(self.reference),)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; also the canonical content hashed by `suite_digest`.

        `labels` appears only when set, so items without it keep their earlier canonical form.
        """
        reference = list(self.reference) if isinstance(self.reference, tuple) else self.reference
        data: dict[str, Any] = {
            "id": self.id,
            "dimension": self.dimension,
            "prompt": self.prompt,
            "reference": reference,
            "scorer": self.scorer,
            "difficulty": self.difficulty,
            "max_tokens": self.max_tokens,
            "match": self.match,
            "tolerance": self.tolerance,
            "rubric": self.rubric,
        }
        if self.labels is not None:
            data["labels"] = list(self.labels)
        return data


@dataclass(frozen=True)
class Suite:
    """All probe items of one capability dimension, at one version."""

    dimension: str
    version: str
    description: str
    items: tuple[ProbeItem, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        where = f"suite {self.dimension!r}"
        if not isinstance(self.dimension, str) or not _DIMENSION_RE.fullmatch(self.dimension):
            raise SuiteError(f"{where}: dimension must be lowercase letters, digits or '_'")
        if not isinstance(self.version, str) or not self.version.strip():
            raise SuiteError(f"{where}: version must be a non-empty string")
        if not self.items:
            raise SuiteError(f"{where}: has no items")
        seen: set[str] = set()
        for item in self.items:
            if item.dimension != self.dimension:
                raise SuiteError(f"{where}: item {item.id!r} belongs to dimension {item.dimension!r}")
            if item.id in seen:
                raise SuiteError(f"{where}: duplicate item id {item.id!r}")
            seen.add(item.id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, items in file order."""
        return {
            "dimension": self.dimension,
            "version": self.version,
            "description": self.description,
            "items": [item.to_dict() for item in self.items],
        }


def _fail(item: ProbeItem, message: str) -> SuiteError:
    return SuiteError(f"item {item.id!r}: {message}")


def _check_item(item: ProbeItem) -> None:
    if not isinstance(item.id, str) or not _ID_RE.fullmatch(item.id):
        raise SuiteError(f"item id {item.id!r}: must be lowercase letters, digits, '.', '_' or '-'")
    if not isinstance(item.dimension, str) or not item.id.startswith(f"{item.dimension}-"):
        raise _fail(item, f"id must start with its dimension, '{item.dimension}-'")
    if not isinstance(item.prompt, str) or not item.prompt.strip():
        raise _fail(item, "prompt must be a non-empty string")
    if item.scorer not in SCORERS:
        raise _fail(item, f"unknown scorer {item.scorer!r}; expected one of {sorted(SCORERS)}")
    if isinstance(item.difficulty, bool) or not isinstance(item.difficulty, int):
        raise _fail(item, "difficulty must be an integer")
    if not MIN_DIFFICULTY <= item.difficulty <= MAX_DIFFICULTY:
        raise _fail(item, f"difficulty must be {MIN_DIFFICULTY}..{MAX_DIFFICULTY}, got {item.difficulty}")
    if isinstance(item.max_tokens, bool) or not isinstance(item.max_tokens, int):
        raise _fail(item, "max_tokens must be an integer")
    if not 1 <= item.max_tokens <= MAX_TOKENS_LIMIT:
        raise _fail(item, f"max_tokens must be 1..{MAX_TOKENS_LIMIT}, got {item.max_tokens}")
    if item.match not in REGEX_MODES:
        raise _fail(item, f"match must be one of {sorted(REGEX_MODES)}, got {item.match!r}")
    if not _is_number(item.tolerance) or item.tolerance < 0:
        raise _fail(item, "tolerance must be a non-negative number")
    _check_reference(item)
    _check_labels(item)
    if item.scorer == "llm_judge" and (not isinstance(item.rubric, str) or not item.rubric.strip()):
        raise _fail(item, "llm_judge items need a non-empty 'rubric'")
    if item.rubric is not None and not isinstance(item.rubric, str):
        raise _fail(item, "rubric must be a string")


def _check_reference(item: ProbeItem) -> None:
    reference = item.reference
    if reference is None:
        if item.scorer not in REFERENCE_FREE_SCORERS:
            raise _fail(item, f"missing reference (scorer {item.scorer!r} needs one)")
        return
    if item.scorer == "numeric":
        if not _is_number(reference) or not math.isfinite(reference):
            raise _fail(item, f"numeric reference must be a finite number, got {reference!r}")
        return
    if item.scorer == "regex":
        if not isinstance(reference, str) or not reference:
            raise _fail(item, "regex reference must be a non-empty pattern string")
        if len(reference) > MAX_PATTERN_CHARS:
            raise _fail(item, f"regex pattern is over {MAX_PATTERN_CHARS} characters")
        try:
            re.compile(reference)
        except re.error as exc:
            raise _fail(item, f"regex pattern does not compile: {exc}") from exc
        return
    strings = reference if isinstance(reference, tuple) else (reference,)
    if not strings or not all(isinstance(s, str) and s.strip() for s in strings):
        raise _fail(item, "reference must be a non-empty string or a non-empty list of them")


def label_key(label: str) -> str:
    """The form a label is matched in: casefolded, accents dropped, words joined by one space."""
    decomposed = unicodedata.normalize("NFKD", label)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    folded = unicodedata.normalize("NFKC", stripped.casefold())
    return " ".join(word for word in re.split(r"[\W_]+", folded) if word)


def _check_labels(item: ProbeItem) -> None:
    labels = item.labels
    if item.scorer != "label":
        if labels is not None:
            raise _fail(item, f"labels only apply to the 'label' scorer, not {item.scorer!r}")
        return
    if labels is None:
        raise _fail(item, "label items need 'labels', the list of allowed labels")
    if not isinstance(labels, tuple) or not all(isinstance(label, str) for label in labels):
        raise _fail(item, "labels must be a list of strings")
    if not MIN_LABELS <= len(labels) <= MAX_LABELS:
        raise _fail(item, f"labels must list {MIN_LABELS}..{MAX_LABELS} labels, got {len(labels)}")
    keys = [label_key(label) for label in labels]
    for label, key in zip(labels, keys, strict=True):
        if not key or len(label) > MAX_LABEL_CHARS:
            raise _fail(item, f"label {label!r} must hold a letter or digit, in at most {MAX_LABEL_CHARS} characters")
    if len(set(keys)) != len(keys):
        raise _fail(item, f"labels {list(labels)} are not distinct once casefolded and accent-folded")
    strays = [ref for ref in item.references() if ref not in labels]
    if strays:
        raise _fail(item, f"reference {strays[0]!r} is not one of the labels {list(labels)}")


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_item(raw: object, dimension: str, index: int) -> ProbeItem:
    if not isinstance(raw, dict):
        raise SuiteError(f"item #{index}: must be an object")
    unknown = set(raw) - _ITEM_KEYS
    if unknown:
        raise SuiteError(f"item #{index} ({raw.get('id')!r}): unknown fields {sorted(unknown)}")
    for key in ("id", "prompt", "scorer", "difficulty"):
        if key not in raw:
            raise SuiteError(f"item #{index} ({raw.get('id')!r}): missing {key!r}")
    reference = raw.get("reference")
    labels = raw.get("labels")
    if isinstance(labels, list):
        labels = tuple(labels)
    if isinstance(reference, list):
        reference = tuple(reference)
    elif raw["scorer"] == "numeric" and isinstance(reference, int) and not isinstance(reference, bool):
        # 5 and 5.0 are one reference; one spelling keeps the digest canonical.
        reference = float(reference)
    return ProbeItem(
        id=raw["id"],
        dimension=dimension,
        prompt=raw["prompt"],
        reference=reference,
        scorer=raw["scorer"],
        difficulty=raw["difficulty"],
        max_tokens=raw.get("max_tokens", DEFAULT_MAX_TOKENS),
        match=raw.get("match", "search"),
        tolerance=raw.get("tolerance", DEFAULT_TOLERANCE),
        rubric=raw.get("rubric"),
        labels=labels,
    )


def parse_suite(text: str, source: str) -> Suite:
    """Parse and validate one suite file's text; `source` names it in errors."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SuiteError(f"{source}: top level must be an object")
    missing = _SUITE_KEYS - set(raw)
    if missing:
        raise SuiteError(f"{source}: missing {sorted(missing)}")
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        raise SuiteError(f"{source}: unknown fields {sorted(unknown)}")
    dimension, items = raw["dimension"], raw["items"]
    if not isinstance(dimension, str):
        raise SuiteError(f"{source}: dimension must be a string")
    if not isinstance(items, list):
        raise SuiteError(f"{source}: items must be a list")
    if not isinstance(raw["description"], str):
        raise SuiteError(f"{source}: description must be a string")
    try:
        parsed = tuple(_parse_item(item, dimension, index) for index, item in enumerate(items))
        return Suite(dimension, raw["version"], raw["description"], parsed)
    except SuiteError as exc:
        raise SuiteError(f"{source}: {exc.message}") from exc


def load_suite_file(path: str | Path | Traversable) -> Suite:
    """Load and validate one suite file; its name must be `<dimension>.json`."""
    file = Path(path) if isinstance(path, str) else path
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{file}: cannot read suite: {exc}") from exc
    suite = parse_suite(text, str(file))
    stem = file.name.removesuffix(".json")
    if suite.dimension != stem:
        raise SuiteError(f"{file}: dimension {suite.dimension!r} does not match the file name")
    return suite


def _suite_folder() -> Traversable:
    return resources.files(SUITE_PACKAGE).joinpath(SUITE_FOLDER)


def available_dimensions() -> tuple[str, ...]:
    """Dimensions with a packaged suite, sorted."""
    folder = _suite_folder()
    names = (entry.name for entry in folder.iterdir() if entry.name.endswith(".json"))
    return tuple(sorted(name.removesuffix(".json") for name in names))


def load_suites(dimensions: Sequence[str] | None = None) -> dict[str, Suite]:
    """Load the packaged suites (all, or the named dimensions), validated, keyed by dimension."""
    known = available_dimensions()
    wanted = known if dimensions is None else tuple(dict.fromkeys(dimensions))
    unknown = [d for d in wanted if d not in known]
    if unknown:
        raise SuiteError(f"no suite for dimensions {unknown}; available: {list(known)}")
    folder = _suite_folder()
    suites = {d: load_suite_file(folder.joinpath(f"{d}.json")) for d in wanted}
    owners: dict[str, str] = {}
    for suite in suites.values():
        for item in suite.items:
            if item.id in owners:
                where = f"{owners[item.id]!r} and {suite.dimension!r}"
                raise SuiteError(f"item id {item.id!r} appears in suites {where}")
            owners[item.id] = suite.dimension
    log.debug("loaded %d suites, %d items", len(suites), len(owners))
    return suites


def combined_version(suites: Mapping[str, Suite]) -> str:
    """One version for a set of suites: the shared one, else `dim@version` joined by '+'."""
    versions = {suite.version for suite in suites.values()}
    if len(versions) == 1:
        return versions.pop()
    return "+".join(f"{d}@{suites[d].version}" for d in sorted(suites))


def suite_digest(suites: Mapping[str, Suite] | None = None) -> str:
    """Hex sha256 of the suites' canonical content (default: every packaged suite)."""
    chosen = load_suites() if suites is None else suites
    canonical = [chosen[d].to_dict() for d in sorted(chosen)]
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def sample_items(
    suite: Suite, n: int, rng: random.Random, private: Sequence[ProbeItem] = ()
) -> list[ProbeItem]:
    """Up to `n` random items of `suite` plus every `private` item, in shuffled order."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    public_ids = {item.id for item in suite.items}
    private_ids: set[str] = set()
    for item in private:
        if item.dimension != suite.dimension:
            raise SuiteError(f"private item {item.id!r} is not of dimension {suite.dimension!r}")
        if item.id in public_ids or item.id in private_ids:
            raise SuiteError(f"private item id {item.id!r} is not unique")
        private_ids.add(item.id)
    chosen = rng.sample(suite.items, min(n, len(suite.items))) + list(private)
    # Shuffled so that an item's position does not tell which ones are private.
    rng.shuffle(chosen)
    return chosen
