"""A checker for llama.cpp GBNF grammars, so a bad grammar is a clear error here and never a crash in llama.cpp.

llama-cpp-python hands grammar text to llama.cpp unparsed, and llama.cpp answers a grammar it cannot parse
(or one with left recursion) with a null sampler. This module follows llama.cpp's grammar parser
(`src/llama-grammar.cpp`): rules `name ::= alternatives` one per line, literals, character classes, `.`,
groups, rule references and the repetitions `* + ? {m} {m,} {m,n}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_REPETITION = 1000  # llama.cpp expands {m,n} into copies: a bound keeps a grammar small
_ESCAPES = {"n", "r", "t", "\\", '"', "[", "]", "-", "^", "/"}
_HEX_LENGTHS = {"x": 2, "u": 4, "U": 8}


class GbnfError(ValueError):
    """A grammar llama.cpp would refuse."""


@dataclass
class _Element:
    kind: str  # "literal", "class", "any", "ref", "group"
    ref: str = ""
    empty: bool = False  # a literal "" matches nothing
    group: list[list[_Element]] = field(default_factory=list)
    min_count: int = 1


def _is_word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "-")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.rules: dict[str, list[list[_Element]]] = {}
        self.refs: set[str] = set()

    def fail(self, message: str) -> GbnfError:
        line = self.text.count("\n", 0, self.pos) + 1
        column = self.pos - (self.text.rfind("\n", 0, self.pos) + 1) + 1
        return GbnfError(f"{message} at line {line}, column {column}")

    def peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def space(self, newline_ok: bool) -> None:
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in " \t" or (newline_ok and c in "\r\n"):
                self.pos += 1
            elif c == "#":
                while self.pos < len(self.text) and self.text[self.pos] not in "\r\n":
                    self.pos += 1
            else:
                break

    def name(self) -> str:
        start = self.pos
        while _is_word(self.peek()):
            self.pos += 1
        if self.pos == start:
            raise self.fail("expected a rule name")
        return self.text[start : self.pos]

    def char(self) -> None:
        """One literal or class character, escapes included."""
        c = self.peek()
        if not c:
            raise self.fail("unexpected end of grammar")
        if c != "\\":
            self.pos += 1
            return
        e = self.peek(1)
        if e in _HEX_LENGTHS:
            digits = self.text[self.pos + 2 : self.pos + 2 + _HEX_LENGTHS[e]]
            if len(digits) != _HEX_LENGTHS[e] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"bad \\{e} escape")
            self.pos += 2 + _HEX_LENGTHS[e]
        elif e in _ESCAPES:
            self.pos += 2
        else:
            raise self.fail(f"unknown escape \\{e}")

    def grammar(self) -> dict[str, list[list[_Element]]]:
        self.space(True)
        while self.pos < len(self.text):
            rule = self.name()
            self.space(False)
            if self.text[self.pos : self.pos + 3] != "::=":
                raise self.fail(f"expected ::= after rule name {rule!r}")
            self.pos += 3
            self.space(True)
            alternatives = self.alternatives(nested=False)
            if rule in self.rules:
                raise self.fail(f"rule {rule!r} is defined twice")
            self.rules[rule] = alternatives
            if self.peek() == "\r":
                self.pos += 1
            if self.peek() == "\n":
                self.pos += 1
            elif self.pos < len(self.text):
                raise self.fail("expected a newline or the end after a rule")
            self.space(True)
        return self.rules

    def alternatives(self, nested: bool) -> list[list[_Element]]:
        alternatives = [self.sequence(nested)]
        while self.peek() == "|":
            self.pos += 1
            self.space(True)
            alternatives.append(self.sequence(nested))
        return alternatives

    def sequence(self, nested: bool) -> list[_Element]:
        elements: list[_Element] = []
        while self.pos < len(self.text):
            c = self.peek()
            if c == '"':
                self.pos += 1
                start = self.pos
                while self.peek() != '"':
                    self.char()
                empty = self.pos == start
                self.pos += 1
                elements.append(_Element("literal", empty=empty))
            elif c == "[":
                self.pos += 1
                if self.peek() == "^":
                    self.pos += 1
                if self.peek() == "]":
                    raise self.fail("empty character class")
                while self.peek() != "]":
                    self.char()
                    if self.peek() == "-" and self.peek(1) not in ("]", ""):
                        self.pos += 1
                        self.char()
                self.pos += 1
                elements.append(_Element("class"))
            elif c == ".":
                self.pos += 1
                elements.append(_Element("any"))
            elif _is_word(c):
                ref = self.name()
                self.refs.add(ref)
                elements.append(_Element("ref", ref=ref))
            elif c == "(":
                self.pos += 1
                self.space(True)
                group = self.alternatives(nested=True)
                if self.peek() != ")":
                    raise self.fail("expected )")
                self.pos += 1
                elements.append(_Element("group", group=group))
            elif c in "*+?":
                if not elements:
                    raise self.fail(f"{c} with nothing before it")
                self.pos += 1
                elements[-1] = _repeat(elements[-1], 0 if c in "*?" else 1)
            elif c == "{":
                if not elements:
                    raise self.fail("{ with nothing before it")
                elements[-1] = _repeat(elements[-1], self.bounds())
            else:
                break
            self.space(nested)
        return elements

    def bounds(self) -> int:
        """`{m}`, `{m,}` or `{m,n}`; the minimum count."""
        self.pos += 1
        self.space(False)
        low = self.integer()
        self.space(False)
        high: int | None = low
        if self.peek() == ",":
            self.pos += 1
            self.space(False)
            high = self.integer() if self.peek().isdigit() else None
            self.space(False)
        if self.peek() != "}":
            raise self.fail("expected }")
        self.pos += 1
        if high is not None and high < low:
            raise self.fail("repetition maximum below its minimum")
        if max(low, high or 0) > MAX_REPETITION:
            raise self.fail(f"repetition over {MAX_REPETITION}")
        return low

    def integer(self) -> int:
        start = self.pos
        while self.peek().isascii() and self.peek().isdigit():
            self.pos += 1
        if self.pos == start:
            raise self.fail("expected a number")
        return int(self.text[start : self.pos])


def _repeat(element: _Element, min_count: int) -> _Element:
    # A repeated element is a group of its own, as llama.cpp rewrites it.
    return _Element("group", group=[[element]], min_count=min_count)


def _element_nullable(e: _Element, nullable: set[str]) -> bool:
    """Whether an element can match the empty string, given the rules known to."""
    if e.min_count == 0:
        return True
    if e.kind == "literal":
        return e.empty
    if e.kind == "ref":
        return e.ref in nullable
    if e.kind == "group":
        return any(all(_element_nullable(x, nullable) for x in alt) for alt in e.group)
    return False


def _nullable_rules(rules: dict[str, list[list[_Element]]]) -> set[str]:
    """Rules that can match the empty string (a fixed point)."""
    nullable: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, alternatives in rules.items():
            if name not in nullable and any(all(_element_nullable(e, nullable) for e in alt) for alt in alternatives):
                nullable.add(name)
                changed = True
    return nullable


def _left_refs(alternatives: list[list[_Element]], nullable: set[str]) -> set[str]:
    """Rules an alternative can reach before consuming anything."""
    found: set[str] = set()
    for alt in alternatives:
        for e in alt:
            if e.kind == "ref":
                found.add(e.ref)
            elif e.kind == "group":
                found |= _left_refs(e.group, nullable)
            if not _element_nullable(e, nullable):
                break
    return found


def check_gbnf(text: str, root: str = "root") -> None:
    """GbnfError naming the problem unless llama.cpp can parse `text` and use it from `root`."""
    parser = _Parser(text)
    rules = parser.grammar()
    if root not in rules:
        raise GbnfError(f"the grammar has no {root!r} rule")
    missing = sorted(parser.refs - set(rules))
    if missing:
        raise GbnfError(f"undefined rule {missing[0]!r}")
    nullable = _nullable_rules(rules)
    left = {name: _left_refs(alternatives, nullable) for name, alternatives in rules.items()}
    # llama.cpp refuses left recursion (a rule that can reach itself before consuming input).
    for start in rules:
        seen: set[str] = set()
        stack = list(left[start])
        while stack:
            name = stack.pop()
            if name == start:
                raise GbnfError(f"left recursion in rule {start!r}")
            if name not in seen:
                seen.add(name)
                stack.extend(left.get(name, ()))
