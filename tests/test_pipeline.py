"""The query pipeline over in-process fake experts: failover, decomposition, admission and feedback, deterministically."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.errors import ExpertBusy, InvalidRequest, PeerUnavailable
from node.mesh.network import RemoteExpert
from node.mesh.remote_expert import Remote
from node.pipeline import PartServed, Query, QueryPipeline
from node.pipeline.execute import Exhausted, first_answering
from node.routing.router import Router
from node.serving.expert import Expert, TrustEvidence, classify_peer_failure, run
from node.serving.experts import ChatMessage, Delta, Finished, GenerationParams
from peers.client import PeerProtocolError, PeerRejected, PeerTimedOut, PeerUnreachable
from peers.table import PeerState
from peers.wire import ExpertInfo, GenerateFrame
from tests.fakes import FakeExpert, FakePeerClient, TrustRecorder

PARAMS = GenerationParams(max_tokens=64, temperature=0.0)
COMPOUND = "Translate 'cat' into French. What is 12 plus 7?"


def _chat(text: str) -> tuple[ChatMessage, ...]:
    return (ChatMessage("user", text),)


class _Source:
    """The pipeline's expert source over a fixed list (all local)."""

    def __init__(self, experts: list[FakeExpert]) -> None:
        self.experts = experts

    def local(self) -> list[Expert]:
        return list(self.experts)

    def local_named(self, expert_id: str) -> Expert | None:
        return next((e for e in self.experts if e.card.expert_id == expert_id), None)

    def hosts_of(self, expert_id: str) -> list[Expert]:
        return []

    def remote(self) -> list[Expert]:
        return []


@pytest.fixture
async def make_pipeline(tmp_path: Path) -> AsyncIterator:
    routers: list[Router] = []

    async def make(experts: list[FakeExpert]) -> tuple[QueryPipeline, Router]:
        data_dir = tmp_path / f"r{len(routers)}"
        data_dir.mkdir()
        router = Router(lambda: experts, data_dir, plain_words=True)
        await router.start()
        routers.append(router)
        return QueryPipeline(router, _Source(experts), proposer_min_score=2.0), router

    yield make
    for router in routers:
        await router.close()


async def _drain(events) -> tuple[str, Finished, list[PartServed]]:
    texts: list[str] = []
    served: list[PartServed] = []
    finished = None
    async for event in events:
        if isinstance(event, PartServed):
            served.append(event)
        elif isinstance(event, Delta):
            texts.append(event.text)
        else:
            finished = event
    assert isinstance(finished, Finished)
    return "".join(texts), finished, served


def _remote(client: FakePeerClient, network: TrustRecorder, node_id: str = "node-peer") -> Remote:
    info = ExpertInfo(
        expert_id="peer-model@abc", name="peer-model", family="fake", params="1M", quantization="f32",
        sha256="ab" * 32, prompt_style="chat", n_ctx=512, queue_depth=0, queue_size=3, tokens_per_s=None,
    )
    peer = PeerState(node_id, "http://127.0.0.1:1", None, 1.0, 0, 0, 0, "bootstrap", True)  # type: ignore[arg-type]
    return Remote(RemoteExpert(info, peer), client, network)  # type: ignore[arg-type]


# ---- failover and trust evidence -----------------------------------------------------------


async def test_the_first_expert_failing_before_a_token_hands_over_to_the_second() -> None:
    broken = FakeExpert("broken@1", fail=PeerUnavailable("down"))
    working = FakeExpert("working@2")
    started = await first_answering([broken, working], _chat("hi"), PARAMS)
    text, finished, _ = await _drain(started.events)
    assert (started.expert, started.position) == (working, 1)
    assert text == "working@2 says: hi" and finished.finish_reason == "stop"
    assert [f.describe() for f in started.failures] == ["broken@1 on node-a: down"]
    assert broken.held == working.held == 0


async def test_a_peer_sending_garbage_is_recorded_as_typed_evidence_and_the_next_expert_answers() -> None:
    network = TrustRecorder()
    peer = _remote(FakePeerClient(error=PeerProtocolError("not msgpack")), network)
    local = FakeExpert("local@1")
    started = await first_answering([peer, local], _chat("hi"), PARAMS)
    text, _, _ = await _drain(started.events)
    assert started.expert is local and text == "local@1 says: hi"
    assert network.evidence == [("node-peer", TrustEvidence.GARBAGE)]


async def test_a_peer_breaking_off_mid_answer_is_evidence_and_an_error_for_the_client() -> None:
    network = TrustRecorder()
    peer = _remote(FakePeerClient(frames=[GenerateFrame(kind="delta", text="Hel")], error=PeerUnreachable("reset")), network)
    started = await first_answering([peer], _chat("hi"), PARAMS)
    with pytest.raises(PeerUnavailable, match="mid-answer"):
        await _drain(started.events)
    assert network.evidence == [("node-peer", TrustEvidence.BROKE_STREAM)]


async def test_a_busy_peer_is_busy_not_misbehaving() -> None:
    network = TrustRecorder()
    peer = _remote(FakePeerClient(error=PeerRejected(429, "busy", retry_after_s=3)), network)
    with pytest.raises(Exhausted) as caught:
        await first_answering([peer], _chat("hi"), PARAMS)
    error = caught.value.failures[0].error
    assert isinstance(error, ExpertBusy) and error.retry_after_s == 3
    assert network.evidence == []


@pytest.mark.parametrize(
    ("error", "mid_stream", "expected"),
    [
        (PeerRejected(404, "no such expert"), False, TrustEvidence.MISSING_EXPERT),
        (PeerRejected(429, "busy"), False, None),
        (PeerRejected(500, "oops"), False, None),
        (PeerProtocolError("bad frame"), False, TrustEvidence.GARBAGE),
        (PeerProtocolError("bad frame"), True, TrustEvidence.GARBAGE),
        (PeerTimedOut("silent"), False, TrustEvidence.TIMEOUT),
        (PeerTimedOut("silent"), True, TrustEvidence.TIMEOUT),
        (PeerUnreachable("refused"), False, None),
        (PeerUnreachable("reset"), True, TrustEvidence.BROKE_STREAM),
        (StopAsyncIteration(), True, TrustEvidence.BROKE_STREAM),
    ],
)
def test_one_classifier_turns_peer_failures_into_evidence(error, mid_stream, expected) -> None:
    assert classify_peer_failure(error, mid_stream=mid_stream) is expected


async def test_a_routed_query_falls_back_and_the_ledger_says_so(make_pipeline) -> None:
    # Whichever expert the bandit samples, it has no answer left: the other one must answer.
    first = FakeExpert("first@1", answers_left=0)
    second = FakeExpert("second@2", answers_left=0)
    pipeline, router = await make_pipeline([first, second])
    # Only the one the bandit did not choose gets an answer, so the chosen one fails before its first token.
    routed = await router.route("hi", Query("auto", _chat("hi"), PARAMS).constraints)
    chosen = routed.candidates[routed.decision.chosen_index].expert
    other = second if chosen is first else first
    other.answers_left = 1
    started, provenance = await pipeline._start_routed(routed, _chat("hi"), PARAMS)
    text, _, _ = await _drain(started.events)
    assert started.expert is other and text.startswith(other.card.expert_id)
    assert provenance["fallback"]["from"] == chosen.card.expert_id
    decision, _ = await router.decision(routed.decision.decision_id)
    assert decision.candidates[decision.served_index].expert_id == other.card.expert_id
    assert decision.fallback_reason and chosen.card.expert_id in decision.fallback_reason
    assert first.held == second.held == 0


async def test_a_query_every_expert_refuses_as_malformed_leaves_no_decision(make_pipeline) -> None:
    experts = [FakeExpert("a@1", fail=InvalidRequest("too long")), FakeExpert("b@2", fail=InvalidRequest("too long"))]
    pipeline, router = await make_pipeline(experts)
    with pytest.raises(InvalidRequest):
        await pipeline.answer(Query("auto", _chat("hi"), PARAMS))
    assert (await router.stats())["decisions"] == 0


# ---- decomposition ---------------------------------------------------------------------------


async def test_a_compound_query_is_answered_in_two_parts_by_two_experts_and_composed(make_pipeline) -> None:
    # Each expert answers once: the second part cannot go where the first went.
    one, two = FakeExpert("one@1", answers_left=1), FakeExpert("two@2", answers_left=1)
    pipeline, router = await make_pipeline([one, two])
    answer = await pipeline.answer(Query("auto", _chat(COMPOUND), PARAMS, decompose=True))
    text, finished, served = await _drain(answer.events)
    parts = answer.provenance["parts"]
    first_expert = answer.expert_id
    second_expert = served[0].expert_id
    assert {first_expert, second_expert} == {"one@1", "two@2"}
    assert [p["task"] for p in parts][1] == "arithmetic" and answer.provenance["decomposed"] is True
    assert text.startswith("**1. Translate 'cat' into French.**")
    assert "\n\n**2. What is 12 plus 7?**" in text
    assert f"{first_expert} says: Translate 'cat' into French." in text and f"{second_expert} says: What is 12 plus 7?" in text
    assert finished.completion_tokens > 0 and one.held == two.held == 0
    assert (await router.stats())["decisions"] == 2


async def test_decomposition_is_off_unless_asked(make_pipeline) -> None:
    pipeline, _ = await make_pipeline([FakeExpert("only@1")])
    answer = await pipeline.answer(Query("auto", _chat(COMPOUND), PARAMS))
    text, _, served = await _drain(answer.events)
    assert "parts" not in answer.provenance and served == [] and text == f"only@1 says: {COMPOUND}"


# ---- admission ---------------------------------------------------------------------------------


async def test_a_cancelled_stream_gives_its_place_back() -> None:
    expert = FakeExpert("slow@1", hang_after_first=True, capacity=1)
    started = await first_answering([expert], _chat("hi"), PARAMS)
    assert expert.held == 1

    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in started.events:
            got_first.set()  # the consumer goes straight on into the hanging step

    task = asyncio.create_task(consume())
    await got_first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert expert.held == 0
    # And the one place is free for the next request.
    started = await first_answering([FakeExpert("x@2"), expert], _chat("again"), PARAMS)
    await started.events.aclose()


async def test_a_consumer_failing_mid_stream_gives_the_place_back() -> None:
    expert = FakeExpert("e@1", capacity=1)
    with pytest.raises(RuntimeError):
        async with run_closing(expert) as events:
            async for _ in events:
                raise RuntimeError("the client went away")
    assert expert.held == 0


async def test_a_failure_before_the_first_token_holds_nothing() -> None:
    expert = FakeExpert("e@1", capacity=1, fail=ExpertBusy("full", retry_after_s=1))
    with pytest.raises(Exhausted):
        await first_answering([expert], _chat("hi"), PARAMS)
    assert expert.held == 0


async def test_a_full_expert_refuses_at_once() -> None:
    expert = FakeExpert("e@1", capacity=1, hang_after_first=True)
    started = await first_answering([expert], _chat("one"), PARAMS)
    with pytest.raises(Exhausted) as caught:
        await first_answering([expert], _chat("two"), PARAMS)
    assert isinstance(caught.value.failures[0].error, ExpertBusy)
    await started.events.aclose()
    assert expert.held == 0


def run_closing(expert: FakeExpert):
    """`run` under `aclosing`, as every caller that may stop early uses it."""
    from contextlib import aclosing

    return aclosing(run(expert, _prepared(), PARAMS))


def _prepared():
    from node.serving.expert import Prepared

    return Prepared(messages=_chat("hi"))


# ---- feedback ----------------------------------------------------------------------------------


async def test_feedback_on_an_answer_reaches_the_ledger_and_the_policy(make_pipeline) -> None:
    pipeline, router = await make_pipeline([FakeExpert("a@1"), FakeExpert("b@2")])
    answer = await pipeline.answer(Query("auto", _chat("What is 2 plus 2?"), PARAMS))
    await _drain(answer.events)
    before = router.policy_version
    await router.feedback(answer.provenance["decision_id"], answer.provenance["feedback_token"], 1.0)
    decision, reward = await router.decision(answer.provenance["decision_id"])
    assert reward == 1.0 and router.policy_version == before + 1
    assert decision.candidates[decision.chosen_index].expert_id == answer.expert_id


async def test_feedback_on_a_decomposed_answer_rates_every_part(make_pipeline) -> None:
    pipeline, router = await make_pipeline([FakeExpert("a@1"), FakeExpert("b@2")])
    answer = await pipeline.answer(Query("auto", _chat(COMPOUND), PARAMS, decompose=True))
    await _drain(answer.events)
    await router.feedback(answer.provenance["decision_id"], answer.provenance["feedback_token"], 0.0)
    for part in answer.provenance["parts"]:
        assert (await router.decision(part["decision_id"]))[1] == 0.0
    assert router.policy_version == 2


async def test_an_answer_closed_before_it_is_read_gives_its_place_back(make_pipeline) -> None:
    # An HTTP client can go away between the answer starting and its first byte: nothing may stay held.
    one, two = FakeExpert("one@1"), FakeExpert("two@2")
    pipeline, _ = await make_pipeline([one, two])
    for decompose in (False, True):
        answer = await pipeline.answer(Query("auto", _chat(COMPOUND), PARAMS, decompose=decompose))
        assert one.held + two.held == 1
        await answer.events.aclose()
        assert one.held == two.held == 0


class _Hosts(_Source):
    """An expert source whose only expert is hosted by peers."""

    def __init__(self, hosts: list[Remote]) -> None:
        super().__init__([])
        self.hosts = hosts

    def hosts_of(self, expert_id: str) -> list[Expert]:
        return [h for h in self.hosts if h.card.expert_id == expert_id]

    def remote(self) -> list[Expert]:
        return list(self.hosts)


async def test_a_named_remote_expert_is_asked_host_by_host(make_pipeline) -> None:
    network = TrustRecorder()
    done = GenerateFrame(kind="done", finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    garbage = _remote(FakePeerClient(error=PeerProtocolError("junk")), network, "node-junk")
    good = _remote(FakePeerClient(frames=[GenerateFrame(kind="delta", text="Hi"), done]), network, "node-good")
    _, router = await make_pipeline([])
    pipeline = QueryPipeline(router, _Hosts([garbage, good]), proposer_min_score=2.0)
    answer = await pipeline.answer(Query("peer-model@abc", _chat("hi"), PARAMS))
    text, _, _ = await _drain(answer.events)
    assert (answer.node_id, text) == ("node-good", "Hi")
    assert network.evidence == [("node-junk", TrustEvidence.GARBAGE)] and network.good == ["node-good"]


async def test_every_host_busy_is_busy_with_the_shortest_wait(make_pipeline) -> None:
    network = TrustRecorder()
    hosts = [
        _remote(FakePeerClient(error=PeerRejected(429, "busy", retry_after_s=5)), network, "node-1"),
        _remote(FakePeerClient(error=PeerRejected(429, "busy", retry_after_s=2)), network, "node-2"),
    ]
    _, router = await make_pipeline([])
    pipeline = QueryPipeline(router, _Hosts(hosts), proposer_min_score=2.0)
    with pytest.raises(ExpertBusy, match="every peer hosting peer-model@abc is busy") as caught:
        await pipeline.answer(Query("peer-model@abc", _chat("hi"), PARAMS))
    assert caught.value.retry_after_s == 2 and network.evidence == []
