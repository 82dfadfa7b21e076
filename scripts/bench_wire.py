"""Peer wire decoding: decode+validate time per message for pydantic (today's peers.wire), msgspec and the old decoder.

The baseline is the hand-written validator peers/wire.py had before it moved to pydantic, loaded from git
(commit BASELINE_COMMIT) and measured in the same run on the same bytes. msgspec is measured on Struct
mirrors of the same messages with the same bounds (`pip install msgspec`; skipped when absent).
"""


import argparse  # no `from __future__ import annotations`: msgspec resolves the local Structs' hints at runtime
import importlib.util
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peers import wire  # noqa: E402 (after the path insert)
from peers.identity import NodeIdentity  # noqa: E402

BASELINE_COMMIT = "c376ad3"  # the last commit with the hand-written `Limit` validator
MAX_BYTES = 1 << 20


def _legacy_wire() -> types.ModuleType:
    """The old peers/wire.py as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:peers/wire.py"], check=True, capture_output=True, text=True
    ).stdout
    spec = importlib.util.spec_from_loader("legacy_wire", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["legacy_wire"] = module  # dataclasses look their module up while resolving hints
    exec(compile(source, "legacy_wire.py", "exec"), module.__dict__)  # noqa: S102 -- our own file, from our own git
    return module


def _samples() -> dict[str, tuple[bytes, str]]:
    """Encoded sample messages (the bytes every decoder reads) and their type names."""
    identity = NodeIdentity.generate()
    experts = [
        wire.ExpertInfo(
            expert_id=f"smollm2-135m@{i:012x}", name="SmolLM2 135M", family="smollm2", params="135M",
            quantization="Q8_0", sha256="ab" * 32, prompt_style="chat", n_ctx=2048, queue_depth=1, queue_size=8,
            tokens_per_s=42.5, cards=(b"c" * 300,), parallel=4,
        )
        for i in range(3)
    ]
    card = wire.NodeCard(
        node_id=identity.node_id, public_key=identity.public_key_raw,
        addresses=("http://192.168.1.7:8470", "https://node.example:443/mesh"), experts=tuple(experts),
        issued_ms=1_700_000_000_000,
    )
    hello = wire.Hello(card=wire.sign_card(card, identity), sent_ms=123)
    request = wire.GenerateRequest(
        request_id="req-1", expert_id="smollm2-135m@000000000000",
        messages=(wire.ChatMessage("system", "Be brief."), wire.ChatMessage("user", "What is the capital of France?")),
        max_tokens=64, temperature=0.7, top_p=None, stop=("\n\n",), seed=7, origin_node=identity.node_id, hops=1,
    )
    frame = wire.GenerateFrame(kind="delta", text=" Paris")
    return {
        "Hello (3 experts)": (wire.encode(hello), "Hello"),
        "GenerateRequest": (wire.encode(request), "GenerateRequest"),
        "GenerateFrame": (wire.encode(frame), "GenerateFrame"),
    }


def _msgspec_decoders() -> dict[str, Callable[[bytes], Any]] | None:
    """msgspec Struct mirrors of the sampled messages, with the same bounds; None when msgspec is absent."""
    try:
        import msgspec
    except ImportError:
        return None
    from msgspec import Meta, Struct

    hex64 = Annotated[str, Meta(min_length=64, max_length=64, pattern="^[0-9a-f]*$")]
    url = Annotated[str, Meta(min_length=1, max_length=200)]
    # msgspec has no stubs installed here, so mypy sees an Any base and rejects the `frozen` class keyword.

    class ExpertInfo(Struct, frozen=True):  # type: ignore[call-arg]
        expert_id: Annotated[str, Meta(min_length=1, max_length=128)]
        name: Annotated[str, Meta(max_length=200)]
        family: Annotated[str, Meta(max_length=64)] | None
        params: Annotated[str, Meta(max_length=32)] | None
        quantization: Annotated[str, Meta(max_length=32)] | None
        sha256: hex64
        prompt_style: Literal["chat", "completion"]
        n_ctx: Annotated[int, Meta(ge=1)]
        queue_depth: Annotated[int, Meta(ge=0)]
        queue_size: Annotated[int, Meta(ge=0)]
        tokens_per_s: Annotated[float, Meta(ge=0)] | None
        cards: Annotated[tuple[Annotated[bytes, Meta(max_length=4096)], ...], Meta(max_length=16)] = ()
        parallel: Annotated[int, Meta(ge=1, le=256)] = 1
        base_sha256: Annotated[str, Meta(max_length=64, pattern="^[0-9a-f]*$")] = ""
        definition_digest: Annotated[str, Meta(max_length=64, pattern="^[0-9a-f]*$")] = ""
        description: Annotated[str, Meta(max_length=300)] = ""

    class NodeCard(Struct, frozen=True):  # type: ignore[call-arg]
        node_id: Annotated[str, Meta(min_length=1, max_length=64)]
        public_key: Annotated[bytes, Meta(min_length=32, max_length=32)]
        addresses: Annotated[tuple[url, ...], Meta(max_length=16)]
        experts: Annotated[tuple[ExpertInfo, ...], Meta(max_length=64)]
        issued_ms: Annotated[int, Meta(ge=0)]
        card_digest: Annotated[str, Meta(max_length=16, pattern="^[0-9a-f]*$")] = ""

    class SignedCard(Struct, frozen=True):  # type: ignore[call-arg]
        card: NodeCard
        signature: Annotated[bytes, Meta(min_length=64, max_length=64)]

    class Hello(Struct, frozen=True):  # type: ignore[call-arg]
        v: int
        type: str
        card: SignedCard
        sent_ms: Annotated[int, Meta(ge=0)]
        learning: Annotated[bytes, Meta(max_length=wire.MAX_LEARNING_BYTES)] = b""

    class ChatMessage(Struct, frozen=True):  # type: ignore[call-arg]
        role: Annotated[str, Meta(min_length=1, max_length=32)]
        content: str

    class GenerateRequest(Struct, frozen=True):  # type: ignore[call-arg]
        v: int
        type: str
        request_id: Annotated[str, Meta(min_length=1, max_length=128)]
        expert_id: Annotated[str, Meta(min_length=1, max_length=128)]
        messages: Annotated[tuple[ChatMessage, ...], Meta(min_length=1, max_length=256)]
        max_tokens: Annotated[int, Meta(ge=1)] | None
        temperature: Annotated[float, Meta(ge=0, le=2)] | None
        top_p: Annotated[float, Meta(ge=0, le=1)] | None
        stop: Annotated[tuple[Annotated[str, Meta(min_length=1, max_length=256)], ...], Meta(max_length=4)]
        seed: int | None
        origin_node: Annotated[str, Meta(min_length=1, max_length=64)]
        hops: Annotated[int, Meta(ge=0)]
        response_format: Annotated[str, Meta(max_length=wire.MAX_RESPONSE_FORMAT_CHARS)] | None = None

    class GenerateFrame(Struct, frozen=True):  # type: ignore[call-arg]
        v: int
        type: str
        kind: Literal["delta", "done", "error"]
        text: str = ""
        finish_reason: Annotated[str, Meta(max_length=32)] | None = None
        prompt_tokens: Annotated[int, Meta(ge=0)] = 0
        completion_tokens: Annotated[int, Meta(ge=0)] = 0
        error: Annotated[str, Meta(max_length=2000)] | None = None
        node_id: Annotated[str, Meta(max_length=64)] = ""
        expert_id: Annotated[str, Meta(max_length=128)] = ""

    hello_decoder = msgspec.msgpack.Decoder(Hello)

    def hello(data: bytes) -> Any:
        msg = hello_decoder.decode(data)
        for address in msg.card.card.addresses:  # the URL check has no msgspec constraint; run the same function
            wire._http_url(address)
        return msg

    return {
        "Hello": hello,
        "GenerateRequest": msgspec.msgpack.Decoder(GenerateRequest).decode,
        "GenerateFrame": msgspec.msgpack.Decoder(GenerateFrame).decode,
    }


def _decoder(decode: Callable[..., Any], cls: type) -> Callable[[bytes], Any]:
    """`decode` bound to one message type and the byte cap, as the one-argument decoder `_per_message_us` times."""
    return lambda data: decode(data, cls, max_bytes=MAX_BYTES)


def _per_message_us(decode: Callable[[bytes], Any], data: bytes, n: int, rounds: int) -> float:
    """Best of `rounds` mean times, in microseconds, of decoding `data` `n` times."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            decode(data)
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="decodes per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    legacy = _legacy_wire()
    fast = _msgspec_decoders()
    sys.stdout.write(f"decode+validate, microseconds per message (best of {args.rounds} x {args.n}); ratio = old / new\n")
    sys.stdout.write(f"{'message':<20} {'bytes':>6} {'old (hand)':>11} {'pydantic':>10} {'ratio':>7} {'msgspec':>9} {'ratio':>7}\n")
    for label, (data, name) in _samples().items():
        old_cls, new_cls = getattr(legacy, name), getattr(wire, name)
        assert wire.decode(data, new_cls, max_bytes=MAX_BYTES) is not None
        old_us = _per_message_us(_decoder(legacy.decode, old_cls), data, args.n, args.rounds)
        new_us = _per_message_us(_decoder(wire.decode, new_cls), data, args.n, args.rounds)
        row = f"{label:<20} {len(data):>6} {old_us:>11.1f} {new_us:>10.1f} {old_us / new_us:>6.1f}x"
        if fast is not None:
            fast_us = _per_message_us(fast[name], data, args.n, args.rounds)
            row += f" {fast_us:>9.1f} {old_us / fast_us:>6.1f}x"
        else:
            row += "   (msgspec not installed)"
        sys.stdout.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
