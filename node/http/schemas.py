"""Request and response shapes of the user API: requests validated strictly (unknown fields ignored, as OpenAI
clients send many), responses documented by the same models in /openapi.json."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from node.routing.router import RouteConstraints
from node.validation import _Strict, parse_body  # noqa: F401 (parse_body: the handlers' import)

_MAX_STOPS = 4
_MAX_STOP_CHARS = 200
_MAX_MESSAGES = 512


class TextPart(_Strict):
    """A text part of a multi-part message content."""

    type: Literal["text"]
    text: str


class Message(_Strict):
    """One chat message; content is text or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text, parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    """OpenAI's stream options."""

    include_usage: bool = False


Names = str | Annotated[list[str], Field(max_length=256)]
Score = Annotated[float, Field(ge=0.0, le=1.0)]


class ExpertmeshOptions(_Strict):
    """A chat request's `expertmesh` object: routing constraints and decomposition; the node's own approved set
    always applies too."""

    approved: Names | None = Field(
        default=None, description="node ids, expert ids, model names or families, or sha256 prefixes of 12+ hex digits"
    )
    exclude: Names | None = Field(default=None, description="the same kinds of names, refused")
    local_only: bool = False
    verified_only: bool = Field(default=False, description="only local experts and remote ones this node verified")
    max_latency_ms: Annotated[float, Field(gt=0)] | None = None
    min_scores: Annotated[dict[str, Score], Field(max_length=32)] | None = None
    decompose: bool | None = Field(default=None, description="split a compound `auto` query (default: the node's setting)")

    def constraints(self) -> RouteConstraints:
        """The router's constraints these options ask for."""
        return RouteConstraints(
            approved=_names(self.approved),
            exclude=_names(self.exclude),
            local_only=self.local_only,
            max_latency_ms=self.max_latency_ms,
            min_scores=dict(self.min_scores or {}),
            verified_only=self.verified_only,
        )


def _names(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


StopText = Annotated[str, Field(min_length=1, max_length=_MAX_STOP_CHARS)]


class _Sampling(_Strict):
    """Fields common to chat and text completions."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=_MAX_STOPS)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    expertmesh: dict[str, Any] | None = Field(default=None, description="Ignored: text completions are not routed.")
    response_format: dict[str, Any] | None = None  # checked by node.serving.structured, which names the bad field

    def stop_list(self) -> tuple[str, ...]:
        """Stop sequences as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions` body."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=_MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    expertmesh: ExpertmeshOptions | None = None  # type: ignore[assignment]  # only chat completions are routed

    def options(self) -> ExpertmeshOptions:
        """The request's `expertmesh` options, defaults when absent."""
        return self.expertmesh or ExpertmeshOptions()


class CompletionRequest(_Sampling):
    """`POST /v1/completions` body: one prompt."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def prompt_text(self) -> str:
        """The single prompt."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class FeedbackRequest(_Strict):
    """`POST /v1/feedback` body: a thumbs up or down, or a reward in [0, 1]."""

    decision_id: Annotated[str, Field(min_length=1, max_length=64)]
    token: Annotated[str, Field(min_length=1, max_length=256)]
    rating: Literal["up", "down"] | None = None
    reward: Annotated[float, Field(ge=0.0, le=1.0)] | None = None

    @model_validator(mode="after")
    def _one_of_rating_or_reward(self) -> FeedbackRequest:
        if (self.rating is None) == (self.reward is None):
            raise ValueError("give exactly one of 'rating' (up or down) and 'reward' (0..1)")
        return self


class JudgeRequest(_Strict):
    """`POST /v1/judge` body."""

    expert: Annotated[str, Field(min_length=1, max_length=256)] | None = None  # None: every local expert
    peer: Annotated[str, Field(min_length=1, max_length=64)] | None = None  # a peer's node id
    dimensions: Annotated[list[str], Field(min_length=1, max_length=16)] | None = None
    items_per_dimension: Annotated[int, Field(ge=1, le=1000)] | None = None
    force: bool = False


# ---- responses ----------------------------------------------------------------------
# Handlers build these shapes; /openapi.json documents them from the models below. Extra keys are allowed
# (a newer node may add fields), every field without a default is always present. Streamed chunks are built
# as plain dicts on the hot path and documented by ChatCompletionChunk / TextCompletionChunk.


def json_response(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A response model as JSON: by alias (`from`), optional fields left out unless set."""
    return web.json_response(body.model_dump(mode="json", by_alias=True, exclude_unset=True), status=status, headers=headers)


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


Count = Annotated[int, Field(ge=0)]
FinishReason = Literal["stop", "length"]


class Usage(_Out):
    """Token counts of one answer."""

    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count


class Candidate(_Out):
    """One expert the router weighed, with the probability it had."""

    expert: str
    node: str
    local: bool
    probability: float


class RoutedCandidate(Candidate):
    """A candidate as the explanation shows it: also whether it is verified, and why it is trusted."""

    verified: bool
    evidence: str


class CommunityWeight(_Out):
    """Present when other nodes' users' ratings weighed in the choice: from how many nodes."""

    reporters: Count
    expected_reward: dict[str, float]


class Explanation(_Out):
    """Why the router chose: the task kind, the candidates, the strongest features."""

    task: str
    candidates: list[RoutedCandidate]
    evidence: str
    top_features: list[tuple[str, float]]
    community: CommunityWeight | None = None


class Fallback(_Out):
    """The chosen expert failed and this one answered instead."""

    from_: str = Field(alias="from")
    reason: str


class Provenance(_Out):
    """Who answered; with `model: auto` also the routing decision and how to rate it."""

    expert: str
    node: str
    decision_id: str | None = None
    feedback_token: str | None = None
    probability: float | None = None
    policy_version: Count | None = None
    explanation: Explanation | None = None
    fallback: Fallback | None = None


class AssistantMessage(_Out):
    """The answer's message."""

    role: Literal["assistant"]
    content: str


class ChatChoice(_Out):
    """The one choice of a chat completion."""

    index: Count
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(_Out):
    """`POST /v1/chat/completions` answer."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: Annotated[list[ChatChoice], Field(min_length=1, max_length=1)]
    usage: Usage
    expertmesh: Provenance


class TextChoice(_Out):
    """The one choice of a text completion."""

    index: Count
    text: str
    logprobs: None
    finish_reason: FinishReason


class TextCompletion(_Out):
    """`POST /v1/completions` answer."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: Annotated[list[TextChoice], Field(min_length=1, max_length=1)]
    usage: Usage
    expertmesh: Provenance


class Delta(_Out):
    """The text a stream chunk adds (the first also names the role)."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    """A chunk's choice: a delta, and the finish reason on the last."""

    index: Count
    delta: Delta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Out):
    """One server-sent event of a streamed chat completion; the usage chunk has no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: Annotated[list[ChatChunkChoice], Field(max_length=1)]
    expertmesh: Provenance
    usage: Usage | None = None


class TextChunkChoice(_Out):
    """A text chunk's choice."""

    index: Count
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class TextCompletionChunk(_Out):
    """One server-sent event of a streamed text completion; the usage chunk has no choices."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: Annotated[list[TextChunkChoice], Field(max_length=1)]
    expertmesh: Provenance
    usage: Usage | None = None


class ErrorDetail(_Out):
    """What went wrong; `param` names the bad field."""

    message: str
    type: str
    param: str | None
    code: str | None


class Error(_Out):
    """OpenAI's error body."""

    error: ErrorDetail


class ModelDetails(_Out):
    """What the node knows of an expert's model."""

    name: str
    sha256: str
    family: str | None = None
    quantization: str | None = None
    prompt_style: Literal["chat", "completion"]
    n_ctx: Count
    size_bytes: Count | None = None
    queue_depth: Count
    local: bool
    nodes: list[str] | None = None


class Model(_Out):
    """An expert, or `auto` (route) without details."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    expertmesh: ModelDetails | None = None


class ModelList(_Out):
    """`GET /v1/models` answer."""

    object: Literal["list"]
    data: list[Model]


class Feedback(_Out):
    """`POST /v1/feedback` answer: the rating is stored."""

    decision_id: str
    reward: Score
    recorded: Literal[True]
    policy_version: Count


class Decision(_Out):
    """A routing decision as recorded, with its reward."""

    decision_id: str
    created_ms: int
    task: str
    policy_version: Count
    status: Literal["pending", "fallback", "rated"]
    chosen: Candidate
    served: Candidate
    fallback_reason: str | None
    candidates: Annotated[list[Candidate], Field(min_length=1)]
    reward: Score | None


class Reach(_Out):
    """How this node reaches a peer: directly, through a hole punched with a relay's help, or through a relay."""

    kind: Literal["direct", "hole-punched", "relayed"]
    via: str | None = Field(description="the relay node's id (relayed or hole-punched)")
    via_url: str | None


class Evidence(_Out):
    """One thing a peer did that changed this node's trust in it."""

    kind: str
    detail: str
    at_ms: int


class Peer(_Out):
    """One peer this node knows, with this node's trust in it."""

    id: str
    url: str
    alive: bool
    rtt_ms: float | None
    reach: Reach
    last_seen_ms: int
    source: Literal["mdns", "bootstrap", "exchange"]
    experts: list[str]
    trust: float | None = None
    distrusted: bool | None = None
    evidence: list[Evidence] | None = None


class PeerList(_Out):
    """`GET /v1/peers` answer."""

    object: Literal["list"]
    node_id: str
    data: list[Peer]


class JudgingState(_Out):
    """A local expert's judging progress."""

    state: Literal["unjudged", "judging", "judged", "failed"]
    done: Count
    total: Count
    error: str | None


class ScoreSummary(_Out):
    """A dimension's mean score with its 95% interval and sample size."""

    mean: float
    ci_low: float
    ci_high: float
    n: Count


class Performance(_Out):
    """Measured speed of an expert."""

    tokens_per_s: float
    ttft_ms: float
    n_ctx: Count


class CapabilityCard(_Out):
    """A signed capability card: who judged which expert, on which suite, with which scores."""

    judge: str
    owner: str
    self_judged: bool
    expert: str
    model_sha256: str
    suite_version: str
    sample: str
    issued_ms: int
    scores: dict[str, ScoreSummary]
    performance: Performance


class Flag(_Out):
    """An owner's claim an independent judge contradicts."""

    dimension: str
    owner_score: float
    independent_score: float
    judge: str


class ExpertView(_Out):
    """One known expert, local or remote, with its cards and this node's view of it."""

    id: str
    node: str
    local: bool
    model_sha256: str
    queue_depth: Count
    capacity: Count
    judging: JudgingState | None
    judged: bool
    scores: dict[str, float]
    evidence: str
    verified: bool
    cards: list[CapabilityCard]
    flags: list[Flag]


class ExpertList(_Out):
    """`GET /v1/experts` answer."""

    object: Literal["list"]
    data: list[ExpertView]


class RewardPoint(_Out):
    """Mean reward of one time bucket."""

    t_ms: int
    reward: float
    n: Count


class RouterStats(_Out):
    """`GET /v1/router/stats` answer: reward over time and routing shares."""

    decisions: Count
    rated: Count
    mean_reward: float | None
    policy_version: Count
    reward_over_time: list[RewardPoint]
    share_by_expert: dict[str, Count]
    share_by_task: dict[str, dict[str, Count]]
    community: dict[str, Any] | None = Field(default=None, description="Community learning: what is shared, each reporter's weight.")


class HealthExpert(_Out):
    """A loaded expert's load."""

    id: str
    queue_depth: Count
    capacity: Count
    parallel: Count | None = None
    running: Count | None = None
    waiting: Count | None = None
    tokens_per_s: float | None = None
    worker_restarts: Count | None = None
    safe_cpu_kernels: bool | None = None


class Health(_Out):
    """`GET /healthz` answer."""

    status: Literal["ok"]
    node_id: str
    uptime_s: float
    experts: list[HealthExpert]


class InviteRequest(_Strict):
    """`POST /v1/invites` body (optional)."""

    ttl_s: Annotated[float, Field(gt=0, le=365 * 86400)] | None = None
    one_time: bool | None = None


class Invite(_Out):
    """A one-line invite, signed by this node."""

    invite: str
    expires_ms: int
    one_time: bool
    relay: bool


class JoinRequest(_Strict):
    """`POST /v1/join` body."""

    invite: str


class Joined(_Out):
    """The inviter admitted this node."""

    joined: str
    relayed: bool


class Admission(_Out):
    """A node admitted by invite."""

    id: str
    admitted_ms: int
    revoked_ms: int | None
    tunnel: bool


class AdmissionList(_Out):
    """`GET /v1/admissions` answer: admitted nodes and the relay's state."""

    object: Literal["list"]
    relay: bool
    tunnels: list[str]
    active_streams: int
    relayed_bytes: int
    data: list[Admission]


class Revoked(_Out):
    """A node's admission is revoked."""

    node_id: str
    revoked: bool


class DirectoryEntry(_Out):
    """A node card heard of by gossip."""

    id: str
    issued_ms: int
    addresses: list[str]
    experts: list[str]
    news: bool


class DirectoryList(_Out):
    """`GET /v1/directory` answer."""

    object: Literal["list"]
    node_id: str
    data: list[DirectoryEntry]
