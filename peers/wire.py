"""Versioned msgpack messages between peers: encode, decode, size caps, validation.

Messages are plain frozen dataclasses whose field types carry their bounds; pydantic validates a decoded map
against them. `scripts/bench_wire.py` measured pydantic 2.5-7x faster than the former hand-written validator
and msgspec 10-100x; pydantic was chosen as the node's one validation library (user API, settings, wire),
since both cost far less than a generated token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar
from urllib.parse import urlsplit

import msgpack
from pydantic import (
    AfterValidator,
    AllowInfNan,
    Field,
    GetCoreSchemaHandler,
    Strict,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import PydanticCustomError, core_schema

from peers.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NodeId,
    NodeIdentity,
    node_id_from_public_key,
    verify_signature,
)

PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/msgpack"
MAX_HOPS = 1
CARD_DIGEST_CHARS = 16
# An encoded, signed learning summary (peers/learning.py) riding in a hello is at most this big.
MAX_LEARNING_BYTES = 16 << 10
MAX_DEFINITION_BYTES = 64 << 10
MAX_RESPONSE_FORMAT_CHARS = 20000

_ERROR_ECHO_CHARS = 40


class WireError(Exception):
    """A message that cannot be accepted; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status = status
        self.field = field


# ---- field types --------------------------------------------------------------------
# Every bound lives in a field's type (pydantic `Annotated` metadata) and is checked by pydantic when a message
# is decoded; building a record in code does not validate, so a sender is never stopped by the receiver's rules.


def _http_url(value: str) -> str:
    """`value` when it is an absolute http(s) URL; ValueError naming the problem otherwise."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError on a malformed port
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http(s) URL with a host")
    return value


@dataclass(frozen=True)
class Items:
    """Length bounds of a sequence, checked before its items: an over-long array is refused unread."""

    max_len: int
    min_len: int = 0

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(self._check, handler(source))

    def _check(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if len(value) > self.max_len:
                raise PydanticCustomError("too_long", f"at most {self.max_len} items allowed, got {len(value)}")
            if len(value) < self.min_len:
                raise PydanticCustomError("too_short", f"at least {self.min_len} items required, got {len(value)}")
        return value


# Decoded input is held to exact types: no bool for an int, no str for bytes, no NaN; an int is a valid float.
Str = Annotated[str, Strict()]
Bytes = Annotated[bytes, Strict()]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Id = Annotated[Str, Field(min_length=1, max_length=128)]
NodeIdText = Annotated[NodeId, Strict(), Field(min_length=1, max_length=64)]
# Patterns run in pydantic-core (Rust); only the URL's structure needs Python's urlsplit.
HttpUrl = Annotated[Str, Field(min_length=1, max_length=200, pattern=r"^[^\s\x00-\x1f\x7f]*$"), AfterValidator(_http_url)]
Hex = Annotated[Str, Field(pattern=r"^[0-9a-f]*$")]  # lowercase hex
Sha256Hex = Annotated[Hex, Field(min_length=64, max_length=64)]
OptionalSha256Hex = Annotated[Hex, Field(max_length=64)]  # "" when there is none
Count = Annotated[Int, Field(ge=0)]
PublicKey = Annotated[Bytes, Field(min_length=PUBLIC_KEY_BYTES, max_length=PUBLIC_KEY_BYTES)]
Signature = Annotated[Bytes, Field(min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)]


# ---- message types ------------------------------------------------------------------

class WireRecord:
    """Base of wire records (plain frozen dataclasses): lists are kept as tuples and ints in float fields as floats."""

    def __post_init__(self) -> None:
        # Normal forms, so a record built in code encodes (and signs) exactly like its decoded copy.
        sequences, floats = _normal_forms(type(self))
        for name in sequences:
            value = getattr(self, name)
            if type(value) is list:
                object.__setattr__(self, name, tuple(value))
        for name in floats:
            if type(getattr(self, name)) is int:
                object.__setattr__(self, name, float(getattr(self, name)))


# Per-class caches as typed dicts: functools.cache's wrapper takes Hashable, which mypy does not see a class as.
_NORMAL_FORMS: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _normal_forms(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names of a record's sequence fields and of its float fields (optional or not), worked out once per class."""
    forms = _NORMAL_FORMS.get(cls)
    if forms is None:
        hints = typing.get_type_hints(cls)
        sequences = tuple(name for name, hint in hints.items() if typing.get_origin(hint) is tuple)
        floats = tuple(name for name, hint in hints.items() if hint is float or hint == float | None)
        forms = _NORMAL_FORMS.setdefault(cls, (sequences, floats))
    return forms


class WireMessage(WireRecord):
    """A top-level message: encoded with `v` and `type` beside its fields."""

    TYPE: ClassVar[str]


@dataclass(frozen=True)
class ExpertInfo(WireRecord):
    """One expert a node offers, as advertised in its card."""

    expert_id: Id
    name: Annotated[Str, Field(max_length=200)]
    family: Annotated[Str, Field(max_length=64)] | None
    params: Annotated[Str, Field(max_length=32)] | None
    quantization: Annotated[Str, Field(max_length=32)] | None
    sha256: Sha256Hex
    prompt_style: Literal["chat", "completion"]
    n_ctx: Annotated[Int, Field(ge=1)]
    queue_depth: Count
    queue_size: Count
    tokens_per_s: Annotated[Float, Field(ge=0.0)] | None
    # Opaque signed capability cards, verified by whoever reads them.
    cards: Annotated[tuple[Annotated[Bytes, Field(max_length=4096)], ...], Items(16)] = ()
    # Sequence slots decoded together; a peer that predates batching runs one request at a time.
    parallel: Annotated[Int, Field(ge=1, le=256)] = 1
    # A specialist (a base model plus a definition): its base's sha256 and its definition's digest; "" for a plain model.
    base_sha256: OptionalSha256Hex = ""
    definition_digest: OptionalSha256Hex = ""
    description: Annotated[Str, Field(max_length=300)] = ""


@dataclass(frozen=True)
class NodeCard(WireMessage):
    """What a node says about itself: key, addresses, experts."""

    TYPE: ClassVar[str] = "node_card"
    node_id: NodeIdText
    public_key: PublicKey
    addresses: Annotated[tuple[HttpUrl, ...], Items(16)]
    experts: Annotated[tuple[ExpertInfo, ...], Items(64)]
    issued_ms: Count
    card_digest: Annotated[Hex, Field(max_length=CARD_DIGEST_CHARS)] = ""


@dataclass(frozen=True)
class SignedCard(WireMessage):
    """A node card with its owner's signature over `card_signing_bytes(card)`."""

    TYPE: ClassVar[str] = "signed_card"
    card: NodeCard
    signature: Signature


@dataclass(frozen=True)
class Hello(WireMessage):
    """Opens contact: the sender's card and its clock reading."""

    TYPE: ClassVar[str] = "hello"
    card: SignedCard
    sent_ms: Count
    learning: Annotated[Bytes, Field(max_length=MAX_LEARNING_BYTES)] = b""  # signed summary, opaque here; empty: none shared


@dataclass(frozen=True)
class HelloReply(WireMessage):
    """Answers a hello with the receiver's card; echoes `sent_ms` for the round-trip time."""

    TYPE: ClassVar[str] = "hello_reply"
    card: SignedCard
    echo_sent_ms: Count
    learning: Annotated[Bytes, Field(max_length=MAX_LEARNING_BYTES)] = b""  # signed summary, opaque here; empty: none shared


@dataclass(frozen=True)
class PeerAddress(WireRecord):
    """Where a known node can be reached."""

    node_id: NodeIdText
    url: HttpUrl


@dataclass(frozen=True)
class PeersRequest(WireMessage):
    """Asks a peer for the peers it knows to be alive."""

    TYPE: ClassVar[str] = "peers"
    max_peers: Count


@dataclass(frozen=True)
class PeersReply(WireMessage):
    """The peers a node knows to be alive."""

    TYPE: ClassVar[str] = "peers_reply"
    peers: Annotated[tuple[PeerAddress, ...], Items(64)]


@dataclass(frozen=True)
class CardSubmission(WireMessage):
    """A judge hands the node hosting an expert its signed capability card about it (opaque here)."""

    TYPE: ClassVar[str] = "card"
    card: Annotated[Bytes, Field(min_length=1, max_length=4096)]


@dataclass(frozen=True)
class ChatMessage(WireRecord):
    """One turn of a conversation."""

    role: Annotated[Str, Field(min_length=1, max_length=32)]
    content: Str


@dataclass(frozen=True)
class GenerateRequest(WireMessage):
    """Asks a peer to run one of its experts; `hops` is 1 on a forwarded request."""

    TYPE: ClassVar[str] = "generate"
    request_id: Id
    expert_id: Id
    messages: Annotated[tuple[ChatMessage, ...], Items(256, min_len=1)]
    max_tokens: Annotated[Int, Field(ge=1)] | None
    temperature: Annotated[Float, Field(ge=0.0, le=2.0)] | None
    top_p: Annotated[Float, Field(ge=0.0, le=1.0)] | None
    stop: Annotated[tuple[Annotated[Str, Field(min_length=1, max_length=256)], ...], Items(4)]
    seed: Int | None
    origin_node: NodeIdText
    hops: Count
    # The client's OpenAI `response_format` as JSON text; the serving node builds and checks the grammar itself.
    response_format: Annotated[Str, Field(max_length=MAX_RESPONSE_FORMAT_CHARS)] | None = None


@dataclass(frozen=True)
class GenerateFrame(WireMessage):
    """One frame of a streamed generation: a text delta, the end, or an error."""

    TYPE: ClassVar[str] = "frame"
    kind: Literal["delta", "done", "error"]
    text: Str = ""
    finish_reason: Annotated[Str, Field(max_length=32)] | None = None
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    error: Annotated[Str, Field(max_length=2000)] | None = None
    node_id: Annotated[Str, Field(max_length=64)] = ""
    expert_id: Annotated[Str, Field(max_length=128)] = ""


@dataclass(frozen=True)
class ExpertDefinition(WireMessage):
    """A specialist's definition as data: canonical JSON without its base, which `base_sha256` names."""

    TYPE: ClassVar[str] = "expert_definition"
    expert_id: Id
    base_sha256: Sha256Hex
    base_name: Annotated[Str, Field(max_length=300)]
    definition: Annotated[Bytes, Field(min_length=2, max_length=MAX_DEFINITION_BYTES)]


T = TypeVar("T", bound=WireMessage)


# ---- validation ---------------------------------------------------------------------


_TYPE_NAMES = {
    type(None): "nil",
    bool: "a bool",
    int: "an integer",
    float: "a float",
    str: "a string",
    bytes: "bytes",
    list: "an array",
    tuple: "an array",
    dict: "a map",
}


def _type_name(value: Any) -> str:
    """How a decoded value's type reads in an error message."""
    return _TYPE_NAMES.get(type(value), "an extension type")


def _invalid(path: str, problem: str) -> WireError:
    """A 400 error naming the field at `path`."""
    return WireError(400, problem, field=path or "message")


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type[T]) -> TypeAdapter[T]:
    """The pydantic validator of a wire dataclass, built once."""
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS.setdefault(cls, TypeAdapter(cls))
    return adapter


def _path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the wire's field path: `card.experts[2].sha256`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not path:
            path = part
        elif part[:1].isidentifier():  # union members and validators show up as tags like `function-after[...]`
            path += f".{part}"
    return path


def _validate(obj: dict[str, Any], cls: type[T]) -> T:
    """A wire dataclass from a decoded map, or WireError(400) naming the first bad field; unknown keys are ignored."""
    try:
        return _adapter(cls).validate_python(obj)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        # A list over its cap also fails item by item; the cap is the finding (and cheap to read).
        error = next((e for e in errors if e["type"] in ("too_long", "too_short")), errors[0])
        problem = "missing required field" if error["type"] == "missing" else error["msg"]
        raise _invalid(_path(error["loc"]), problem.removeprefix("Value error, ")[:200]) from None


def _from_envelope(obj: Any, expected: type[T]) -> T:
    """Check version and type, then validate the fields of a top-level message."""
    if type(obj) is not dict:
        raise _invalid("", f"expected a map, got {_type_name(obj)}")
    if "v" not in obj:
        raise _invalid("v", "missing protocol version")
    version = obj["v"]
    if type(version) is not int:
        raise _invalid("v", f"expected an integer, got {_type_name(version)}")
    if version != PROTOCOL_VERSION:
        supported = f"this node speaks {PROTOCOL_VERSION}"
        raise WireError(426, f"protocol version {version} is not supported ({supported})", field="v")
    kind = obj.get("type")
    if type(kind) is not str:
        raise _invalid("type", f"expected a string, got {_type_name(kind)}")
    if kind != expected.TYPE:
        raise _invalid("type", f"expected {expected.TYPE!r}, got {kind[:_ERROR_ECHO_CHARS]!r}")
    return _validate(obj, expected)


# ---- encode / decode ----------------------------------------------------------------


def _plain(value: Any, *, sort_keys: bool) -> Any:
    """A wire record as nested maps and arrays msgpack can pack."""
    if isinstance(value, WireRecord):
        names = [f.name for f in dataclasses.fields(value)]  # type: ignore[arg-type]
        if sort_keys:
            names.sort()
        return {name: _plain(getattr(value, name), sort_keys=sort_keys) for name in names}
    if isinstance(value, (list, tuple)):
        return [_plain(v, sort_keys=sort_keys) for v in value]
    return value


def encode(msg: WireMessage) -> bytes:
    """The msgpack bytes of a message, with `v` and `type`; the receiver validates."""
    body = {"v": PROTOCOL_VERSION, "type": type(msg).TYPE, **_plain(msg, sort_keys=False)}
    return msgpack.packb(body, use_bin_type=True)


def _new_unpacker(max_bytes: int) -> msgpack.Unpacker:
    """An unpacker whose every size limit derives from `max_bytes`."""
    cap = max(max_bytes, 1)
    return msgpack.Unpacker(
        raw=False,
        use_list=False,  # arrays as tuples, as the strict validator wants them
        strict_map_key=True,
        max_buffer_size=cap,
        max_str_len=cap,
        max_bin_len=cap,
        max_array_len=cap,
        max_map_len=max(cap // 2, 1),
        max_ext_len=cap,
    )


_UNPACK_ERRORS = (msgpack.UnpackException, ValueError, TypeError, OverflowError)


def decode(data: bytes, expected: type[T], *, max_bytes: int) -> T:
    """Decode and validate one message of type `expected`; WireError on anything wrong."""
    if len(data) > max_bytes:
        raise WireError(413, f"message of {len(data)} bytes is over the {max_bytes}-byte cap")
    cap = max(len(data), 1)  # no length inside the message can claim more than the message holds
    try:
        obj = msgpack.unpackb(
            data, raw=False, use_list=False, strict_map_key=True, max_str_len=cap, max_bin_len=cap,
            max_array_len=cap, max_map_len=max(cap // 2, 1), max_ext_len=cap,
        )
    except msgpack.ExtraData as e:
        raise WireError(400, f"{len(e.extra)} bytes of trailing data after the message") from e
    except _UNPACK_ERRORS as e:
        if not data or "incomplete" in str(e):
            raise WireError(400, "truncated or empty message") from e
        raise WireError(400, f"malformed msgpack: {type(e).__name__}") from e
    return _from_envelope(obj, expected)


# ---- cards --------------------------------------------------------------------------


def card_signing_bytes(card: NodeCard) -> bytes:
    """Canonical msgpack (sorted keys, with `v` and `type`) of the card: what its signature covers."""
    body = {"v": PROTOCOL_VERSION, "type": NodeCard.TYPE, **_plain(card, sort_keys=True)}
    return msgpack.packb(dict(sorted(body.items())), use_bin_type=True)


def card_digest(card: NodeCard) -> str:
    """Short hex digest of the card's content, `card_digest` itself left out."""
    unfilled = dataclasses.replace(card, card_digest="")
    return hashlib.sha256(card_signing_bytes(unfilled)).hexdigest()[:CARD_DIGEST_CHARS]


def sign_card(card: NodeCard, identity: NodeIdentity) -> SignedCard:
    """Fill in the card's digest and sign it; ValueError when the card is not this node's."""
    if card.node_id != identity.node_id or card.public_key != identity.public_key_raw:
        raise ValueError("a node can only sign its own card")
    filled = dataclasses.replace(card, card_digest=card_digest(card))
    return SignedCard(card=filled, signature=identity.sign(card_signing_bytes(filled)))


def verify_card(signed: SignedCard) -> NodeCard:
    """The card when its id, digest and signature check out; WireError(400) otherwise."""
    card = signed.card
    if node_id_from_public_key(card.public_key) != card.node_id:
        raise _invalid("card.node_id", "does not derive from card.public_key")
    if card.card_digest != card_digest(card):
        raise _invalid("card.card_digest", "does not match the card's content")
    if not verify_signature(card.public_key, card_signing_bytes(card), signed.signature):
        raise _invalid("signature", "does not verify against card.public_key")
    return card


# ---- streams ------------------------------------------------------------------------


class FrameReader(Generic[T]):
    """Incremental reader of concatenated msgpack messages, each capped and validated."""

    def __init__(self, expected: type[T], *, max_frame_bytes: int, max_total_bytes: int) -> None:
        self._expected = expected
        self._max_frame_bytes = max_frame_bytes
        self._max_total_bytes = max_total_bytes
        self._unpacker = _new_unpacker(max_frame_bytes)
        self._pending = bytearray()
        self._received_bytes = 0
        self._fed_bytes = 0
        self._frame_start = 0
        self._error: WireError | None = None

    def feed(self, chunk: bytes) -> None:
        """Add received bytes; WireError(413) once the stream passes its total cap."""
        self._raise_if_failed()
        self._received_bytes += len(chunk)
        if self._received_bytes > self._max_total_bytes:
            self._fail(WireError(413, f"stream is over the {self._max_total_bytes}-byte cap"))
        self._pending += chunk

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        self._raise_if_failed()
        while True:
            try:
                obj = self._unpacker.unpack()
            except msgpack.OutOfData:
                if not self._refill():
                    raise StopIteration from None
                continue
            except msgpack.BufferFull:
                self._fail(WireError(413, f"frame is over the {self._max_frame_bytes}-byte cap"))
            except _UNPACK_ERRORS as e:
                self._fail(WireError(400, f"malformed msgpack frame: {type(e).__name__}"))
            self._frame_start = self._unpacker.tell()
            try:
                return _from_envelope(obj, self._expected)
            except WireError as e:
                self._fail(e)

    def finish(self) -> None:
        """At the end of the stream: WireError(400) when it stopped inside a frame."""
        self._raise_if_failed()
        if self._received_bytes > self._frame_start:
            self._fail(WireError(400, "stream ended inside a frame"))

    def _refill(self) -> bool:
        """Hand the unpacker as many pending bytes as the frame cap leaves room for."""
        if not self._pending:
            return False
        # Bytes fed since the last complete frame all belong to the frame being read.
        room = self._max_frame_bytes - (self._fed_bytes - self._frame_start)
        if room <= 0:
            self._fail(WireError(413, f"frame is over the {self._max_frame_bytes}-byte cap"))
        chunk = bytes(self._pending[:room])
        del self._pending[:room]
        self._unpacker.feed(chunk)
        self._fed_bytes += len(chunk)
        return True

    def _fail(self, error: WireError) -> typing.NoReturn:
        """Remember the error so the reader stays failed, and raise it."""
        self._error = error
        raise error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
