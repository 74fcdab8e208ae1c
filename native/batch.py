"""BatchedGenerator: many requests, each with its own adapter mix, decoded together.

Every step is one ``llama_decode``: the next token of every running request plus (chunks of) the
prompts of requests that joined since the last step. Requests join whenever a sequence slot is
free and leave as soon as they stop (continuous batching); their slot, K/V cells and mix are
released at once. Greedy (``temperature=0``) and sampled decoding (temperature, top-k, top-p,
per-request seed), per-request stop tokens, stop strings and token limits.

>>> gen = BatchedGenerator(llama.model, {"a": ptr_a, "b": ptr_b}, n_seq_max=8)
>>> outs = gen.run([GenerationRequest(llama.tokenize(b"Hi"), mix={"a": 1.0}, max_tokens=32),
...                 GenerationRequest(llama.tokenize(b"Yo"), mix={"a": 0.5, "b": 0.5})])

The generator owns its own ``llama_context`` on the given model (``n_seq_max`` sequences, one
unified K/V cache so the compute graph is reused across steps), with the adapters registered on
it through :class:`~loramux.native.mixer.SeqMixer`. K/V computed under one mix is never reused
under another: a sequence's cells are cleared when its request leaves.
"""
from __future__ import annotations

import ctypes
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np

from loramux.errors import LoramuxError, RuntimeLoadError
from loramux.native.mixer import SeqMixer


@dataclass
class GenerationRequest:
    """One request: prompt token ids, a mix ``{adapter name: weight}`` (None: base model), limits."""

    prompt: Sequence[int]
    mix: Mapping[str, float] | None = None
    max_tokens: int = 64
    temperature: float = 0.0            # 0: greedy (argmax)
    top_k: int = 0                      # 0: no top-k cut
    top_p: float = 1.0                  # 1: no nucleus cut
    seed: int | None = None             # sampled decoding: per-request RNG seed
    stop_tokens: Collection[int] | None = None  # None: the model's end-of-generation tokens
    stop: Sequence[str] = ()            # stop strings: generation ends, text is cut before them
    request_id: Any = None


@dataclass
class Completion:
    """What one request produced."""

    request_id: Any
    tokens: list[int]
    text: str
    finish_reason: str                  # "stop" (stop token or string) or "length"
    mix: dict[str, float]
    prompt_tokens: int


@dataclass
class GeneratorStats:
    steps: int = 0                      # llama_decode calls
    tokens_decoded: int = 0             # tokens fed (prompt + generated)
    tokens_generated: int = 0
    decode_seconds: float = 0.0
    mix_sets: int = 0
    mix_set_seconds: float = 0.0
    last_step_sequences: int = 0        # sequences in the last llama_decode
    max_step_sequences: int = 0


@dataclass
class _Slot:
    seq_id: int
    req: GenerationRequest
    order: int
    prompt: list[int]
    n_past: int = 0                     # tokens of this sequence already in the K/V cache
    out: list[int] = field(default_factory=list)
    text: bytes = b""
    rng: np.random.Generator | None = None
    pending: int | None = None          # sampled token not yet fed


def _default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class BatchedGenerator:
    """Continuous batching of requests with per-request adapter mixes on one model.

    ``model_ptr`` is a ``llama_model *`` (``llama_cpp.Llama(...).model``); ``adapters`` maps
    names to ``llama_adapter_lora *`` loaded on that model (they must outlive the generator).
    """

    def __init__(
        self,
        model_ptr,
        adapters: Mapping[str, object] | Sequence[tuple[str, object]],
        *,
        n_seq_max: int = 8,
        n_ctx_per_seq: int = 1024,
        n_batch: int = 512,
        n_threads: int | None = None,
        max_active: int = 3,
    ) -> None:
        import llama_cpp

        from loramux import native

        if not native.available():
            raise RuntimeLoadError(f"BatchedGenerator needs the loramux native library: {native.status().reason}")
        if n_seq_max < 1:
            raise LoramuxError(f"n_seq_max must be >= 1, got {n_seq_max}")
        self._lc = llama_cpp
        self.model = model_ptr
        self.vocab = llama_cpp.llama_model_get_vocab(model_ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq_max * n_ctx_per_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        threads = n_threads or _default_threads()
        params.n_threads = threads
        params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(model_ptr, params)
        if not self.ctx:
            raise RuntimeLoadError(f"llama.cpp could not create a context with n_seq_max={n_seq_max}, n_ctx={params.n_ctx}")
        self.n_seq_max = n_seq_max
        self.n_ctx_per_seq = n_ctx_per_seq
        self.n_batch = n_batch
        try:
            self.mixer = SeqMixer(self.ctx, adapters, max_active=max_active)
        except Exception:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
            raise
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._mem = llama_cpp.llama_get_memory(self.ctx)
        self._queue: deque[tuple[int, GenerationRequest]] = deque()
        self._slots: dict[int, _Slot] = {}
        self._free = list(range(n_seq_max - 1, -1, -1))
        self._order = 0
        self._piece = ctypes.create_string_buffer(256)
        self.stats = GeneratorStats()

    @classmethod
    def from_llama(cls, llama, adapters, **kwargs) -> "BatchedGenerator":
        """A generator on the model of a ``llama_cpp.Llama`` (a separate context; the Llama is untouched)."""
        kwargs.setdefault("n_threads", llama.context_params.n_threads)
        return cls(llama.model, adapters, **kwargs)

    # --- lifecycle ----------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.mixer.close()
            self._lc.llama_batch_free(self._batch)
            self._lc.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> "BatchedGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # --- requests -----------------------------------------------------------------
    @property
    def n_running(self) -> int:
        return len(self._slots)

    @property
    def n_waiting(self) -> int:
        return len(self._queue)

    def submit(self, request: GenerationRequest) -> int:
        """Queue a request; it joins the batch at the next step with a free slot. Returns its order number."""
        if not request.prompt:
            raise LoramuxError(f"request {request.request_id!r} has an empty prompt")
        if request.max_tokens < 1:
            raise LoramuxError(f"request {request.request_id!r}: max_tokens must be >= 1, got {request.max_tokens}")
        if len(request.prompt) + request.max_tokens > self.n_ctx_per_seq:
            raise LoramuxError(
                f"request {request.request_id!r}: prompt ({len(request.prompt)}) + max_tokens ({request.max_tokens}) "
                f"exceeds n_ctx_per_seq={self.n_ctx_per_seq}"
            )
        for name in (request.mix or {}):
            self.mixer.adapter_id(name)  # unknown names fail now, not mid-batch
        order = self._order
        self._order += 1
        self._queue.append((order, request))
        return order

    def set_mix(self, request_id: Any, mix: Mapping[str, float] | None) -> None:
        """Change the mix of a running request from its next token on (its cached K/V stays as computed)."""
        for slot in self._slots.values():
            if slot.req.request_id == request_id:
                self._set_mix(slot.seq_id, mix)
                slot.req.mix = dict(mix or {})
                return
        raise LoramuxError(f"no running request with id {request_id!r}")

    def _set_mix(self, seq_id: int, mix: Mapping[str, float] | None) -> None:
        t0 = time.perf_counter()
        self.mixer.set(seq_id, mix)
        self.stats.mix_set_seconds += time.perf_counter() - t0
        self.stats.mix_sets += 1

    def _admit(self) -> None:
        while self._queue and self._free:
            order, req = self._queue.popleft()
            seq = self._free.pop()
            self._lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
            self._set_mix(seq, req.mix)
            rng = np.random.default_rng(req.seed) if req.temperature > 0 else None
            self._slots[seq] = _Slot(seq, req, order, list(req.prompt), rng=rng)

    def _release(self, slot: _Slot) -> None:
        self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        self.mixer.clear(slot.seq_id)
        del self._slots[slot.seq_id]
        self._free.append(slot.seq_id)

    # --- one step -----------------------------------------------------------------
    def step(self) -> list[tuple[int, Completion]]:
        """Admit waiting requests, run one llama_decode over all running sequences, sample.

        Returns ``(order, Completion)`` for the requests that finished in this step.
        """
        self._admit()
        if not self._slots:
            return []
        b = self._batch
        n = 0
        rows: list[tuple[_Slot, int]] = []   # (slot, batch index with logits)
        budget = self.n_batch
        # running sequences first: one token each
        for slot in self._slots.values():
            if slot.pending is not None:
                self._put(b, n, slot.pending, slot.n_past, slot.seq_id, True)
                rows.append((slot, n))
                slot.n_past += 1
                slot.pending = None
                n += 1
        budget -= n
        # then prompt chunks, in arrival order, as long as the batch has room
        for slot in sorted(self._slots.values(), key=lambda s: s.order):
            left = len(slot.prompt) - slot.n_past
            if left <= 0 or budget <= 0 or slot.out:
                continue
            take = min(left, budget)
            for j in range(take):
                last = slot.n_past + 1 == len(slot.prompt)
                self._put(b, n, slot.prompt[slot.n_past], slot.n_past, slot.seq_id, last)
                if last:
                    rows.append((slot, n))
                slot.n_past += 1
                n += 1
            budget -= take
        if n == 0:
            return []
        b.n_tokens = n
        t0 = time.perf_counter()
        rc = self._lc.llama_decode(self.ctx, b)
        self.stats.decode_seconds += time.perf_counter() - t0
        if rc != 0:
            raise LoramuxError(f"llama_decode failed with code {rc} on a batch of {n} tokens "
                               f"({len(self._slots)} sequences); lower n_seq_max or n_ctx_per_seq")
        self.stats.steps += 1
        self.stats.tokens_decoded += n
        n_seqs = len({int(b.seq_id[i][0]) for i in range(n)})
        self.stats.last_step_sequences = n_seqs
        self.stats.max_step_sequences = max(self.stats.max_step_sequences, n_seqs)
        done = []
        for slot, i in rows:
            logits = np.ctypeslib.as_array(self._lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
            tok = self._sample(slot, logits)
            finished = self._accept(slot, tok)
            if finished is not None:
                done.append((slot.order, finished))
                self._release(slot)
        return done

    def run(self, requests: Iterable[GenerationRequest]) -> list[Completion]:
        """Submit ``requests`` and step until all finished; completions in request order."""
        orders = [self.submit(r) for r in requests]
        results: dict[int, Completion] = {}
        while self._queue or self._slots:
            for order, comp in self.step():
                results[order] = comp
        return [results[o] for o in orders if o in results]

    # --- helpers ------------------------------------------------------------------
    @staticmethod
    def _put(b, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _sample(self, slot: _Slot, logits: np.ndarray) -> int:
        req = slot.req
        if req.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / req.temperature
        if req.top_k and req.top_k < z.size:
            keep = np.argpartition(z, -req.top_k)[-req.top_k:]
        else:
            keep = np.arange(z.size)
        zk = z[keep]
        p = np.exp(zk - zk.max())
        p /= p.sum()
        if req.top_p < 1.0:
            order = np.argsort(-p)
            cum = np.cumsum(p[order])
            cut = int(np.searchsorted(cum, req.top_p)) + 1
            sel = order[:cut]
            keep, p = keep[sel], p[sel] / p[sel].sum()
        return int(keep[slot.rng.choice(len(keep), p=p)])

    def token_piece(self, token: int) -> bytes:
        n = self._lc.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[: max(n, 0)]

    def _accept(self, slot: _Slot, tok: int) -> Completion | None:
        req = slot.req
        is_stop = (tok in req.stop_tokens) if req.stop_tokens is not None else bool(self._lc.llama_vocab_is_eog(self.vocab, tok))
        if is_stop:
            return self._finish(slot, "stop")
        slot.out.append(tok)
        slot.text += self.token_piece(tok)
        self.stats.tokens_generated += 1
        if req.stop:
            text = slot.text.decode("utf-8", errors="ignore")
            for s in req.stop:
                if s and s in text:
                    return self._finish(slot, "stop", cut=text.index(s))
        if len(slot.out) >= req.max_tokens:
            return self._finish(slot, "length")
        slot.pending = tok
        return None

    def _finish(self, slot: _Slot, reason: str, cut: int | None = None) -> Completion:
        text = slot.text.decode("utf-8", errors="replace")
        if cut is not None:
            text = text[:cut]
        return Completion(
            request_id=slot.req.request_id,
            tokens=list(slot.out),
            text=text,
            finish_reason=reason,
            mix=dict(slot.req.mix or {}),
            prompt_tokens=len(slot.prompt),
        )
