"""Compound queries: split one message into parts for separate experts, and compose their answers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bandit.features import detect_task

PART_SEPARATOR = "\n\n"
HEADING_MAX_CHARS = 80
DEFAULT_MAX_PARTS = 4
# Longer texts are documents to work on, not lists of questions; this also bounds the cost.
MAX_SPLIT_CHARS = 4000
# A proposed part must be mostly the user's own words, and the parts together most of the message.
PROPOSAL_MIN_FAITHFUL = 0.75
PROPOSAL_MIN_COVERAGE = 0.5


@dataclass(frozen=True)
class Part:
    """One request of a query: its 0-based position, its text (`original[span[0]:span[1]]`), its task."""

    index: int
    text: str
    task: str
    span: tuple[int, int]
    # Words the part shares with the one before ("Give me " in "Give me the capital of Peru and the
    # boiling point of water"), put back in front when the part is asked on its own.
    lead: str = ""

    def request(self) -> str:
        """The part as a request of its own: its shared lead, then its text."""
        return f"{self.lead}{self.text}" if self.lead else self.text


@dataclass(frozen=True)
class Plan:
    """How a query will be answered: one part, or several answered separately."""

    parts: tuple[Part, ...]
    compound: bool


_WH = frozenset(
    "what who whom whose where when why which how "
    "qui que quoi comment pourquoi quand où quel quelle quels quelles combien "
    "wer wen wem was wie warum wann wo welche welcher welches wieviel "
    "quién qué cómo cuándo dónde cuál cuáles cuánto cuántos".split()
)
_AUX = frozenset(
    "is are was were am do does did can could would should will shall may might has have had "
    "isn aren wasn weren don doesn didn couldn wouldn shouldn won hasn haven est".split()
)
_VERBS = frozenset(
    "translate compute calculate list classify summarize summarise name give tell write explain "
    "describe define convert solve find count rewrite spell sort multiply divide subtract add "
    "evaluate simplify generate suggest recommend compare identify determine show correct fix "
    "paraphrase say rate label estimate draft compose create outline provide conjugate categorize "
    "categorise analyze analyse check proofread "
    "traduis traduisez traduire calcule calculez écris écrivez explique expliquez donne donnez "
    "übersetze übersetzen berechne berechnen schreibe erkläre nenne gib "
    "traduce traduzca calcula escribe explica dime da".split()
)
# Words that are nouns as often as verbs: after "and" they start a task only with an object.
_NOUN_VERBS = frozenset(
    "name list count sort show check fix find add say rate label estimate draft outline correct "
    "spell order sum da gib".split()
)
_OBJECT_STARTERS = frozenset(
    "me us the a an all some every each this that these those my our his her its their "
    "how what why which who where when if whether".split()
)
_NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve twenty hundred thousand".split()
)
_FILLERS = frozenset(
    "please kindly also then now next and so ok okay finally lastly additionally first firstly "
    "second secondly third thirdly plus et und y puis ensuite aussi dann bitte außerdem luego también".split()
)
_PREFIX_PHRASES: tuple[tuple[str, ...], ...] = (
    ("i'd", "like", "you", "to"),
    ("i", "would", "like", "you", "to"),
    ("i", "want", "you", "to"),
    ("i", "need", "you", "to"),
    ("i'd", "like", "to", "know"),
    ("i", "want", "to", "know"),
    ("help", "me"),
)
# A left side ending like this is unfinished: its "and" joins words, not tasks.
_INCOMPLETE_END = frozenset(
    "how what why when where who which whether the a an of to in into for with from between "
    "and or my your is are both me us".split()
)
# Subjects after a wh-word mark an embedded clause ("tell me who won and what the score was").
_CLAUSE_SUBJECTS = frozenset(
    "the a an this that these those my your his her its our their i you he she we they it people".split()
)
_ARITHMETIC_OPS = frozenset("add subtract multiply divide double halve square cube round increase decrease reduce".split())
_LANGUAGE_RE = re.compile(
    r"\b(?:english|french|german|spanish|italian|portuguese|dutch|russian|chinese|japanese|"
    r"korean|arabic|hindi|polish|turkish|swedish|latin|greek)\b",
    re.IGNORECASE,
)
_ABBREVIATIONS = frozenset("e.g i.e etc vs mr mrs ms dr st no approx fig cf ca u.s".split())

_QUOTE_PATTERNS = (
    re.compile(r"```.*?```", re.DOTALL),
    re.compile(r"`[^`\n]+`"),
    re.compile(r'"[^"]*"'),
    re.compile(r"“[^”]*”"),
    re.compile(r"„[^“”]*[“”]"),
    re.compile(r"«[^»]*»"),
    re.compile(r"‘[^’]*’(?!\w)"),
    # An apostrophe inside a word ("I'm", "dogs'") neither opens nor closes a quote.
    re.compile(r"(?<!\w)'[^'\n]*?'(?!\w)"),
)
_TOKEN_RE = re.compile(r"[\w']+")
_WORD_RE = re.compile(r"\w+")
_LINE_MARKER_RE = re.compile(r"^[ \t]*(?:\d{1,2}[.)]|\(\d{1,2}\)|[-*•+])[ \t]+(?=\S)", re.MULTILINE)
_INLINE_MARKER_RE = re.compile(r"(?:(?<=\s)|(?<=:)|^)(\d{1,2})[.)][ \t]+(?=\S)")
_SENTENCE_END_RE = re.compile(r"(?<=[.?!])[\"'”’)\]]*[ \t]+|[ \t]*\n\s*")
_CONNECTOR_RE = re.compile(
    r"[ \t]*;(?:\s*(?:and|then|also)\b)*[\s,]*|"
    r"(?:,?\s+(?:and|then|also|et|und|y|puis|dann|luego)\b)+[\s,]+",
    re.IGNORECASE,
)
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")
_FRAMING_RE = re.compile(r"\b(?:following|these|below|questions?|tasks?|things|items|answer|help)\b", re.IGNORECASE)
_ANAPHORA_RE = re.compile(
    r"\b(?:it|its|itself|they|them|their|theirs|above|previous(?:ly)?|former|latter|"
    r"the same|the (?:result|answer|output|translation|summary)(?!\s+of\b)|"
    r"your (?:answer|reasoning|work|result|steps)|examples?(?!\s+of\b)|more(?!\s+than\b))\b",
    re.IGNORECASE,
)
# "Give me the capital of Peru and the boiling point of water": one verb, two requests for an attribute of a thing.
_ASK_LEAD_RE = re.compile(r"(?:give|tell|show|find|get)\s+(?:me|us)\s+", re.IGNORECASE)
_ATTRIBUTE_RE = re.compile(r"(?:the|a|an)\s+(?:[\w'-]+\s+){1,3}(?:of|in|for|on)\s+\w", re.IGNORECASE)
_PERSONAL = frozenset("i me my mine we us our ours you your yours".split())
_THAT_RE = re.compile(r"\b(\w+)?\s*\bthat\b", re.IGNORECASE)
_THIS_RE = re.compile(r"\b(?:this|these|those)\b", re.IGNORECASE)
_PREPOSITIONS = frozenset("of about with by on in for to from than and is was does do did".split())


@dataclass(frozen=True)
class _Unit:
    """A sentence or coordinated clause of the query, before grouping into parts."""

    start: int
    end: int
    request: bool
    dependent: bool
    list_item: bool
    quoted: bool  # the unit is one quoted or fenced block


def split_query(text: str, *, max_parts: int = DEFAULT_MAX_PARTS) -> list[Part]:
    """The parts of a compound query, or one part holding the whole text."""
    if max_parts < 1:
        raise ValueError("max_parts must be at least 1")
    whole = [_whole(text)]
    if max_parts == 1 or not text.strip() or len(text) > MAX_SPLIT_CHARS:
        return whole
    masked, quotes = _mask(text)
    leads: dict[int, str] = {}
    units = _units(text, masked, quotes, leads)
    groups = _group(units, masked)
    if len(groups) < 2:
        return whole
    return _parts(text, _cap(groups, max_parts), leads)


def plan(text: str, *, enabled: bool, max_parts: int = DEFAULT_MAX_PARTS) -> Plan:
    """The plan for a query: split when `enabled` and the query is compound."""
    parts = split_query(text, max_parts=max_parts) if enabled else [_whole(text)]
    return Plan(parts=tuple(parts), compound=len(parts) > 1)


def compose_header(part: Part, expert_id: str, node_id: str) -> str:
    """The heading line of one part's answer: its number, its text, who answered it."""
    return f"**{part.index + 1}. {_heading(part.text)}** — *{_short_expert(expert_id)} on node {_short_node(node_id)}*"


def compose(parts_answers: Sequence[tuple[Part, str, str, str]]) -> str:
    """One answer from (part, answer, expert id, node id) tuples, in part order."""
    blocks = []
    for part, answer, expert_id, node_id in sorted(parts_answers, key=lambda item: item[0].index):
        body = answer.strip() or "*(no answer)*"
        blocks.append(f"{compose_header(part, expert_id, node_id)}\n{body}")
    return PART_SEPARATOR.join(blocks)


def proposal_prompt(text: str) -> str:
    """A prompt asking an instruct expert to list the independent requests of a message."""
    return (
        "Split the message below into its independent requests, one per line, numbered "
        '"1.", "2.", and so on. Copy each request in the message\'s own words; do not answer, '
        "rephrase or add anything. If the message is a single request, reply with one line: "
        '"1." followed by the whole message.\n\n'
        f"Message:\n{text}"
    )


def parse_proposal(reply: str, text: str, *, max_parts: int = DEFAULT_MAX_PARTS) -> list[Part] | None:
    """Parts from an expert's proposed split, or None when the proposal is not faithful to `text`."""
    if max_parts < 1:
        raise ValueError("max_parts must be at least 1")
    items = [m.group(1).strip() for m in re.finditer(r"^\s*(?:\d{1,2}[.)]|[-*•])\s+(.+?)\s*$", reply, re.MULTILINE)]
    items = [item.strip("\"'“”‘’`") for item in items if item]
    if not items:
        return None
    original = _normal_words(text)
    if not original:
        return None
    if len(items) == 1:
        return [_whole(text)] if _faithful(items[0], set(original)) else None
    groups: list[tuple[int, int]] = []
    cursor = 0
    covered: set[str] = set()
    for item in items:
        if not _faithful(item, set(original)):
            return None
        span = _locate(item, text, cursor)
        if span is None:
            return None
        groups.append(span)
        covered.update(_normal_words(item))
        cursor = span[1]
    if len(covered & set(original)) < PROPOSAL_MIN_COVERAGE * len(set(original)):
        return None
    return _parts(text, _cap(groups, max_parts))


def _whole(text: str) -> Part:
    """The whole query as its only part."""
    return Part(index=0, text=text, task=detect_task(text).value, span=(0, len(text)))


def _parts(text: str, groups: Sequence[tuple[int, int]], leads: dict[int, str] | None = None) -> list[Part]:
    """Parts from their spans in `text`, each with the lead it shares with the part before, if any."""
    parts = []
    for index, (start, end) in enumerate(groups):
        part_text = text[start:end]
        lead = (leads or {}).get(start, "")
        task = detect_task(lead + part_text).value
        parts.append(Part(index=index, text=part_text, task=task, span=(start, end), lead=lead))
    return parts


def _cap(groups: Sequence[tuple[int, int]], max_parts: int) -> list[tuple[int, int]]:
    """At most `max_parts` spans: the tail merged into the last."""
    if len(groups) <= max_parts:
        return list(groups)
    head = list(groups[: max_parts - 1])
    return [*head, (groups[max_parts - 1][0], groups[-1][1])]


def _mask(text: str) -> tuple[str, list[tuple[int, int]]]:
    """`text` with quoted content blanked to `x` (same length, so offsets hold), and the quoted spans."""
    masked = text
    spans: list[tuple[int, int]] = []
    for pattern in _QUOTE_PATTERNS:
        chars = list(masked)
        for m in pattern.finditer(masked):
            spans.append((m.start(), m.end()))
            # Spaces and newlines too: no connector, sentence end or list marker inside quotes.
            chars[m.start() + 1 : m.end() - 1] = "x" * (m.end() - m.start() - 2)
        masked = "".join(chars)
    return masked, sorted(spans)


def _units(text: str, masked: str, quotes: list[tuple[int, int]], leads: dict[int, str]) -> list[_Unit]:
    """Sentences and coordinated clauses of the query, classified; `leads` gets the shared lead of a clause by start."""
    units = []
    for seg_start, seg_end, list_item in _segments(masked):
        for sent_start, sent_end in _sentences(masked, seg_start, seg_end):
            for start, end in _clauses(text, masked, quotes, sent_start, sent_end, leads):
                span = _trim(masked, start, end)
                if span is None:
                    continue
                unit_masked = masked[span[0] : span[1]]
                led = span[0] in leads
                units.append(
                    _Unit(
                        start=span[0],
                        end=span[1],
                        request=led or _is_request(unit_masked),
                        dependent=not led and _is_dependent(text, unit_masked, span, quotes, list_item=list_item),
                        list_item=list_item,
                        quoted=any(q_start == span[0] and q_end >= span[1] - 1 for q_start, q_end in quotes),
                    )
                )
    return units


def _segments(masked: str) -> list[tuple[int, int, bool]]:
    """List items (content after the marker) and the text before them; the whole text when no list."""
    markers = [(m.start(), m.end()) for m in _LINE_MARKER_RE.finditer(masked)]
    if len(markers) < 2:
        markers = _inline_markers(masked)
    if len(markers) < 2:
        return [(0, len(masked), False)]
    segments = [(0, markers[0][0], False)] if masked[: markers[0][0]].strip() else []
    for i, (_, content_start) in enumerate(markers):
        end = markers[i + 1][0] if i + 1 < len(markers) else len(masked)
        segments.append((content_start, end, True))
    return segments


def _inline_markers(masked: str) -> list[tuple[int, int]]:
    """Markers "1." "2." ... numbered in sequence within running text."""
    found = []
    expected = 1
    for m in _INLINE_MARKER_RE.finditer(masked):
        if int(m.group(1)) == expected:
            found.append((m.start(), m.end()))
            expected += 1
    return found


def _sentences(masked: str, start: int, end: int) -> list[tuple[int, int]]:
    """Sentence spans between `start` and `end`."""
    spans = []
    cursor = start
    for m in _SENTENCE_END_RE.finditer(masked, start, end):
        if "\n" not in m.group() and _is_abbreviation(masked, m.start()):
            continue
        spans.append((cursor, m.start()))
        cursor = m.end()
    spans.append((cursor, end))
    return spans


def _is_abbreviation(masked: str, dot_end: int) -> bool:
    """Whether the period ending at `dot_end` closes an abbreviation or an initial, not a sentence."""
    if masked[dot_end - 1] != ".":
        return False
    word = re.search(r"([\w.]+)\.$", masked[max(0, dot_end - 12) : dot_end])
    if word is None:
        return False
    token = word.group(1).lower()
    return token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha() and token != "i")


def _clauses(
    text: str, masked: str, quotes: list[tuple[int, int]], start: int, end: int, leads: dict[int, str]
) -> list[tuple[int, int]]:
    """A sentence cut where "and", "then", "also" or ";" join two complete requests (or two asked-for attributes)."""
    spans = []
    chunk_start = start
    for m in _CONNECTOR_RE.finditer(masked, start, end):
        if m.start() < chunk_start:
            continue
        left = masked[chunk_start : m.start()]
        right_start = m.end()
        lead = _shared_lead(text, masked, chunk_start, m.start(), right_start, end)
        if lead is not None:
            leads[right_start] = lead
        if lead is not None or (_is_complete_request(left) and _starts_coordinated_task(text, masked, right_start, end, quotes)):
            spans.append((chunk_start, m.start()))
            chunk_start = right_start
    spans.append((chunk_start, end))
    return spans


def _shared_lead(text: str, masked: str, left_start: int, left_end: int, right_start: int, end: int) -> str | None:
    """ "Give me " when "give me the A of X and the B of Y" asks for two things with one verb; else None."""
    left = masked[left_start:left_end]
    offset = len(left) - len(left.lstrip())
    tokens = _tokens(left)
    core_offset = _core_offset(left.lstrip()) if _core(tokens) else 0
    lead = _ASK_LEAD_RE.match(left, offset + core_offset)
    if lead is None:
        return None
    right = masked[right_start:end]
    if not (_ATTRIBUTE_RE.match(left, lead.end()) and _ATTRIBUTE_RE.match(right)):
        return None
    if _ANAPHORA_RE.search(right) or _refers_with_that(right):
        return None
    return text[left_start + lead.start() : left_start + lead.end()]


def _trim(masked: str, start: int, end: int) -> tuple[int, int] | None:
    """The span without surrounding whitespace and joining punctuation; None when nothing is left."""
    while start < end and (masked[start].isspace() or masked[start] in ",;"):
        start += 1
    while end > start and (masked[end - 1].isspace() or masked[end - 1] in ",;"):
        end -= 1
    if not _WORD_RE.search(masked[start:end]):
        return None
    return start, end


def _tokens(unit: str) -> list[str]:
    """Lowercase word tokens, apostrophes kept ("what's", "i'd")."""
    return [t.strip("'") for t in _TOKEN_RE.findall(unit.lower()) if t.strip("'")]


def _core(tokens: list[str]) -> list[str]:
    """Tokens without leading fillers ("please", "also") and polite prefixes ("I'd like you to")."""
    changed = True
    while changed and tokens:
        changed = False
        while tokens and tokens[0] in _FILLERS:
            tokens = tokens[1:]
            changed = True
        for phrase in _PREFIX_PHRASES:
            if tuple(tokens[: len(phrase)]) == phrase:
                tokens = tokens[len(phrase) :]
                changed = True
    return tokens


def _head(token: str) -> str:
    """A token before its apostrophe ("what's" -> "what")."""
    return token.split("'", 1)[0]


def _is_request(unit: str) -> bool:
    """Whether a unit asks for something: a question, or starts with a task verb."""
    tokens = _core(_tokens(unit))
    if not tokens:
        return False
    first = _head(tokens[0])
    if unit.rstrip().endswith("?") or first in _VERBS:
        return True
    if first in _WH:
        # "What a nice day." exclaims.
        return not (len(tokens) > 1 and tokens[1] in ("a", "an"))
    return _is_aux_question(unit, tokens)


def _is_aux_question(unit: str, tokens: list[str]) -> bool:
    """Whether tokens open a yes/no question: an auxiliary, then its subject ("can you", "is Paris")."""
    if len(tokens) < 2 or _head(tokens[0]) not in _AUX:
        return False
    if unit.rstrip().endswith("?"):
        return True
    # "Have a nice day." and "Do two things:" are imperatives of no task.
    if tokens[0] in ("have", "has", "had"):
        return False
    if tokens[0] in ("do", "does", "did"):
        return tokens[1] in _CLAUSE_SUBJECTS
    second = next((w for w in _TOKEN_RE.findall(unit) if w.strip("'").lower() == tokens[1]), "")
    return tokens[1] in _CLAUSE_SUBJECTS or second[:1].isupper() or second[:1].isdigit()


def _is_complete_request(left: str) -> bool:
    """Whether the text left of a connector is a whole request on its own."""
    tokens = _core(_tokens(left))
    if len(tokens) < 2 or not _is_request(left):
        return False
    if tokens[-1] in _INCOMPLETE_END:
        return False
    # "between X and Y", "both X and Y": the "and" is the left side's own.
    return not any(t in ("between", "both") for t in tokens)


def _starts_coordinated_task(text: str, masked: str, start: int, end: int, quotes: list[tuple[int, int]]) -> bool:
    """Whether the text right of a connector starts a new request (a task verb with an object, or a question)."""
    right = masked[start:end]
    tokens = _core(_tokens(right))
    if len(tokens) < 2:
        return False
    first, second = _head(tokens[0]), tokens[1]
    if first in _WH:
        return second not in _CLAUSE_SUBJECTS and second != "to"
    if first in _AUX:
        return _is_aux_question(right, tokens)
    if first not in _VERBS:
        return False
    if first in _NOUN_VERBS and not _is_object_start(second):
        return False
    return _is_anchored(text, start + _core_offset(right), end, quotes)


def _is_object_start(token: str) -> bool:
    """Whether a token can begin the object of a task verb (`x...` is quoted text, blanked by `_mask`)."""
    return token in _OBJECT_STARTERS or token in _NUMBER_WORDS or token[:1].isdigit() or token.startswith("x")


def _is_anchored(text: str, start: int, end: int, quotes: list[tuple[int, int]]) -> bool:
    """Whether a request names its own material (quote, number, language, proper noun, colon), so it stands alone."""
    segment = text[start:end]
    if any(start <= q_start < end for q_start, _ in quotes):
        return True
    if re.search(r"\d", segment) or _LANGUAGE_RE.search(segment) or re.search(r":\s*\S", segment):
        return True
    words = _WORD_RE.findall(segment)
    if any(w.lower() in _NUMBER_WORDS for w in words):
        return True
    return any(w[:1].isupper() and w != "I" for w in words[1:])


def _is_dependent(text: str, unit: str, span: tuple[int, int], quotes: list[tuple[int, int]], *, list_item: bool) -> bool:
    """Whether a unit leans on what came before: a pronoun, an operation on a result, nothing of its own."""
    if _ANAPHORA_RE.search(unit) or _refers_with_that(unit):
        return True
    if _THIS_RE.search(unit) and ":" not in unit and not any(span[0] <= q < span[1] for q, _ in quotes):
        return True
    tokens = _core(_tokens(unit))
    if len(tokens) < 2:
        return True
    if _head(tokens[0]) in _ARITHMETIC_OPS and len(re.findall(r"\d+", unit)) < 2:
        return True
    if _is_self_contained_question(unit, tokens):
        return False
    # Numbering says the user meant separate items; elsewhere a part must name its own material
    # ("Should I call a vet?" after "My dog is sick. What should I do?" does not).
    return not list_item and not _is_anchored(text, span[0] + _core_offset(unit), span[1], quotes)


def _is_self_contained_question(unit: str, tokens: list[str]) -> bool:
    """A wh-question about a thing it names ("How many legs does a spider have?"), with no one's situation in it."""
    if not unit.rstrip().endswith("?") or _head(tokens[0]) not in _WH or len(tokens) < 3:
        return False
    if any(_head(t) in _PERSONAL for t in tokens) or tokens[1] in ("about", "else", "if"):
        return False
    if tokens[1] in ("many", "much"):
        # "how many does an ant have?" leaves out what it counts: it leans on the question before.
        return tokens[2] not in _AUX
    return _head(tokens[0]) != tokens[0] or tokens[1] in _AUX or any(t in ("the", "a", "an") for t in tokens[1:])


def _core_offset(unit: str) -> int:
    """Where a unit's first non-filler token starts."""
    n_skipped = len(_tokens(unit)) - len(_core(_tokens(unit)))
    matches = [m for m in _TOKEN_RE.finditer(unit) if m.group().strip("'")]
    return matches[n_skipped].start() if n_skipped < len(matches) else 0


def _refers_with_that(unit: str) -> bool:
    """Whether "that" points back (a demonstrative), not a relative clause ("the river that flows")."""
    for m in _THAT_RE.finditer(unit):
        before = (m.group(1) or "").lower()
        if not before or before in _PREPOSITIONS or before in _VERBS or before in _AUX or before in _WH:
            return True
    return False


def _group(units: Sequence[_Unit], masked: str) -> list[tuple[int, int]]:
    """Units gathered into part spans: context joins a request, dependent requests join the one before."""
    groups: list[list[int]] = []
    pending: int | None = None  # start of context waiting for the next request
    previous: _Unit | None = None
    material = False  # inside what a colon introduced: the text a task works on
    for unit in units:
        if previous is not None and (_PARAGRAPH_RE.search(masked, previous.end, unit.start) or unit.list_item):
            material = False
        if unit.request and not (groups and (unit.dependent or material)):
            if pending is not None and unit.list_item and _is_framing(masked, pending, previous):
                pending = None
            groups.append([unit.start if pending is None else pending, unit.end])
            pending = None
        elif groups and (unit.request or unit.dependent or unit.list_item or material):
            # It leans back, so it and any context before it join the last part.
            groups[-1][1] = unit.end
            pending = None
        elif pending is None:
            pending = unit.start
        material = (material or masked[unit.end - 1] == ":") and not unit.quoted
        previous = unit
    if pending is not None and groups and previous is not None:
        groups[-1][1] = previous.end
    return [(start, end) for start, end in groups]


def _is_framing(masked: str, start: int, previous: _Unit | None) -> bool:
    """Whether pending context is a list's framing line ("Answer these questions:"), left out of the parts."""
    if previous is None:
        return False
    intro = masked[start : previous.end]
    return intro.rstrip().endswith(":") and bool(_FRAMING_RE.search(intro))


def _normal_words(text: str) -> list[str]:
    """Lowercase words, for comparing a proposal with the original."""
    return _WORD_RE.findall(text.lower())


def _faithful(item: str, original: set[str]) -> bool:
    """Whether a proposed part is mostly the original's own words."""
    words = _normal_words(item)
    if not words:
        return False
    return sum(1 for w in words if w in original) >= PROPOSAL_MIN_FAITHFUL * len(words)


def _locate(item: str, text: str, cursor: int) -> tuple[int, int] | None:
    """The span of a proposed part in `text`, at or after `cursor`: verbatim, else from its first to its last word."""
    needle = item.rstrip(" .?!").strip()
    found = text.lower().find(needle.lower(), cursor)
    if needle and found >= 0:
        return _extend_punctuation(text, found, found + len(needle))
    words = [m for m in _WORD_RE.finditer(text.lower()) if m.start() >= cursor]
    item_words = [w for w in _normal_words(item) if any(m.group() == w for m in words)]
    if not item_words:
        return None
    first = next(m for m in words if m.group() == item_words[0])
    last = next((m for m in words if m.start() >= first.start() and m.group() == item_words[-1]), None)
    if last is None:
        return None
    return _extend_punctuation(text, first.start(), last.end())


def _extend_punctuation(text: str, start: int, end: int) -> tuple[int, int]:
    """A span grown over the sentence punctuation and closing quotes right after it."""
    while end < len(text) and text[end] in "?!.\"'”’":
        end += 1
    return start, end


def _heading(text: str) -> str:
    """A part's text as a one-line markdown heading, capitalized and cut to `HEADING_MAX_CHARS`."""
    line = " ".join(text.split())
    line = _LINE_MARKER_RE.sub("", line, count=1)
    if len(line) > HEADING_MAX_CHARS:
        cut = line[: HEADING_MAX_CHARS - 1]
        if " " in cut[HEADING_MAX_CHARS // 2 :]:
            cut = cut[: cut.rfind(" ")]
        line = cut.rstrip(" ,;:") + "…"
    line = line[:1].upper() + line[1:]
    return re.sub(r"([\\*_`\[\]])", r"\\\1", line)


def _short_expert(expert_id: str) -> str:
    """An expert id with its hash cut to 4 hex digits ("gemma3-270m@a5fd…")."""
    name, at, digest = expert_id.rpartition("@")
    if not at or len(digest) <= 6:
        return expert_id
    return f"{name}@{digest[:4]}…"


def _short_node(node_id: str) -> str:
    """A node id cut to 8 characters, as the web UI shows it."""
    return node_id[:8] + "…" if len(node_id) > 10 else node_id
