"""Versioned msgpack messages between peers: encode, decode, size caps, validation."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import urlsplit

import msgpack

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
BODY_HMAC_HEADER = "X-Expertmesh-Body-HMAC"
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


# ---- field limits -------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """Bounds checked on decode: lengths (chars, bytes or items), value range, choices."""

    min_len: int = 0
    max_len: int | None = None
    min_value: float | None = None
    max_value: float | None = None
    choices: frozenset[str] | None = None
    item: Limit | None = None
    check: Callable[[Any], str | None] | None = None


_NO_LIMIT = Limit()
_LIMIT_KEY = "wire_limit"


def _wire(default: Any = dataclasses.MISSING, **limit: Any) -> Any:
    """A dataclass field carrying decode limits."""
    return field(default=default, metadata={_LIMIT_KEY: Limit(**limit)})


def _http_url_problem(value: str) -> str | None:
    """Why `value` is not an absolute http(s) URL, or None when it is one."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError on a malformed port
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http(s) URL with a host"
    if any(c.isspace() or ord(c) < 0x20 for c in value):
        return "URL contains whitespace or control characters"
    return None


def _lower_hex_problem(value: str) -> str | None:
    """Why `value` is not lowercase hex, or None when it is."""
    return None if all(c in "0123456789abcdef" for c in value) else "expected lowercase hex"


_ID = dict(min_len=1, max_len=128)
_NODE_ID = dict(min_len=1, max_len=64)
_URL = Limit(min_len=1, max_len=200, check=_http_url_problem)
_COUNT = dict(min_value=0)


# ---- message types ------------------------------------------------------------------


class WireRecord:
    """Base of wire records: sequences are kept as tuples and float fields as floats."""

    def __post_init__(self) -> None:
        for spec in _schema(type(self)):
            value = getattr(self, spec.name)
            normal = _normalize(value, spec.shape)
            if normal is not value:
                object.__setattr__(self, spec.name, normal)


class WireMessage(WireRecord):
    """A top-level message: encoded with `v` and `type` beside its fields."""

    TYPE: ClassVar[str]


@dataclass(frozen=True)
class ExpertInfo(WireRecord):
    """One expert a node offers, as advertised in its card."""

    expert_id: str = _wire(**_ID)
    name: str = _wire(max_len=200)
    family: str | None = _wire(max_len=64)
    params: str | None = _wire(max_len=32)
    quantization: str | None = _wire(max_len=32)
    sha256: str = _wire(min_len=64, max_len=64, check=_lower_hex_problem)
    prompt_style: str = _wire(choices=frozenset({"chat", "completion"}))
    n_ctx: int = _wire(min_value=1)
    queue_depth: int = _wire(**_COUNT)
    queue_size: int = _wire(**_COUNT)
    tokens_per_s: float | None = _wire(min_value=0.0)
    # Opaque signed capability cards, verified by whoever reads them.
    cards: tuple[bytes, ...] = _wire((), max_len=16, item=Limit(max_len=4096))
    # Sequence slots decoded together; a peer that predates batching runs one request at a time.
    parallel: int = _wire(1, min_value=1, max_value=256)
    # A specialist (a base model plus a definition): its base's sha256 and its definition's digest; "" for a plain model.
    base_sha256: str = _wire("", max_len=64, check=_lower_hex_problem)
    definition_digest: str = _wire("", max_len=64, check=_lower_hex_problem)
    description: str = _wire("", max_len=300)


@dataclass(frozen=True)
class NodeCard(WireMessage):
    """What a node says about itself: key, addresses, experts."""

    TYPE: ClassVar[str] = "node_card"
    node_id: NodeId = _wire(**_NODE_ID)
    public_key: bytes = _wire(min_len=PUBLIC_KEY_BYTES, max_len=PUBLIC_KEY_BYTES)
    addresses: tuple[str, ...] = _wire(max_len=16, item=_URL)
    experts: tuple[ExpertInfo, ...] = _wire(max_len=64)
    issued_ms: int = _wire(**_COUNT)
    card_digest: str = _wire("", max_len=CARD_DIGEST_CHARS, check=_lower_hex_problem)


@dataclass(frozen=True)
class SignedCard(WireMessage):
    """A node card with its owner's signature over `card_signing_bytes(card)`."""

    TYPE: ClassVar[str] = "signed_card"
    card: NodeCard
    signature: bytes = _wire(min_len=SIGNATURE_BYTES, max_len=SIGNATURE_BYTES)


@dataclass(frozen=True)
class Hello(WireMessage):
    """Opens contact: the sender's card and its clock reading."""

    TYPE: ClassVar[str] = "hello"
    card: SignedCard
    sent_ms: int = _wire(**_COUNT)
    learning: bytes = _wire(b"", max_len=MAX_LEARNING_BYTES)  # signed summary, opaque here; empty: none shared


@dataclass(frozen=True)
class HelloReply(WireMessage):
    """Answers a hello with the receiver's card; echoes `sent_ms` for the round-trip time."""

    TYPE: ClassVar[str] = "hello_reply"
    card: SignedCard
    echo_sent_ms: int = _wire(**_COUNT)
    learning: bytes = _wire(b"", max_len=MAX_LEARNING_BYTES)  # signed summary, opaque here; empty: none shared


@dataclass(frozen=True)
class PeerAddress(WireRecord):
    """Where a known node can be reached."""

    node_id: NodeId = _wire(**_NODE_ID)
    url: str = _wire(min_len=_URL.min_len, max_len=_URL.max_len, check=_URL.check)


@dataclass(frozen=True)
class PeersRequest(WireMessage):
    """Asks a peer for the peers it knows to be alive."""

    TYPE: ClassVar[str] = "peers"
    max_peers: int = _wire(**_COUNT)


@dataclass(frozen=True)
class PeersReply(WireMessage):
    """The peers a node knows to be alive."""

    TYPE: ClassVar[str] = "peers_reply"
    peers: tuple[PeerAddress, ...] = _wire(max_len=64)


@dataclass(frozen=True)
class CardSubmission(WireMessage):
    """A judge hands the node hosting an expert its signed capability card about it (opaque here)."""

    TYPE: ClassVar[str] = "card"
    card: bytes = _wire(min_len=1, max_len=4096)


@dataclass(frozen=True)
class ChatMessage(WireRecord):
    """One turn of a conversation."""

    role: str = _wire(min_len=1, max_len=32)
    content: str


@dataclass(frozen=True)
class GenerateRequest(WireMessage):
    """Asks a peer to run one of its experts; `hops` is 1 on a forwarded request."""

    TYPE: ClassVar[str] = "generate"
    request_id: str = _wire(**_ID)
    expert_id: str = _wire(**_ID)
    messages: tuple[ChatMessage, ...] = _wire(min_len=1, max_len=256)
    max_tokens: int | None = _wire(min_value=1)
    temperature: float | None = _wire(min_value=0.0, max_value=2.0)
    top_p: float | None = _wire(min_value=0.0, max_value=1.0)
    stop: tuple[str, ...] = _wire(max_len=4, item=Limit(min_len=1, max_len=256))
    seed: int | None
    origin_node: NodeId = _wire(**_NODE_ID)
    hops: int = _wire(**_COUNT)
    # The client's OpenAI `response_format` as JSON text; the serving node builds and checks the grammar itself.
    response_format: str | None = _wire(None, max_len=MAX_RESPONSE_FORMAT_CHARS)


@dataclass(frozen=True)
class GenerateFrame(WireMessage):
    """One frame of a streamed generation: a text delta, the end, or an error."""

    TYPE: ClassVar[str] = "frame"
    kind: str = _wire(choices=frozenset({"delta", "done", "error"}))
    text: str = ""
    finish_reason: str | None = _wire(None, max_len=32)
    prompt_tokens: int = _wire(0, **_COUNT)
    completion_tokens: int = _wire(0, **_COUNT)
    error: str | None = _wire(None, max_len=2000)
    node_id: str = _wire("", max_len=64)
    expert_id: str = _wire("", max_len=128)


@dataclass(frozen=True)
class ExpertDefinition(WireMessage):
    """A specialist's definition as data: canonical JSON without its base, which `base_sha256` names."""

    TYPE: ClassVar[str] = "expert_definition"
    expert_id: str = _wire(**_ID)
    base_sha256: str = _wire(min_len=64, max_len=64, check=_lower_hex_problem)
    base_name: str = _wire(max_len=300)
    definition: bytes = _wire(min_len=2, max_len=MAX_DEFINITION_BYTES)


T = TypeVar("T", bound=WireMessage)


# ---- schema from type hints ---------------------------------------------------------


@dataclass(frozen=True)
class _Scalar:
    kind: type


@dataclass(frozen=True)
class _Optional:
    inner: _Shape


@dataclass(frozen=True)
class _Seq:
    item: _Shape


@dataclass(frozen=True)
class _Record:
    cls: type


_Shape = _Scalar | _Optional | _Seq | _Record


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    shape: _Shape
    limit: Limit
    required: bool


_SCALARS = (str, int, float, bool, bytes)
_ENVELOPE_KEYS = frozenset({"v", "type"})


def _shape_of(hint: Any) -> _Shape:
    """The shape a type hint describes; TypeError for types the wire does not carry."""
    supertype = getattr(hint, "__supertype__", None)
    if supertype is not None:
        return _shape_of(supertype)
    if hint in _SCALARS:
        return _Scalar(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _Record(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _Optional(_shape_of(next(a for a in args if a is not type(None))))
    if origin is list and len(args) == 1:
        return _Seq(_shape_of(args[0]))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _Seq(_shape_of(args[0]))
    raise TypeError(f"type {hint!r} cannot be carried on the wire")


@functools.cache
def _schema(cls: type) -> tuple[_FieldSpec, ...]:
    """The fields of a wire dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in _ENVELOPE_KEYS:
            raise TypeError(f"{cls.__name__}.{f.name} clashes with the message envelope")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        specs.append(_FieldSpec(f.name, _shape_of(hints[f.name]), f.metadata.get(_LIMIT_KEY, _NO_LIMIT), required))
    return tuple(specs)


def _normalize(value: Any, shape: _Shape) -> Any:
    """Lists become tuples and ints in float fields become floats; anything else is kept."""
    if isinstance(shape, _Optional):
        return value if value is None else _normalize(value, shape.inner)
    if isinstance(shape, _Seq) and isinstance(value, (list, tuple)):
        items = tuple(_normalize(v, shape.item) for v in value)
        if type(value) is tuple and all(a is b for a, b in zip(items, value)):
            return value
        return items
    if isinstance(shape, _Scalar) and shape.kind is float and type(value) is int:
        return float(value)
    return value


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


def _check_len(length: int, limit: Limit, path: str, unit: str) -> None:
    """Enforce the limit's length bounds."""
    if length < limit.min_len:
        raise _invalid(path, f"at least {limit.min_len} {unit} required, got {length}")
    if limit.max_len is not None and length > limit.max_len:
        raise _invalid(path, f"at most {limit.max_len} {unit} allowed, got {length}")


def _check_scalar(value: Any, kind: type, limit: Limit, path: str) -> Any:
    """Validate one scalar strictly: no bool for int, ints accepted for float."""
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise _invalid(path, f"expected {_TYPE_NAMES[kind]}, got {_type_name(value)}")
    if kind is float and not math.isfinite(value):
        raise _invalid(path, "expected a finite number")
    if kind is str:
        _check_len(len(value), limit, path, "characters")
    elif kind is bytes:
        _check_len(len(value), limit, path, "bytes")
    elif kind in (int, float):
        if limit.min_value is not None and value < limit.min_value:
            raise _invalid(path, f"must be >= {limit.min_value:g}, got {value:g}")
        if limit.max_value is not None and value > limit.max_value:
            raise _invalid(path, f"must be <= {limit.max_value:g}, got {value:g}")
    if limit.choices is not None and value not in limit.choices:
        got = repr(value)[:_ERROR_ECHO_CHARS]
        raise _invalid(path, f"must be one of {', '.join(sorted(limit.choices))}; got {got}")
    if limit.check is not None:
        problem = limit.check(value)
        if problem is not None:
            raise _invalid(path, problem)
    return value


def _check(value: Any, shape: _Shape, limit: Limit, path: str) -> Any:
    """Validate a decoded value against a field's shape and limit; the value to store."""
    if isinstance(shape, _Optional):
        return None if value is None else _check(value, shape.inner, limit, path)
    if isinstance(shape, _Record):
        return _check_record(value, shape.cls, path)
    if isinstance(shape, _Seq):
        if type(value) not in (list, tuple):
            raise _invalid(path, f"expected an array, got {_type_name(value)}")
        _check_len(len(value), limit, path, "items")
        item_limit = limit.item or _NO_LIMIT
        return tuple(_check(v, shape.item, item_limit, f"{path}[{i}]") for i, v in enumerate(value))
    return _check_scalar(value, shape.kind, limit, path)


def _check_record(value: Any, cls: type[Any], path: str) -> Any:
    """Build a wire dataclass from a decoded map; unknown keys are ignored."""
    if type(value) is not dict:
        raise _invalid(path, f"expected a map, got {_type_name(value)}")
    kwargs = {}
    for spec in _schema(cls):
        sub = f"{path}.{spec.name}" if path else spec.name
        if spec.name in value:
            kwargs[spec.name] = _check(value[spec.name], spec.shape, spec.limit, sub)
        elif spec.required:
            raise _invalid(sub, "missing required field")
    return cls(**kwargs)


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
    return typing.cast(T, _check_record(obj, expected, ""))


# ---- encode / decode ----------------------------------------------------------------


def _plain(value: Any, *, sort_keys: bool) -> Any:
    """A wire record as nested maps and arrays msgpack can pack."""
    if isinstance(value, WireRecord):
        names = [spec.name for spec in _schema(type(value))]
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
    unpacker = _new_unpacker(max_bytes)
    try:
        unpacker.feed(data)
        obj = unpacker.unpack()
    except msgpack.OutOfData as e:
        raise WireError(400, "truncated or empty message") from e
    except _UNPACK_ERRORS as e:
        raise WireError(400, f"malformed msgpack: {type(e).__name__}") from e
    if unpacker.tell() != len(data):
        raise WireError(400, f"{len(data) - unpacker.tell()} bytes of trailing data after the message")
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


# ---- community secret ---------------------------------------------------------------


def body_hmac(secret: bytes, body: bytes) -> str:
    """Hex HMAC-SHA256 of a request body under the community secret."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def check_body_hmac(secret: bytes, body: bytes, header_value: str | None) -> bool:
    """True when the header carries the body's HMAC; compared in constant time."""
    if not isinstance(header_value, str):
        return False
    given = header_value.strip().lower().encode("utf-8", errors="replace")
    return hmac.compare_digest(body_hmac(secret, body).encode("ascii"), given)
