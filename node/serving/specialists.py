"""Specialists: an expert defined as a base model plus how to use it, read from a TOML file, with a stable id."""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.errors import InvalidRequest, NodeError
from node.serving.structured import GrammarError, check_grammar, schema_grammar

MAX_DEFINITION_BYTES = 64 * 1024  # a definition is a prompt and a few settings, never weights or code
DEFINITION_SUFFIX = ".toml"
EXPERTS_DIRNAME = "experts"  # the data dir's folder of definitions served at start
SHIPPED_PACKAGE = "node.serving.specialists_shipped"
ID_DIGEST_CHARS = 12
_DIGEST_DOMAIN = b"expertmesh-specialist-v1\0"  # keeps a specialist digest apart from any file's sha256
_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class DefinitionError(InvalidRequest):
    """A specialist definition that cannot be read or is invalid; the message names the field."""

    code = "invalid_expert_definition"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Example(_Strict):
    """One few-shot turn pair shown to the model before the real question."""

    user: Annotated[str, Field(min_length=1, max_length=4000)]
    assistant: Annotated[str, Field(min_length=1, max_length=4000)]


class Sampling(_Strict):
    """How the specialist samples; part of what it is, so a request cannot change it."""

    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=4)] = []
    max_tokens: Annotated[int, Field(ge=1, le=4096)] = 256

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _int_is_a_number(cls, value: Any) -> Any:
        # TOML writes `temperature = 0` as an integer; a number is what is meant.
        return float(value) if type(value) is int else value


class Definition(_Strict):
    """A specialist: a base model, a prompt style, a system prompt, examples, sampling, optional constraint."""

    format: Literal[1] = 1  # the definition format's own version
    name: Annotated[str, Field(pattern=_NAME_PATTERN)]
    version: Annotated[str, Field(min_length=1, max_length=32)]
    author: Annotated[str, Field(min_length=1, max_length=128)]
    description: Annotated[str, Field(min_length=1, max_length=1000)]
    base: Annotated[str, Field(min_length=1, max_length=300)]  # catalog name, .gguf path or hf: spec
    prompt_style: Literal["chat", "completion"] = "chat"
    system: Annotated[str, Field(max_length=8000)] = ""
    examples: Annotated[list[Example], Field(max_length=32)] = []
    sampling: Sampling = Sampling()
    grammar: Annotated[str, Field(min_length=1, max_length=16000)] | None = None  # llama.cpp GBNF
    json_schema: Annotated[str, Field(min_length=2, max_length=16000)] | None = None  # JSON text of a schema

    @field_validator("grammar")
    @classmethod
    def _grammar_parses(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_grammar(value)
            except GrammarError as exc:
                raise ValueError(exc.message) from exc
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                schema = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from exc
            try:
                schema_grammar(schema)
            except GrammarError as exc:
                raise ValueError(exc.message) from exc
        return value

    @model_validator(mode="after")
    def _one_constraint(self) -> Definition:
        if self.grammar is not None and self.json_schema is not None:
            raise ValueError("give at most one of 'grammar' and 'json_schema'")
        return self

    def constraint_grammar(self) -> str | None:
        """The GBNF that constrains every answer, from `grammar` or `json_schema`; None when free."""
        if self.grammar is not None:
            return self.grammar
        if self.json_schema is not None:
            return schema_grammar(json.loads(self.json_schema))
        return None


def _field_path(error: Mapping[str, Any]) -> str:
    return ".".join(str(part) for part in error["loc"]) or "definition"


def parse_definition(data: Any, source: str) -> Definition:
    """Validate decoded definition data; DefinitionError naming `source` and the first bad field."""
    if not isinstance(data, dict):
        raise DefinitionError(f"{source}: a definition must be a table of fields")
    try:
        return Definition.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelt key also makes its real name "missing": the typo is the useful thing to name.
        error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        field = _field_path(error)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (a typo?)"
        raise DefinitionError(f"{source}: field {field!r}: {message}", param=field) from exc


def parse_toml(text: str, source: str) -> Definition:
    """A definition from TOML text."""
    if len(text.encode("utf-8")) > MAX_DEFINITION_BYTES:
        raise DefinitionError(f"{source}: a definition may be at most {MAX_DEFINITION_BYTES} bytes")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DefinitionError(f"{source}: not valid TOML: {exc}") from exc
    return parse_definition(data, source)


def load_definition(path: Path) -> Definition:
    """A definition from a TOML file."""
    try:
        size = path.stat().st_size
        if size > MAX_DEFINITION_BYTES:
            raise DefinitionError(f"{path}: a definition may be at most {MAX_DEFINITION_BYTES} bytes, got {size}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DefinitionError(f"expert definition not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionError(f"{path}: cannot read: {exc}") from exc
    return parse_toml(text, str(path))


# ---- identity ---------------------------------------------------------------------------


def canonical_bytes(definition: Definition) -> bytes:
    """The definition as canonical JSON, every default filled in and `base` left out (its sha256 stands for it)."""
    data = definition.model_dump(mode="json", exclude={"base"})
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def definition_digest(definition: Definition) -> str:
    """sha256 of the canonical definition: equal for siblings' identical prompts, whatever the base."""
    return hashlib.sha256(canonical_bytes(definition)).hexdigest()


def expert_digest(definition: Definition, base_sha256: str) -> str:
    """sha256 over the base model's sha256 and the canonical definition: what judges' cards are about."""
    return hashlib.sha256(_DIGEST_DOMAIN + base_sha256.encode("ascii") + b"\0" + canonical_bytes(definition)).hexdigest()


def specialist_id(definition: Definition, base_sha256: str) -> str:
    """`name@<12 hex>`: the same on every node serving this definition on this base; new when either changes."""
    return f"{definition.name}@{expert_digest(definition, base_sha256)[:ID_DIGEST_CHARS]}"


# ---- where definitions come from ---------------------------------------------------------


def shipped_definitions() -> dict[str, str]:
    """The specialists shipped in the package: name -> TOML text."""
    folder = resources.files(SHIPPED_PACKAGE)
    return {
        entry.name.removesuffix(DEFINITION_SUFFIX): entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(DEFINITION_SUFFIX)
    }


def resolve_definition(name_or_path: str) -> tuple[Definition, str]:
    """A definition by file path, or by the name of a shipped specialist; with where it came from."""
    path = Path(name_or_path).expanduser()
    if path.suffix == DEFINITION_SUFFIX or path.exists():
        return load_definition(path), str(path)
    shipped = shipped_definitions()
    if name_or_path in shipped:
        return parse_toml(shipped[name_or_path], f"shipped:{name_or_path}"), f"shipped:{name_or_path}"
    raise DefinitionError(
        f"expert {name_or_path!r} is neither a .toml file nor a shipped specialist ({', '.join(shipped)})",
        param="expert",
    )


def folder_definitions(data_dir: Path) -> list[tuple[Definition, str]]:
    """Every definition in `<data_dir>/experts/`, in name order."""
    folder = data_dir / EXPERTS_DIRNAME
    if not folder.is_dir():
        return []
    return [(load_definition(p), str(p)) for p in sorted(folder.glob(f"*{DEFINITION_SUFFIX}"))]


# ---- writing -----------------------------------------------------------------------------


def _toml_string(value: str) -> str:
    # JSON string escapes are TOML basic-string escapes, except that TOML also forbids a raw DEL.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(definition: Definition) -> str:
    """The definition as TOML text that reads back to an equal definition."""
    data = definition.model_dump(mode="json", exclude_none=True)
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if key not in ("sampling", "examples")]
    lines += ["", "[sampling]"] + [f"{k} = {_toml_value(v)}" for k, v in data["sampling"].items()]
    for example in data["examples"]:
        lines += ["", "[[examples]]"] + [f"{k} = {_toml_value(v)}" for k, v in example.items()]
    return "\n".join(lines) + "\n"


def _known_base_sha256(base: str, models_dir: Path) -> str | None:
    """The base's sha256 when it can be known without downloading: a catalog name, a pulled or local file."""
    from node.serving import catalog

    entry = catalog.CATALOG.get(base)
    if entry is not None and entry.sha256:
        return entry.sha256
    path = Path(base).expanduser()
    if path.is_file():
        try:
            return catalog.resolve(str(path), models_dir, progress=False).sha256
        except NodeError:  # a listing shows "?" for a base it cannot read
            return None
    return next((m.sha256 for m in catalog.list_models(models_dir) if m.name == base), None)


def describe_definitions(files: list[Path], data_dir: Path, models_dir: Path) -> list[dict[str, str]]:
    """One row per known definition (shipped, the data dir's folder, given files), with its expert id when knowable."""
    found: list[tuple[Definition, str]] = [
        (parse_toml(text, f"shipped:{name}"), f"shipped:{name}") for name, text in shipped_definitions().items()
    ]
    found += folder_definitions(data_dir)
    found += [(load_definition(f), str(f)) for f in files]
    rows = []
    for definition, source in found:
        sha256 = _known_base_sha256(definition.base, models_dir)
        rows.append(
            {
                "id": specialist_id(definition, sha256) if sha256 else f"{definition.name}@?",
                "name": definition.name,
                "version": definition.version,
                "base": definition.base,
                "prompt_style": definition.prompt_style,
                "source": source,
                "description": definition.description,
            }
        )
    return rows
