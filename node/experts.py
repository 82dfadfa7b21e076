"""Local expert pool: one llama.cpp model per expert, one worker thread each, a bounded queue in front."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Literal, NewType, Sequence

import jinja2

from node.catalog import CATALOG, ModelFile
from node.errors import ExpertBusy, ExpertFailed, InvalidRequest
from node.structured import compiled_grammar

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
    grammar: str | None = None  # llama.cpp GBNF the output must match (response_format, a specialist's constraint)
    response_format: str | None = None  # the client's OpenAI response_format as JSON text, for a peer to rebuild `grammar`


@dataclass(frozen=True)
class Delta:
    """A piece of generated text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of a generation, with its token accounting."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


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
    """One loaded model with its own worker thread and a bounded admission count."""

    def __init__(self, spec: ExpertSpec, llama: object, queue_size: int) -> None:
        self.spec = spec
        self._llama = llama
        self._queue_size = queue_size
        self._pending = 0  # running + waiting; touched only on the event loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"expert-{spec.name}")
        self._chat_formatter = _chat_formatter(llama) if spec.prompt_style == "chat" else None
        self._recent_s: list[float] = []

    @property
    def queue_depth(self) -> int:
        """Requests running or waiting on this expert."""
        return self._pending

    @property
    def capacity(self) -> int:
        """Most requests admitted at once: one running plus the queue."""
        return 1 + self._queue_size

    def average_request_s(self) -> float | None:
        """Mean duration of the last requests, None before the first."""
        return sum(self._recent_s) / len(self._recent_s) if self._recent_s else None

    def retry_after_s(self) -> int:
        """A hint for a refused client: about how long the queue takes to drain."""
        average_s = self.average_request_s()
        average_s = 1.0 if average_s is None else average_s
        return max(1, round(average_s * max(1, self._pending) / 2))

    def close(self) -> None:
        """Stop the worker and free the model."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        close = getattr(self._llama, "close", None)
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
            tokens = self._llama.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
            stops = result.stop if isinstance(result.stop, list) else ([result.stop] if result.stop else [])
            return tokens, tuple(stops)
        return self.tokenize_text(completion_prompt(messages)), COMPLETION_STOPS

    def tokenize_text(self, prompt: str) -> list[int]:
        """Prompt tokens for a raw completion prompt."""
        return self._llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def admit(self) -> None:
        """Take a place in the queue or refuse at once with 429."""
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
        """Stream a generation for already admitted prompt tokens; the caller must `release` afterwards."""
        n_ctx = self.spec.n_ctx
        if not prompt_tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if len(prompt_tokens) >= n_ctx:
            raise InvalidRequest(
                f"the prompt is {len(prompt_tokens)} tokens; expert {self.spec.id} has a context of {n_ctx}",
                param="messages",
            )
        max_tokens = min(params.max_tokens, n_ctx - len(prompt_tokens))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        cancelled = threading.Event()
        stops = list(dict.fromkeys([*params.stop, *style_stops]))

        def emit(item: GenerationEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def run() -> None:
            started_s = time.perf_counter()
            if cancelled.is_set():
                return
            from llama_cpp import StoppingCriteriaList

            try:
                texts: list[str] = []
                finish_reason = "length"
                chunks = self._llama.create_completion(
                    prompt=prompt_tokens,
                    max_tokens=max_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    stop=stops,
                    seed=params.seed,
                    grammar=compiled_grammar(params.grammar) if params.grammar else None,
                    stream=True,
                    stopping_criteria=StoppingCriteriaList([lambda _ids, _logits: cancelled.is_set()]),
                )
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    if choice["text"]:
                        texts.append(choice["text"])
                        emit(Delta(choice["text"]))
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                text = "".join(texts)
                # llama.cpp's stream carries no usage; a length stop is exactly max_tokens, else count the text.
                if finish_reason == "length":
                    completion_tokens = max_tokens
                else:
                    completion_tokens = len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))
                emit(Finished(finish_reason, len(prompt_tokens), completion_tokens))
            except Exception as exc:  # noqa: BLE001 - any llama.cpp failure is reported to the waiting client
                log.exception("expert %s failed", self.spec.id)
                emit(ExpertFailed(f"expert {self.spec.id} failed: {type(exc).__name__}"))
            finally:
                self._recent_s = [*self._recent_s[-19:], time.perf_counter() - started_s]

        future = loop.run_in_executor(self._executor, run)
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    break
        finally:
            # A client that went away frees the worker at the next token instead of at max_tokens.
            cancelled.set()
            if not future.done():
                await asyncio.shield(future)


class ExpertPool:
    """The node's local experts in the order they were configured."""

    def __init__(self, experts: Sequence[LocalExpert]) -> None:
        self._experts = {expert.spec.id: expert for expert in experts}

    def __iter__(self):
        return iter(self._experts.values())

    def __len__(self) -> int:
        return len(self._experts)

    def get(self, expert_id: str) -> LocalExpert | None:
        """The expert with this id, if local."""
        return self._experts.get(ExpertId(expert_id))

    def add(self, expert: LocalExpert) -> None:
        """Serve one more expert (an adopted specialist)."""
        self._experts[expert.spec.id] = expert

    def first(self) -> LocalExpert | None:
        """The first configured expert."""
        return next(iter(self._experts.values()), None)

    def close(self) -> None:
        """Free every model."""
        for expert in self._experts.values():
            expert.close()


def _chat_formatter(llama: object):
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


def load_expert(model: ModelFile, *, n_ctx: int, n_threads: int | None, n_gpu_layers: int, queue_size: int) -> LocalExpert:
    """Load a pulled or local GGUF with llama.cpp (blocking: call it off the event loop)."""
    from llama_cpp import Llama

    name, path, sha256 = model.name, model.path, model.sha256
    entry = CATALOG.get(name)

    started_s = time.perf_counter()
    llama = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=n_threads,
        # Prompt processing gets the same threads: llama.cpp's default (every core) spins against
        # other processes on a shared machine and collapses throughput.
        n_threads_batch=n_threads,
        n_gpu_layers=n_gpu_layers if gpu_offload_supported() else 0,
        verbose=False,
    )
    spec = ExpertSpec(
        id=expert_id_for(name, sha256),
        name=name,
        path=path,
        sha256=sha256,
        size_bytes=model.size_bytes,
        family=model.family,
        quantization=model.quantization,
        prompt_style=detect_prompt_style(llama.metadata),
        n_ctx=llama.n_ctx(),
        params=entry.params if entry is not None else None,
    )
    log.info(
        "expert %s loaded in %.1f s (%s prompts, n_ctx %d, gpu offload %s)",
        spec.id,
        time.perf_counter() - started_s,
        spec.prompt_style,
        spec.n_ctx,
        "all layers" if gpu_offload_supported() and n_gpu_layers != 0 else "off",
    )
    return LocalExpert(spec, llama, queue_size)
