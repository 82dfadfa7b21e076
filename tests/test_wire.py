"""Wire messages: round trips, validation statuses and field paths, cards, streams, HMAC."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peers.identity import NodeId, NodeIdentity
from peers.wire import (
    PROTOCOL_VERSION,
    ChatMessage,
    ExpertInfo,
    FrameReader,
    GenerateFrame,
    GenerateRequest,
    Hello,
    HelloReply,
    NodeCard,
    PeerAddress,
    PeersReply,
    PeersRequest,
    SignedCard,
    WireError,
    WireMessage,
    card_digest,
    card_signing_bytes,
    decode,
    encode,
    sign_card,
    verify_card,
)

MAX_BYTES = 1 << 20
IDENTITY = NodeIdentity.generate()
OTHER = NodeIdentity.generate()


def _expert(i: int = 0, **changes: Any) -> ExpertInfo:
    expert = ExpertInfo(
        expert_id=f"smollm2-135m-{i}",
        name="SmolLM2 135M",
        family="smollm2",
        params="135M",
        quantization="Q8_0",
        sha256="ab" * 32,
        prompt_style="chat",
        n_ctx=2048,
        queue_depth=1,
        queue_size=4,
        tokens_per_s=42,  # an int on purpose: float fields accept ints
        cards=(b"opaque-card",),
    )
    return dataclasses.replace(expert, **changes)


def _card(identity: NodeIdentity = IDENTITY, n_experts: int = 3) -> NodeCard:
    return NodeCard(
        node_id=identity.node_id,
        public_key=identity.public_key_raw,
        addresses=("http://192.168.1.7:8080", "https://node.example:443/mesh"),
        experts=tuple(_expert(i) for i in range(n_experts)),
        issued_ms=1_700_000_000_000,
    )


def _signed(identity: NodeIdentity = IDENTITY) -> SignedCard:
    return sign_card(_card(identity), identity)


def _generate_request(**changes: Any) -> GenerateRequest:
    request = GenerateRequest(
        request_id="req-1",
        expert_id="smollm2-135m-0",
        messages=(ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi ✓")),
        max_tokens=64,
        temperature=0.7,
        top_p=None,
        stop=("\n\n",),
        seed=7,
        origin_node=NodeId(IDENTITY.node_id),
        hops=1,
    )
    return dataclasses.replace(request, **changes)


SAMPLES: dict[type[WireMessage], Callable[[], WireMessage]] = {
    NodeCard: _card,
    SignedCard: _signed,
    Hello: lambda: Hello(card=_signed(), sent_ms=123),
    HelloReply: lambda: HelloReply(card=_signed(OTHER), echo_sent_ms=123),
    PeersRequest: lambda: PeersRequest(max_peers=16),
    PeersReply: lambda: PeersReply(
        peers=(
            PeerAddress(node_id=OTHER.node_id, url="http://10.0.0.2:8080"),
            PeerAddress(node_id=IDENTITY.node_id, url="http://[::1]:9"),
        )
    ),
    GenerateRequest: _generate_request,
    GenerateFrame: lambda: GenerateFrame(
        kind="done", finish_reason="stop", prompt_tokens=12, completion_tokens=3, node_id="n", expert_id="e"
    ),
}
MESSAGE_TYPES = list(SAMPLES)


def _plain(msg: WireMessage) -> dict[str, Any]:
    return msgpack.unpackb(encode(msg), raw=False)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _wire_error(data: bytes, expected: type[WireMessage], max_bytes: int = MAX_BYTES) -> WireError:
    with pytest.raises(WireError) as info:
        decode(data, expected, max_bytes=max_bytes)
    return info.value


# ---- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_round_trip(cls: type[WireMessage]) -> None:
    msg = SAMPLES[cls]()
    data = encode(msg)
    decoded = decode(data, cls, max_bytes=MAX_BYTES)
    assert decoded == msg
    assert encode(decoded) == data
    envelope = msgpack.unpackb(data, raw=False)
    assert envelope["v"] == PROTOCOL_VERSION and envelope["type"] == cls.TYPE


def test_sequences_are_tuples_and_float_fields_floats() -> None:
    expert = _expert()
    assert expert.cards == (b"opaque-card",) and type(expert.tokens_per_s) is float
    request = _generate_request(temperature=1)
    assert type(request.temperature) is float and isinstance(request.messages, tuple)
    hash(request)  # frozen and made of tuples, so hashable


def test_defaults_fill_missing_optional_fields() -> None:
    frame = decode(_pack({"v": 1, "type": "frame", "kind": "delta", "text": "x"}), GenerateFrame, max_bytes=MAX_BYTES)
    assert frame == GenerateFrame(kind="delta", text="x")
    assert decode(_pack({"v": 1, "type": "frame", "kind": "done"}), GenerateFrame, max_bytes=MAX_BYTES).text == ""


def test_unknown_fields_are_ignored_at_every_level() -> None:
    plain = _plain(SAMPLES[Hello]())
    plain["future_field"] = [1, 2, 3]
    plain["card"]["extra"] = {"a": 1}
    plain["card"]["card"]["experts"][1]["scores"] = {"knowledge": 0.9}
    assert decode(_pack(plain), Hello, max_bytes=MAX_BYTES) == SAMPLES[Hello]()


def test_nil_is_accepted_for_optional_fields() -> None:
    request = _generate_request(max_tokens=None, temperature=None, top_p=None, seed=None, stop=[])
    assert decode(encode(request), GenerateRequest, max_bytes=MAX_BYTES) == request


# ---- envelope -----------------------------------------------------------------------


def test_oversize_is_413_before_unpacking() -> None:
    data = encode(SAMPLES[Hello]())
    assert _wire_error(data, Hello, max_bytes=len(data) - 1).status == 413
    assert decode(data, Hello, max_bytes=len(data)) == SAMPLES[Hello]()


def test_other_version_is_426() -> None:
    plain = _plain(PeersRequest(max_peers=3))
    plain["v"] = PROTOCOL_VERSION + 1
    error = _wire_error(_pack(plain), PeersRequest)
    assert error.status == 426 and error.field == "v"


@pytest.mark.parametrize(
    "envelope, field",
    [
        ({"type": "peers", "max_peers": 1}, "v"),
        ({"v": "1", "type": "peers", "max_peers": 1}, "v"),
        ({"v": True, "type": "peers", "max_peers": 1}, "v"),
        ({"v": 1.0, "type": "peers", "max_peers": 1}, "v"),
        ({"v": 1, "max_peers": 1}, "type"),
        ({"v": 1, "type": "hello", "max_peers": 1}, "type"),
        ({"v": 1, "type": b"peers", "max_peers": 1}, "type"),
        ([1, "peers", 1], "message"),
        ("peers", "message"),
    ],
)
def test_bad_envelope_is_400_naming_the_field(envelope: Any, field: str) -> None:
    error = _wire_error(_pack(envelope), PeersRequest)
    assert error.status == 400 and error.field == field and field in str(error)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", _pack({"v": 1}) + b"\x00", b"\xa2\xff\xfe", _pack({1: 2}), _pack({(1,): 2})[:3]],
    ids=["empty", "reserved-byte", "truncated", "trailing", "bad-utf8", "int-key", "cut"],
)
def test_malformed_msgpack_is_400(data: bytes) -> None:
    assert _wire_error(data, PeersRequest).status == 400


def test_deep_nesting_is_400_not_a_crash() -> None:
    data = b"\x91" * 100_000 + b"\x00"
    assert _wire_error(data, PeersRequest).status == 400


# ---- field validation ---------------------------------------------------------------


def _set(plain: dict[str, Any], path: str, value: Any) -> None:
    """Set (or, with value=DELETE, remove) the field at a dotted path like `a.b[2].c`."""
    steps: list[str | int] = []
    for part in path.split("."):
        name, *indexes = part.replace("]", "").split("[")
        steps.append(name)
        steps.extend(int(i) for i in indexes)
    target: Any = plain
    for step in steps[:-1]:
        target = target[step]
    if value is DELETE:
        del target[steps[-1]]
    else:
        target[steps[-1]] = value


DELETE = object()
LONG = "x" * 10_000

INVALID_CASES: list[tuple[type[WireMessage], str, Any]] = [
    # Hello / cards
    (Hello, "sent_ms", DELETE),
    (Hello, "sent_ms", True),
    (Hello, "sent_ms", "123"),
    (Hello, "sent_ms", 1.5),
    (Hello, "sent_ms", -1),
    (Hello, "card", None),
    (Hello, "card.signature", b"\0" * 63),
    (Hello, "card.signature", "sig"),
    (Hello, "card.card", [1, 2]),
    (Hello, "card.card.node_id", ""),
    (Hello, "card.card.node_id", LONG),
    (Hello, "card.card.public_key", b"\0" * 31),
    (Hello, "card.card.public_key", "k" * 32),
    (Hello, "card.card.addresses", ["http://a:1"] * 17),
    (Hello, "card.card.addresses", "http://a:1"),
    (Hello, "card.card.addresses[1]", "http://a/" + "x" * 200),
    (Hello, "card.card.addresses[0]", "ftp://a.example/"),
    (Hello, "card.card.addresses[0]", "http://"),
    (Hello, "card.card.addresses[0]", "http://a:notaport/"),
    (Hello, "card.card.addresses[0]", "http://a b/"),
    (Hello, "card.card.experts", [{}] * 65),
    (Hello, "card.card.experts[2]", "expert"),
    (Hello, "card.card.experts[2].n_ctx", True),
    (Hello, "card.card.experts[2].n_ctx", 0),
    (Hello, "card.card.experts[2].n_ctx", DELETE),
    (Hello, "card.card.experts[2].queue_depth", -1),
    (Hello, "card.card.experts[2].expert_id", ""),
    (Hello, "card.card.experts[2].expert_id", LONG),
    (Hello, "card.card.experts[2].name", LONG),
    (Hello, "card.card.experts[2].family", 3),
    (Hello, "card.card.experts[2].sha256", "AB" * 32),
    (Hello, "card.card.experts[2].sha256", "ab"),
    (Hello, "card.card.experts[2].prompt_style", "instruct"),
    (Hello, "card.card.experts[2].tokens_per_s", float("nan")),
    (Hello, "card.card.experts[2].tokens_per_s", float("inf")),
    (Hello, "card.card.experts[2].tokens_per_s", -1.0),
    (Hello, "card.card.experts[2].tokens_per_s", False),
    (Hello, "card.card.experts[2].cards", [b"c"] * 17),
    (Hello, "card.card.experts[2].cards[0]", b"c" * 4097),
    (Hello, "card.card.experts[2].cards[0]", "not bytes"),
    (Hello, "card.card.issued_ms", None),
    (Hello, "card.card.card_digest", "Z" * 16),
    (Hello, "card.card.card_digest", "a" * 17),
    (HelloReply, "echo_sent_ms", DELETE),
    # Peers
    (PeersRequest, "max_peers", -5),
    (PeersRequest, "max_peers", None),
    (PeersReply, "peers", [{"node_id": "n", "url": "http://a:1"}] * 65),
    (PeersReply, "peers[1].url", "gopher://x"),
    (PeersReply, "peers[1].node_id", DELETE),
    # Generation
    (GenerateRequest, "temperature", 2.5),
    (GenerateRequest, "temperature", -0.1),
    (GenerateRequest, "temperature", float("nan")),
    (GenerateRequest, "temperature", "hot"),
    (GenerateRequest, "top_p", 1.01),
    (GenerateRequest, "top_p", -0.5),
    (GenerateRequest, "max_tokens", 0),
    (GenerateRequest, "max_tokens", True),
    (GenerateRequest, "messages", []),
    (GenerateRequest, "messages", [{"role": "user", "content": "x"}] * 257),
    (GenerateRequest, "messages[1].role", DELETE),
    (GenerateRequest, "messages[1].role", ""),
    (GenerateRequest, "messages[1].content", b"bytes"),
    (GenerateRequest, "stop", ["a", "b", "c", "d", "e"]),
    (GenerateRequest, "stop[0]", ""),
    (GenerateRequest, "stop[0]", 5),
    (GenerateRequest, "seed", 1.5),
    (GenerateRequest, "seed", DELETE),
    (GenerateRequest, "origin_node", ""),
    (GenerateRequest, "hops", -1),
    (GenerateRequest, "request_id", LONG),
    (GenerateFrame, "kind", "partial"),
    (GenerateFrame, "kind", DELETE),
    (GenerateFrame, "text", None),
    (GenerateFrame, "completion_tokens", -1),
    (GenerateFrame, "finish_reason", LONG),
]


@pytest.mark.parametrize(
    "cls, path, value", INVALID_CASES, ids=[f"{c.__name__}:{p}={str(v)[:12]!s}" for c, p, v in INVALID_CASES]
)
def test_invalid_field_is_400_naming_its_path(cls: type[WireMessage], path: str, value: Any) -> None:
    plain = copy.deepcopy(_plain(SAMPLES[cls]()))
    _set(plain, path, value)
    error = _wire_error(_pack(plain), cls)
    assert error.status == 400
    assert error.field == path
    assert str(error).startswith(f"{path}: ")


def test_bool_is_not_an_int_but_int_is_a_float() -> None:
    plain = _plain(_generate_request())
    plain["temperature"] = 1
    assert decode(_pack(plain), GenerateRequest, max_bytes=MAX_BYTES).temperature == 1.0
    plain["seed"] = False
    assert _wire_error(_pack(plain), GenerateRequest).field == "seed"


def test_error_message_does_not_echo_long_input() -> None:
    plain = _plain(PeersRequest(max_peers=1))
    plain["type"] = "t" * 10_000
    assert len(str(_wire_error(_pack(plain), PeersRequest))) < 200


# ---- fuzzing ------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
MUTATE = settings(FUZZ, max_examples=60)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_wire_error(cls: type[WireMessage], data: bytes) -> None:
    try:
        decode(data, cls, max_bytes=256)
    except WireError as e:
        assert e.status in (400, 413, 426)


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=8,
)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@MUTATE
@given(data=st.data())
def test_mutated_valid_messages_only_raise_wire_error(cls: type[WireMessage], data: st.DataObject) -> None:
    """Replace random nested values of a valid message with arbitrary msgpack values."""
    plain = copy.deepcopy(_plain(SAMPLES[cls]()))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        target: Any = plain
        while True:
            keys = list(target) if isinstance(target, dict) else list(range(len(target)))
            if not keys:
                break
            key = data.draw(st.sampled_from(keys))
            child = target[key]
            if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
                target = child
                continue
            target[key] = data.draw(_msgpack_values)
            break
    try:
        decoded = decode(_pack(plain), cls, max_bytes=MAX_BYTES)
    except WireError as e:
        assert e.status in (400, 426)
    else:
        assert isinstance(decoded, cls)


# ---- cards --------------------------------------------------------------------------


def test_signed_card_verifies_after_a_round_trip() -> None:
    hello = decode(encode(Hello(card=_signed(), sent_ms=1)), Hello, max_bytes=MAX_BYTES)
    card = verify_card(hello.card)
    assert card.node_id == IDENTITY.node_id
    assert card.card_digest == card_digest(card) and len(card.card_digest) == 16


def test_signing_bytes_are_canonical() -> None:
    card = _card()
    data = card_signing_bytes(card)
    assert data == card_signing_bytes(decode(encode(card), NodeCard, max_bytes=MAX_BYTES))
    keys = list(msgpack.unpackb(data, raw=False))
    assert keys == sorted(keys)
    # The digest ignores its own field, so filling it in keeps it stable.
    assert card_digest(card) == card_digest(dataclasses.replace(card, card_digest="0" * 16))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: dataclasses.replace(c, experts=(dataclasses.replace(c.experts[0], queue_depth=0), *c.experts[1:])),
        lambda c: dataclasses.replace(c, experts=(dataclasses.replace(c.experts[0], n_ctx=4096), *c.experts[1:])),
        lambda c: dataclasses.replace(c, addresses=("http://evil.example:80",)),
        lambda c: dataclasses.replace(c, issued_ms=c.issued_ms + 1),
        lambda c: dataclasses.replace(c, card_digest="0" * 16),
    ],
    ids=["expert-queue", "expert-ctx", "addresses", "issued", "digest"],
)
def test_tampered_card_fails(tamper: Callable[[NodeCard], NodeCard]) -> None:
    signed = _signed()
    tampered = SignedCard(card=tamper(signed.card), signature=signed.signature)
    with pytest.raises(WireError) as info:
        verify_card(tampered)
    assert info.value.status == 400


def test_tampered_card_with_recomputed_digest_fails_on_signature() -> None:
    signed = _signed()
    changed = dataclasses.replace(signed.card, experts=signed.card.experts[:1])
    changed = dataclasses.replace(changed, card_digest=card_digest(changed))
    with pytest.raises(WireError) as info:
        verify_card(SignedCard(card=changed, signature=signed.signature))
    assert info.value.field == "signature"


def test_card_whose_node_id_does_not_match_its_key_fails() -> None:
    card = dataclasses.replace(_card(), node_id=OTHER.node_id)
    card = dataclasses.replace(card, card_digest=card_digest(card))
    forged = SignedCard(card=card, signature=IDENTITY.sign(card_signing_bytes(card)))
    with pytest.raises(WireError) as info:
        verify_card(forged)
    assert info.value.status == 400 and info.value.field == "card.node_id"


def test_card_signed_by_another_key_fails() -> None:
    card = dataclasses.replace(_card(), card_digest=card_digest(_card()))
    with pytest.raises(WireError) as info:
        verify_card(SignedCard(card=card, signature=OTHER.sign(card_signing_bytes(card))))
    assert info.value.field == "signature"


def test_a_node_signs_only_its_own_card() -> None:
    with pytest.raises(ValueError):
        sign_card(_card(OTHER), IDENTITY)


# ---- streams ------------------------------------------------------------------------


def _frames(n: int) -> list[GenerateFrame]:
    frames = [GenerateFrame(kind="delta", text=f"tok{i} " * (i % 4)) for i in range(n - 1)]
    return [*frames, GenerateFrame(kind="done", finish_reason="stop", completion_tokens=n - 1)]


@settings(max_examples=100, deadline=None, database=None)
@given(n=st.integers(min_value=1, max_value=12), cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30))
def test_frame_reader_across_arbitrary_chunk_splits(n: int, cuts: list[int]) -> None:
    frames = _frames(n)
    stream = b"".join(encode(f) for f in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    reader = FrameReader(GenerateFrame, max_frame_bytes=256, max_total_bytes=len(stream))
    got: list[GenerateFrame] = []
    for start, end in itertools.pairwise(points):
        reader.feed(stream[start:end])
        got.extend(reader)
    reader.finish()
    assert got == frames


def test_frame_reader_byte_by_byte_and_all_at_once() -> None:
    frames = _frames(20)
    stream = b"".join(encode(f) for f in frames)
    reader = FrameReader(GenerateFrame, max_frame_bytes=256, max_total_bytes=MAX_BYTES)
    got: list[GenerateFrame] = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        got.extend(reader)
    assert got == frames
    # One chunk far larger than the per-frame cap is fine when each frame fits.
    reader = FrameReader(GenerateFrame, max_frame_bytes=256, max_total_bytes=MAX_BYTES)
    reader.feed(stream)
    assert list(reader) == frames and len(stream) > 256


def test_frame_over_its_cap_is_413_however_it_arrives() -> None:
    big = encode(GenerateFrame(kind="delta", text="x" * 1000))
    for chunk_size in (1, 100, len(big)):
        reader = FrameReader(GenerateFrame, max_frame_bytes=500, max_total_bytes=MAX_BYTES)
        with pytest.raises(WireError) as info:
            for i in range(0, len(big), chunk_size):
                reader.feed(big[i : i + chunk_size])
                list(reader)
        assert info.value.status == 413


def test_many_small_items_in_one_frame_still_hit_the_frame_cap() -> None:
    # 900 items fit the item-count limit, but at 9 bytes each the frame does not fit its cap.
    huge = _pack({"v": 1, "type": "frame", "kind": "delta", "text": "", "pad": [2**40] * 900})
    reader = FrameReader(GenerateFrame, max_frame_bytes=1000, max_total_bytes=MAX_BYTES)
    with pytest.raises(WireError) as info:
        for i in range(0, len(huge), 64):
            reader.feed(huge[i : i + 64])
            list(reader)
    assert info.value.status == 413


def test_stream_over_its_total_cap_is_413() -> None:
    stream = b"".join(encode(f) for f in _frames(10))
    reader = FrameReader(GenerateFrame, max_frame_bytes=256, max_total_bytes=len(stream) - 1)
    with pytest.raises(WireError) as info:
        reader.feed(stream)
    assert info.value.status == 413


def test_invalid_frame_is_400_and_the_reader_stays_failed() -> None:
    good = encode(GenerateFrame(kind="delta", text="a"))
    bad = _pack({"v": 1, "type": "frame", "kind": "nope"})
    reader = FrameReader(GenerateFrame, max_frame_bytes=256, max_total_bytes=MAX_BYTES)
    reader.feed(good + bad + good)
    assert next(reader) == GenerateFrame(kind="delta", text="a")
    with pytest.raises(WireError) as info:
        next(reader)
    assert info.value.status == 400 and info.value.field == "kind"
    with pytest.raises(WireError):
        next(reader)


def test_stream_ending_inside_a_frame_is_400() -> None:
    data = encode(GenerateFrame(kind="delta", text="abc"))
    reader = FrameReader(GenerateFrame, max_frame_bytes=256, max_total_bytes=MAX_BYTES)
    reader.feed(data + data[:5])
    assert len(list(reader)) == 1
    with pytest.raises(WireError) as info:
        reader.finish()
    assert info.value.status == 400


# ---- community secret ---------------------------------------------------------------


# ---- layering -----------------------------------------------------------------------


def test_peers_does_not_import_node_or_bandit() -> None:
    code = (
        "import sys, peers.identity, peers.wire, peers.table; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('node', 'bandit')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
