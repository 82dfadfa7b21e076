"""Continuous batching for one model: sequence slots decoded together, one `llama_decode` per step."""

from __future__ import annotations

import ctypes
import logging
import os
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

# llama-cpp-python's own defaults for a sampled completion; kept so outputs match its create_completion.
TOP_K = 40
MIN_P = 0.05
TYPICAL_P = 1.0

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SlotRequest:
    """One generation as the scheduler sees it: prompt tokens and how to sample and stop."""

    request_id: int
    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: tuple[str, ...]
    solo: bool = False  # run alone, from a clean slot: bit-for-bit what a one-sequence context gives
    grammar: str | None = None  # llama.cpp GBNF (root rule `root`) the output must match; checked by the node first


@dataclass(frozen=True)
class TextOut:
    """Text a request may show (never a prefix of one of its stop strings)."""

    request_id: int
    text: str


@dataclass(frozen=True)
class Done:
    """A request ended."""

    request_id: int
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens not decoded again: their cells were kept from an earlier request


@dataclass(frozen=True)
class Failed:
    """A request could not be run."""

    request_id: int
    message: str


StepEvent = TextOut | Done | Failed


@dataclass
class _Slot:
    """One sequence id of the context, with what its KV cells hold."""

    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV cells this sequence holds, in order
    request: SlotRequest | None = None
    stops: tuple[bytes, ...] = ()
    sampler: object | None = None
    pending: list[int] = field(default_factory=list)  # tokens to decode next (prompt rest, or the last sample)
    out: bytearray = field(default_factory=bytearray)
    sent: int = 0  # bytes of `out` already shown
    completion_tokens: int = 0
    reused: int = 0  # prompt tokens taken from the slot's cache
    logits_index: int = -1  # where this slot's logits are in the last batch, -1 when none


def common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def utf8_complete(data: bytes | bytearray, end: int) -> int:
    """The largest cut <= `end` that does not split a UTF-8 character."""
    i = end
    # Walk back over at most 3 continuation bytes to the lead byte of the last character.
    back = 0
    while i > 0 and back < 4 and (data[i - 1] & 0xC0) == 0x80:
        i -= 1
        back += 1
    if i == 0:
        return end  # no lead byte before: not UTF-8 that more bytes could complete
    lead = data[i - 1]
    need = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    return end if back + 1 >= need else i - 1


def stop_holdback(data: bytes | bytearray, stops: tuple[bytes, ...]) -> int:
    """How many trailing bytes could still begin a stop string, so must not be shown yet."""
    hold = 0
    for stop in stops:
        for i in range(min(len(stop) - 1, len(data)), hold, -1):
            if data.endswith(stop[:i]):
                hold = i
                break
    return hold


class BatchScheduler:
    """Owns a llama.cpp model and context; runs every admitted request in its own sequence slot."""

    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int,
        parallel: int,
        n_threads: int | None,
        n_gpu_layers: int,
        safe_cpu_kernels: bool = False,
        n_batch: int = 512,
    ) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel

        self._ll = llama_cpp
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers if llama_cpp.llama_supports_gpu_offload() else 0
        if safe_cpu_kernels:
            # The repacked (AMX and friends) CPU weight layouts are what dies with SIGILL on some CPUs.
            model_params.use_extra_bufts = False
        self._model = LlamaModel(path_model=model_path, params=model_params, verbose=False)
        model = self._model.model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.parallel = max(1, parallel)
        self.n_batch = min(n_batch, n_ctx)
        threads = n_threads or max(1, (os.cpu_count() or 2) // 2)  # llama-cpp-python's default
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * self.parallel
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = self.parallel
        params.n_threads = threads
        params.n_threads_batch = threads
        # As llama-cpp-python's Llama does, so a one-sequence run gives its outputs bit for bit.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        # One KV stream per sequence: each slot owns exactly n_ctx cells, no slot can starve another.
        params.kv_unified = False
        try:
            self._context = LlamaContext(model=self._model, params=params, verbose=False)
        except ValueError as exc:
            self._model.close()
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens for {self.parallel} slots") from exc
        self._ctx = self._context.ctx
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self._ctx) if hasattr(llama_cpp, "llama_n_ctx_seq") else n_ctx
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._slots = [_Slot(seq_id) for seq_id in range(self.parallel)]
        self._waiting: deque[SlotRequest] = deque()
        self._piece = ctypes.create_string_buffer(256)
        n_layer = llama_cpp.llama_model_n_layer(model)
        n_head, n_head_kv = llama_cpp.llama_model_n_head(model), llama_cpp.llama_model_n_head_kv(model)
        head_dim = llama_cpp.llama_model_n_embd(model) // max(1, n_head)
        # f16 K and V for every layer: 2 tensors x 2 bytes x kv heads x head size.
        self.kv_bytes_per_token = n_layer * 2 * 2 * n_head_kv * head_dim

    def warm_up(self) -> None:
        """Run the kernels once (a prompt chunk, then one token in every slot), so a CPU that cannot
        run them crashes here, before any request, and leave the context empty."""
        ll = self._ll
        batch = self._batch
        n_prompt = min(32, self.n_batch)
        for index, (seq_id, pos) in enumerate([(0, p) for p in range(n_prompt)]):
            batch.token[index], batch.pos[index], batch.n_seq_id[index] = 1, pos, 1
            batch.seq_id[index][0], batch.logits[index] = seq_id, index == n_prompt - 1
        batch.n_tokens = n_prompt
        ll.llama_decode(self._ctx, batch)
        for index in range(self.parallel):
            batch.token[index], batch.pos[index], batch.n_seq_id[index] = 1, n_prompt if index == 0 else 0, 1
            batch.seq_id[index][0], batch.logits[index] = index, True
        batch.n_tokens = self.parallel
        ll.llama_decode(self._ctx, batch)
        ll.llama_memory_seq_rm(self._mem, -1, -1, -1)

    # ---- requests ------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Requests holding a slot."""
        return sum(slot.request is not None for slot in self._slots)

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        """Nothing to decode."""
        return not self._waiting and self.running == 0

    def submit(self, request: SlotRequest) -> list[StepEvent]:
        """Queue a request; it joins at the next step with a free slot. Invalid ones fail at once."""
        if not request.prompt:
            return [Failed(request.request_id, "the prompt is empty")]
        if len(request.prompt) >= self.n_ctx:
            return [Failed(request.request_id, f"the prompt is {len(request.prompt)} tokens; the context is {self.n_ctx}")]
        if request.grammar is not None:
            probe = self._grammar_sampler(request.grammar)
            if not probe:
                return [Failed(request.request_id, "llama.cpp refused the grammar")]
            self._ll.llama_sampler_free(probe)
        self._waiting.append(request)
        return []

    def _grammar_sampler(self, grammar: str):
        """llama.cpp's grammar sampler for `grammar` (NULL when llama.cpp cannot parse it)."""
        return self._ll.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")

    def cancel(self, request_id: int) -> None:
        """Drop a request, waiting or running; a running one gives back its slot and KV cells now."""
        for request in self._waiting:
            if request.request_id == request_id:
                self._waiting.remove(request)
                return
        for slot in self._slots:
            if slot.request is not None and slot.request.request_id == request_id:
                self._release(slot, keep_cells=False)
                return

    def close(self) -> None:
        """Free the sampler chains, batch, context and model."""
        ll = self._ll
        for slot in self._slots:
            if slot.sampler is not None:
                ll.llama_sampler_free(slot.sampler)
                slot.sampler = None
        ll.llama_batch_free(self._batch)
        self._context.close()
        self._model.close()

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> tuple[list[StepEvent], int]:
        """Admit waiting requests into free slots, decode one batch, sample; events and tokens sampled."""
        events: list[StepEvent] = []
        self._admit()
        if self.running == 0:
            return events, 0
        self._fill_batch()
        status = self._ll.llama_decode(self._ctx, self._batch)
        if status != 0:
            # 1: no KV room (cannot happen with per-slot streams and capped max_tokens), <0: a hard error.
            for slot in self._slots:
                if slot.request is not None:
                    events.append(Failed(slot.request.request_id, f"llama_decode failed with status {status}"))
                    self._release(slot, keep_cells=False)
            return events, 0
        sampled = 0
        for slot in self._slots:
            if slot.request is None or slot.logits_index < 0:
                continue
            sampled += 1
            events.extend(self._sample(slot))
        return events, sampled

    def _admit(self) -> None:
        """Move waiting requests into free slots; a solo request waits for an empty context and runs alone."""
        while self._waiting:
            busy = [slot for slot in self._slots if slot.request is not None]
            if any(slot.request is not None and slot.request.solo for slot in busy):
                return
            head = self._waiting[0]
            free = [slot for slot in self._slots if slot.request is None]
            if not free or (head.solo and busy):
                return
            self._waiting.popleft()
            if head.solo:
                slot, keep = free[0], 0
            else:
                # The slot whose cells share the longest prefix with this prompt: a continuing conversation
                # re-decodes only its new turn. At least the last prompt token is decoded, for its logits.
                slot = max(free, key=lambda s: common_prefix(s.cached, head.prompt))
                keep = min(common_prefix(slot.cached, head.prompt), len(head.prompt) - 1)
            self._ll.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1)
            slot.cached = list(head.prompt[:keep])
            slot.reused = keep
            slot.pending = list(head.prompt[keep:])
            slot.request = head
            slot.stops = tuple(s.encode("utf-8") for s in head.stops if s)
            slot.sampler = self._new_sampler(head)
            slot.out = bytearray()
            slot.sent = 0
            slot.completion_tokens = 0

    def _new_sampler(self, request: SlotRequest):
        """A sampler chain like llama-cpp-python's create_completion builds for the same settings."""
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if request.grammar is not None:
            # First in the chain, as create_completion puts it: only tokens the grammar allows are left to choose from.
            ll.llama_sampler_chain_add(chain, self._grammar_sampler(request.grammar))
        if request.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            seed = request.seed if request.seed is not None else random.getrandbits(32)
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(TOP_K))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_typical(TYPICAL_P, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(request.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(MIN_P, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(request.temperature))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _fill_batch(self) -> None:
        """One batch: each generating slot's last token first, then prompt chunks in the room left."""
        batch = self._batch
        n = 0
        generating = [s for s in self._slots if s.request is not None and len(s.pending) == 1 and s.completion_tokens > 0]
        prompting = [s for s in self._slots if s.request is not None and s not in generating]
        for slot in [*generating, *prompting]:
            slot.logits_index = -1
            room = self.n_batch - n
            if room <= 0:
                continue
            take = slot.pending[:room]
            pos = len(slot.cached)
            for offset, token in enumerate(take):
                batch.token[n] = token
                batch.pos[n] = pos + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = False
                n += 1
            slot.cached.extend(take)
            del slot.pending[: len(take)]
            if not slot.pending:
                # The whole prompt (or the last sample) is in: its last token's logits give the next token.
                batch.logits[n - 1] = True
                slot.logits_index = n - 1
        batch.n_tokens = n

    def _sample(self, slot: _Slot) -> list[StepEvent]:
        """Sample a slot's next token, update its text, and end it on EOG, a stop string or max tokens."""
        ll = self._ll
        request = slot.request
        assert request is not None  # only a slot that holds a request is sampled or finished
        token = ll.llama_sampler_sample(slot.sampler, self._ctx, slot.logits_index)
        if ll.llama_vocab_is_eog(self.vocab, token):
            return self._finish(slot, "stop", None)
        slot.completion_tokens += 1
        n = ll.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n > 0:
            slot.out += self._piece.raw[:n]
        stops = slot.stops
        if stops:
            start = max(0, slot.sent - max(len(s) for s in stops) + 1)
            found = [i for i in (slot.out.find(s, start) for s in stops) if i >= 0]
            if found:
                return self._finish(slot, "stop", min(found))
        if slot.completion_tokens >= request.max_tokens:
            return self._finish(slot, "length", None)
        slot.pending = [token]
        end = utf8_complete(slot.out, len(slot.out) - stop_holdback(slot.out, stops))
        if end <= slot.sent:
            return []
        text = slot.out[slot.sent : end].decode("utf-8", errors="ignore")
        slot.sent = end
        return [TextOut(request.request_id, text)] if text else []

    def _finish(self, slot: _Slot, reason: FinishReason, cut: int | None) -> list[StepEvent]:
        """The rest of a slot's text and its end; the slot is free at once, its cells kept as a prefix cache."""
        request = slot.request
        assert request is not None  # only a slot that holds a request is sampled or finished
        end = len(slot.out) if cut is None else cut
        events: list[StepEvent] = []
        if end > slot.sent:
            text = slot.out[slot.sent : end].decode("utf-8", errors="ignore")
            if text:
                events.append(TextOut(request.request_id, text))
        events.append(Done(request.request_id, reason, len(request.prompt), slot.completion_tokens, slot.reused))
        # A solo run leaves nothing behind, so the next solo run starts from the same clean state.
        self._release(slot, keep_cells=not request.solo)
        return events

    def _release(self, slot: _Slot, *, keep_cells: bool) -> None:
        """Free a slot; without `keep_cells` its KV cells go too."""
        if slot.sampler is not None:
            self._ll.llama_sampler_free(slot.sampler)
            slot.sampler = None
        slot.request = None
        slot.pending = []
        slot.logits_index = -1
        if not keep_cells:
            self._ll.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            slot.cached = []
