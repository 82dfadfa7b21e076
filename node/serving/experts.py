"""Local expert pool: one llama.cpp model per expert in its own worker process, slots plus a bounded queue in front."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NewType, Protocol

import jinja2

from node.errors import ExpertBusy, ExpertFailed, InvalidRequest
from node.serving.batching import Done, Failed, FinishReason, SlotRequest, StepEvent, TextOut
from node.serving.catalog import CATALOG, ModelFile
from node.serving.structured import check_grammar
from node.serving.worker import ModelWorker, WorkerConfig, WorkerCrashed

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

ExpertId = NewType("ExpertId", str)
PromptStyle = Literal["chat", "completion"]

# A base model is asked as a plain Q/A transcript; these end its answer before it invents the next turn.
COMPLETION_STOPS: tuple[str, ...] = ("\nQ:", "\n\n", "\nUser:", "<end_of_turn>")


@dataclass(frozen=True)
class ExpertSpec:
    """What a local expert is: a GGUF file plus how to prompt it."""

    id: ExpertId
    name: str
    path: Path
    sha256: str
    size_bytes: int
    family: str | None
    quantization: str | None
    prompt_style: PromptStyle
    n_ctx: int
    params: str | None = None  # parameter count as a label, e.g. "135M"


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation, text only."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one request."""

    max_tokens: int
    temperature: float = 0.8
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Run alone in a clean slot, so the output is exactly a one-sequence llama.cpp run's (judging uses it).
    solo: bool = False
    grammar: str | None = None  # llama.cpp GBNF the output must match (response_format, a specialist's constraint)
    response_format: str | None = None  # the client's OpenAI response_format as JSON text, for a peer to rebuild `grammar`


@dataclass(frozen=True)
class Delta:
    """A piece of generated text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of a generation, with its token accounting."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cells were reused from an earlier request


GenerationEvent = Delta | Finished


def expert_id_for(name: str, sha256: str) -> ExpertId:
    """A stable id: the model's name and the first 12 hex digits of its sha256."""
    return ExpertId(f"{name}@{sha256[:12]}")


def completion_prompt(messages: Sequence[ChatMessage]) -> str:
    """Render a conversation as a Q/A transcript for a base model with no chat template."""
    lines: list[str] = []
    system = [m.content.strip() for m in messages if m.role in ("system", "developer")]
    if system:
        lines.append("\n".join(system))
        lines.append("")
    turns = [m for m in messages if m.role in ("user", "assistant")]
    for message in turns:
        prefix = "Q:" if message.role == "user" else "A:"
        lines.append(f"{prefix} {message.content.strip()}")
    if not turns or turns[-1].role == "user":
        lines.append("A:")
    return "\n".join(lines)


class LocalExpert:
    """One model served by its own worker process with continuous batching, and a bounded admission count."""

    def __init__(self, spec: ExpertSpec, tokenizer: Llama, worker: ModelWorker, queue_size: int) -> None:
        self.spec = spec
        self._tokenizer = tokenizer  # a vocab-only llama.cpp model: prompts are tokenized here, not in the worker
        self._worker = worker
        self._queue_size = queue_size
        self.parallel = worker.info.parallel if worker.info is not None else 1
        self._pending = 0  # running + waiting; touched only on the event loop
        self._chat_formatter = _chat_formatter(tokenizer) if spec.prompt_style == "chat" else None
        self._recent_s: list[float] = []
        self._ids = itertools.count(1)

    @property
    def queue_depth(self) -> int:
        """Requests running or waiting on this expert."""
        return self._pending

    @property
    def running(self) -> int:
        """Admitted requests holding a sequence slot."""
        return min(self._pending, self.parallel)

    @property
    def waiting(self) -> int:
        """Admitted requests waiting for a slot."""
        return max(0, self._pending - self.parallel)

    @property
    def capacity(self) -> int:
        """Most requests admitted at once: one per slot plus the queue."""
        return self.parallel + self._queue_size

    @property
    def restarts(self) -> int:
        """How often the worker process was restarted after dying."""
        return self._worker.restarts

    @property
    def worker_pid(self) -> int | None:
        """The worker process id (None while it restarts)."""
        return self._worker.pid

    @property
    def safe_cpu_kernels(self) -> bool:
        """Whether the worker runs without llama.cpp's repacked CPU kernels."""
        info = self._worker.info
        return bool(info and info.safe_cpu_kernels)

    def tokens_per_s(self) -> float:
        """Tokens generated per second by all slots together, over the last seconds of work."""
        return self._worker.tokens_per_s()

    def average_request_s(self) -> float | None:
        """Mean duration of the last requests, None before the first."""
        return sum(self._recent_s) / len(self._recent_s) if self._recent_s else None

    def retry_after_s(self) -> int:
        """A hint for a refused client: about when the requests ahead of it have got a slot and finished."""
        average_s = self.average_request_s()
        average_s = 1.0 if average_s is None else average_s
        # Slots drain in parallel: the waiting requests need waiting/parallel rounds, plus one for this one.
        return max(1, math.ceil(average_s * (self.waiting + 1) / self.parallel))

    def close(self) -> None:
        """Stop the worker process and free the tokenizer."""
        self._worker.close()
        close = getattr(self._tokenizer, "close", None)
        if close is not None:
            close()

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> tuple[list[int], tuple[str, ...]]:
        """Prompt tokens and the style's own stop strings for a conversation."""
        if self._chat_formatter is not None:
            try:
                result = self._chat_formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
            except jinja2.TemplateError as exc:
                # Templates reject some conversations (roles out of order, say): the client's to fix.
                raise InvalidRequest(f"the expert's chat template refused these messages: {exc}", param="messages") from exc
            tokens = self._tokenizer.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
            stops = result.stop if isinstance(result.stop, list) else ([result.stop] if result.stop else [])
            return tokens, tuple(stops)
        return self.tokenize_text(completion_prompt(messages)), COMPLETION_STOPS

    def tokenize_text(self, prompt: str) -> list[int]:
        """Prompt tokens for a raw completion prompt."""
        return self._tokenizer.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def admit(self) -> None:
        """Take a place (a slot or the queue) or refuse at once with 429."""
        if self._pending >= self.capacity:
            raise ExpertBusy(
                f"expert {self.spec.id} is busy ({self._pending} requests in flight); retry later",
                retry_after_s=self.retry_after_s(),
            )
        self._pending += 1

    def release(self) -> None:
        """Give back a place taken by `admit`."""
        self._pending -= 1

    async def generate(
        self, prompt_tokens: list[int], style_stops: Sequence[str], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        """Stream a generation for admitted prompt tokens (callers go through `node.serving.expert.Local.admit`)."""
        n_ctx = self.spec.n_ctx
        if not prompt_tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if len(prompt_tokens) >= n_ctx:
            raise InvalidRequest(
                f"the prompt is {len(prompt_tokens)} tokens; expert {self.spec.id} has a context of {n_ctx}",
                param="messages",
            )
        if params.grammar is not None:
            check_grammar(params.grammar)  # llama.cpp is handed only grammars its parser takes (node/serving/gbnf.py)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StepEvent | WorkerCrashed] = asyncio.Queue()

        def sink(event: StepEvent | WorkerCrashed) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass  # the loop that asked is gone; nobody is listening

        request = SlotRequest(
            request_id=next(self._ids),
            prompt=tuple(prompt_tokens),
            max_tokens=min(params.max_tokens, n_ctx - len(prompt_tokens)),
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stops=tuple(dict.fromkeys([*params.stop, *style_stops])),
            solo=params.solo,
            grammar=params.grammar,
        )
        started_s = time.perf_counter()
        try:
            self._worker.submit(request, sink)
        except WorkerCrashed as exc:
            raise ExpertFailed(f"expert {self.spec.id} failed: {exc}") from exc
        ended = False
        try:
            while True:
                item = await events.get()
                if isinstance(item, TextOut):
                    yield Delta(item.text)
                elif isinstance(item, Done):
                    ended = True
                    yield Finished(item.finish_reason, item.prompt_tokens, item.completion_tokens, item.cached_tokens)
                    break
                elif isinstance(item, Failed):
                    ended = True
                    log.error("expert %s failed: %s", self.spec.id, item.message)
                    raise ExpertFailed(f"expert {self.spec.id} failed: {item.message}")
                else:
                    ended = True
                    raise ExpertFailed(str(item))
        finally:
            if not ended:
                # A client that went away frees its slot before the next decode step.
                self._worker.cancel(request.request_id)
            self._recent_s = [*self._recent_s[-19:], time.perf_counter() - started_s]


class ServedExpert(Protocol):
    """A model this node serves: a `LocalExpert`, or a specialist on one's base (node/serving/specialist_serving.py)."""

    @property
    def spec(self) -> ExpertSpec: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def parallel(self) -> int: ...
    @property
    def restarts(self) -> int: ...
    @property
    def worker_pid(self) -> int | None: ...
    @property
    def safe_cpu_kernels(self) -> bool: ...
    def tokens_per_s(self) -> float: ...
    def average_request_s(self) -> float | None: ...
    def retry_after_s(self) -> int: ...
    def admit(self) -> None: ...
    def release(self) -> None: ...
    def close(self) -> None: ...
    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> tuple[list[int], tuple[str, ...]]: ...
    def tokenize_text(self, prompt: str) -> list[int]: ...
    def generate(
        self, prompt_tokens: list[int], style_stops: Sequence[str], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]: ...


class ExpertPool:
    """The node's local experts in the order they were configured."""

    def __init__(self, experts: Sequence[ServedExpert]) -> None:
        self._experts = {expert.spec.id: expert for expert in experts}

    def __iter__(self) -> Iterator[ServedExpert]:
        return iter(self._experts.values())

    def __len__(self) -> int:
        return len(self._experts)

    def get(self, expert_id: str) -> ServedExpert | None:
        """The expert with this id, if local."""
        return self._experts.get(ExpertId(expert_id))

    def add(self, expert: ServedExpert) -> None:
        """Serve one more expert (an adopted specialist)."""
        self._experts[expert.spec.id] = expert

    def first(self) -> ServedExpert | None:
        """The first configured expert."""
        return next(iter(self._experts.values()), None)

    def close(self) -> None:
        """Free every model."""
        for expert in self._experts.values():
            expert.close()


def _chat_formatter(llama: Llama):
    """The GGUF's own chat template, through llama-cpp-python's Jinja2 formatter."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llama.metadata["tokenizer.chat_template"]
    eos_id, bos_id = llama.token_eos(), llama.token_bos()
    eos = llama._model.token_get_text(eos_id) if eos_id != -1 else ""
    bos = llama._model.token_get_text(bos_id) if bos_id != -1 else ""
    return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id])


def detect_prompt_style(metadata: dict) -> PromptStyle:
    """`chat` when the GGUF carries a chat template, `completion` otherwise."""
    return "chat" if metadata.get("tokenizer.chat_template") else "completion"


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build can put layers on a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def default_parallel(kv_bytes_per_token: int, n_ctx: int, *, gpu: bool) -> int:
    """Slots for this machine: 8 with GPU offload, 4 on a CPU, fewer when their KV cache would pass 1/8 of RAM."""
    wanted = 8 if gpu else 4
    try:
        ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return wanted
    per_slot = max(1, kv_bytes_per_token * n_ctx)
    return max(1, min(wanted, ram_bytes // 8 // per_slot))


def kv_bytes_per_token(metadata: dict) -> int:
    """f16 K and V bytes per token of one sequence, from the GGUF header (0 when unknown)."""
    arch = metadata.get("general.architecture", "")
    try:
        n_layer = int(metadata[f"{arch}.block_count"])
        n_head = int(metadata[f"{arch}.attention.head_count"])
        n_head_kv = int(metadata.get(f"{arch}.attention.head_count_kv", n_head))
        key_length = int(metadata.get(f"{arch}.attention.key_length", int(metadata[f"{arch}.embedding_length"]) // n_head))
        value_length = int(metadata.get(f"{arch}.attention.value_length", key_length))
    except (KeyError, ValueError, ZeroDivisionError):
        return 0
    return n_layer * n_head_kv * (key_length + value_length) * 2


def load_expert(
    model: ModelFile,
    *,
    n_ctx: int,
    n_threads: int | None,
    n_gpu_layers: int,
    queue_size: int,
    parallel: int | None = None,
    safe_cpu_kernels: bool = False,
) -> LocalExpert:
    """Start a worker process for a pulled or local GGUF and wait until it has loaded (blocking)."""
    from llama_cpp import Llama

    name, path, sha256 = model.name, model.path, model.sha256
    entry = CATALOG.get(name)
    started_s = time.perf_counter()
    # Only the vocabulary: tokenizing and chat templates stay in this process, the weights live in the worker.
    tokenizer = Llama(model_path=str(path), vocab_only=True, verbose=False)
    gpu = gpu_offload_supported() and n_gpu_layers != 0
    kv_per_token = kv_bytes_per_token(tokenizer.metadata)
    slots = parallel if parallel else default_parallel(kv_per_token, n_ctx, gpu=gpu)
    config = WorkerConfig(
        model_path=str(path),
        n_ctx=n_ctx,
        parallel=slots,
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers if gpu_offload_supported() else 0,
        safe_cpu_kernels=safe_cpu_kernels,
    )
    worker = ModelWorker(expert_id_for(name, sha256), config)
    try:
        info = worker.wait_ready()
    except RuntimeError:
        worker.close()
        tokenizer.close()
        raise
    spec = ExpertSpec(
        id=expert_id_for(name, sha256),
        name=name,
        path=path,
        sha256=sha256,
        size_bytes=model.size_bytes,
        family=model.family,
        quantization=model.quantization,
        prompt_style=detect_prompt_style(tokenizer.metadata),
        n_ctx=info.n_ctx,
        params=entry.params if entry is not None else None,
    )
    log.info(
        "expert %s loaded in %.1f s by worker %d (%s prompts, %d slots x %d tokens, KV %.0f MB, gpu offload %s%s)",
        spec.id,
        time.perf_counter() - started_s,
        info.pid,
        spec.prompt_style,
        info.parallel,
        info.n_ctx,
        info.parallel * info.n_ctx * info.kv_bytes_per_token / 1e6,
        "all layers" if gpu else "off",
        ", safe CPU kernels" if safe_cpu_kernels else "",
    )
    return LocalExpert(spec, tokenizer, worker, queue_size)
