"""The engine: one llama.cpp context, a scheduler thread, every request of the pool.

Requests are submitted from any thread (:meth:`Engine.submit`) or from asyncio (``loop=``) and
join at the next decode step; each step is one ``llama_decode`` over the next token of every
running sequence plus chunks of the prompts that joined (continuous batching). A request that
ends or is cancelled frees its sequence and mix at once; its K/V stays as a prefix cache keyed
by (mix, tokens) until the slot is needed (see :mod:`loramux.engine.slots`).

Mixes: with the native library, a mix of at most ``max_active`` adapters is a property of the
sequence, so requests with different mixes share one decode. Otherwise (no native library, or a
wider mix) the mix is set on the whole context (``llama_set_adapters_lora``) and a step decodes
only the sequences of that one mix; the scheduler moves between such groups every
``fair_steps`` steps while others wait. The caller sees no other difference: sampling is the
same per-sequence llama.cpp sampler chain on both paths (:mod:`loramux.engine.sampling`).

Routed mixes (``Mix.arrow()``, ``Mix.spectr()``) run per sequence only, with every registered
adapter taking part in each token's gating: a request that cannot route (no native library, no
adapter, k above max_active) is refused at :meth:`Engine.submit`. Their cached K/V is dropped
when the registered adapters change, and an adapter is unloaded only once no routed request runs
or waits (they all use it). A routed request running while adapters are loaded routes among the
new set from the next step on.

Adapter registration changes (:meth:`Engine.set_adapters`), teacher-forced logits and routing
records (:meth:`Engine.token_choices`) run as jobs on the scheduler thread between two steps, so
nothing native changes under a running decode.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Mapping

from loramux.engine.context import EngineContext
from loramux.engine.request import EngineRequest, RequestHandle
from loramux.engine.sampling import SequenceSampler
from loramux.engine.scoring import plan_batches, score_batch
from loramux.engine.slots import CONTEXT, NATIVE, Slot, best_slot
from loramux.engine.stats import EngineStats
from loramux.engine.step import StepBuilder, accept_token
from loramux.engine.text import StopText
from loramux.errors import ContextLengthError, LoramuxError, MixError, QueueFullError, RequestCancelled
from loramux.mix import Mix
from loramux.token_routing import ROUTING_MODES

_RETRY = object()  # a job returns this to run again after the next step
# The scheduler thread hands every token to the caller's thread (a stream, the server's event loop)
# and takes the GIL back after each llama_decode: with Python's default 5 ms switch interval each
# hand-off can wait a whole interval (measured: one HTTP stream 67 -> 90 tokens/s at 0.5 ms).
# $LORAMUX_SWITCH_INTERVAL overrides it (seconds; 0 leaves the interpreter's setting alone).
SWITCH_INTERVAL_S = 0.0005


def _tune_switch_interval() -> None:
    import os
    import sys

    raw = os.environ.get("LORAMUX_SWITCH_INTERVAL", "").strip()
    try:
        wanted = float(raw) if raw else SWITCH_INTERVAL_S
    except ValueError:
        raise LoramuxError(f"LORAMUX_SWITCH_INTERVAL={raw!r} is not a number of seconds") from None
    if wanted > 0 and sys.getswitchinterval() > wanted:
        sys.setswitchinterval(wanted)


class Engine:
    """Continuous batching of every request on one context of a model (``llama_model *``).

    ``n_ctx`` is the context of one sequence (prompt + generated tokens of one request); the
    context holds ``n_seq_max`` of them in one unified K/V cache. ``native``: use per-sequence
    mixes (the patched library). ``max_queue`` bounds the requests waiting for a slot.
    """

    def __init__(
        self,
        model_ptr,
        *,
        n_seq_max: int = 8,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int = 2,
        max_active: int = 3,
        native: bool = False,
        max_queue: int = 256,
        fair_steps: int = 8,
        flash_attn: bool = False,
        device_form: bool = False,
    ) -> None:
        if n_seq_max < 1 or n_ctx < 8 or max_queue < 1:
            raise LoramuxError(f"engine needs n_seq_max >= 1, n_ctx >= 8, max_queue >= 1 (got {n_seq_max}, {n_ctx}, {max_queue})")
        self.cx = EngineContext(
            model_ptr,
            n_seq_max=n_seq_max,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            max_active=max_active,
            native=native,
            flash_attn=flash_attn,
            device_form=device_form,
        )
        self.n_ctx, self.n_seq_max, self.max_queue, self.fair_steps = n_ctx, n_seq_max, max_queue, fair_steps
        self.stats = EngineStats()
        self._slots = [Slot(i) for i in range(n_seq_max)]
        self._waiting: deque[RequestHandle] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._order = 0
        self._group: Mix | None = None
        self._group_steps = 0
        _tune_switch_interval()
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)
        self._thread.start()

    # --- public API -----------------------------------------------------------------------
    @property
    def native(self) -> bool:
        return self.cx.native

    @property
    def max_active(self) -> int:
        return self.cx.max_active

    @property
    def n_running(self) -> int:
        return sum(1 for s in self._slots if s.busy)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    def path_for(self, mix: Mix) -> str:
        """``"native"`` when ``mix`` runs as a per-sequence mix, ``"context"`` when set on the whole context."""
        return NATIVE if self.cx.per_sequence(mix) else CONTEXT

    def submit(self, request: EngineRequest, *, loop=None) -> RequestHandle:
        """Queue ``request``; it joins the batch at the next step with a free sequence. Raises
        ContextLengthError when it cannot fit one sequence, RequestError for a token id outside the
        vocabulary, QueueFullError when the queue is full."""
        n = len(request.tokens)
        if n + (1 if request.max_tokens is None else request.max_tokens) > self.n_ctx:
            raise ContextLengthError(
                f"request {request.request_id!r}: the prompt has {n} tokens"
                + ("" if request.max_tokens is None else f" and asks for {request.max_tokens} more")
                + f", but a sequence holds at most {self.n_ctx} (n_ctx); shorten the prompt or lower max_tokens"
            )
        request.check_vocabulary(self.cx.n_vocab)
        self.cx.check_routable(request.mix)  # a routed mix that cannot run is refused here, never run as the base model
        handle = RequestHandle(request, loop)
        with self._cv:
            if self._closing:
                raise LoramuxError("the engine is closed")
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue}); retry later")
            self._waiting.append(handle)
            self.stats.submitted += 1
            self._cv.notify()
        return handle

    def call(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` on the scheduler thread between two steps and return its result."""
        if threading.current_thread() is self._thread:
            return job()
        fut: Future = Future()
        with self._cv:
            if self._closing:
                raise LoramuxError("the engine is closed")
            self._jobs.append((job, fut))
            self._cv.notify()
        return fut.result()

    def set_adapters(self, handles: Mapping[str, Any]) -> None:
        """Register exactly these adapters (name -> LoraAdapterHandle) between two steps; running
        requests keep their mixes. Cached K/V of adapters no longer registered is dropped."""
        self.call(lambda: self._set_adapters(dict(handles)))

    def retire_adapter(self, name: str, handles: Mapping[str, Any], then: Callable[[], None]) -> None:
        """Once no running or waiting request uses ``name``: register ``handles`` (without it) and call ``then``."""

        def job():
            if any(name in h.request.mix or h.request.mix.token_routing is not None for h in self._users()):
                return _RETRY
            self._set_adapters(dict(handles))
            then()
            return None

        self.call(job)

    def clear_prefix_cache(self) -> None:
        """Forget the K/V that ended requests left in their sequences (the next prompts are read whole)."""

        def job():
            for slot in self._slots:
                if not slot.busy and slot.kv_mix is not None:
                    self.cx.keep_prefix(slot.seq_id, 0)
                    slot.forget_kv()

        self.call(job)

    def logits(self, tokens, mix: Mix, *, path: str = CONTEXT):
        """Teacher-forced logits (n, n_vocab) of ``tokens`` under ``mix``, decoded alone in one batch.

        ``path="context"``: the mix set on the whole context, llama.cpp's stock numerics;
        ``"native"``: as a per-sequence mix (needs the native library and a narrow mix)."""
        tokens = self._one_batch("logits()", tokens)
        return self.call(lambda: self._logits_job(tokens, mix, path))

    def token_choices(self, tokens, mix: Mix) -> list:
        """Teacher-force ``tokens`` alone in one batch under routed ``mix`` and return the
        :class:`~loramux.native.mixer.TokenChoice` of every token at every adapted weight."""
        tokens = self._one_batch("token_choices()", tokens)
        if mix.token_routing is None:
            raise MixError(f"token choices are recorded for routed mixes ({', '.join(ROUTING_MODES)}); {mix} is not one")
        self.cx.check_routable(mix)
        return self.call(lambda: self._choices_job(tokens, mix))

    def _one_batch(self, what: str, tokens) -> list[int]:
        tokens = [int(t) for t in tokens]
        if not 0 < len(tokens) <= min(self.cx.n_batch, self.n_ctx):
            raise LoramuxError(f"{what} takes 1 to {min(self.cx.n_batch, self.n_ctx)} tokens in one batch, got {len(tokens)}")
        return tokens

    def score(self, items) -> list[float]:
        """Mean target NLL of each :class:`~loramux.engine.scoring.ScoreItem`, many mixes per decode.

        Every mix must run per sequence (native library, at most ``max_active`` adapters)."""
        for item in items:
            if not self.cx.per_sequence(item.mix):
                raise LoramuxError(
                    f"scoring needs per-sequence mixes; {item.mix} is not one (native library in use: "
                    f"{self.native}; at most max_active={self.max_active} adapters)"
                )
        return self.call(lambda: self._score_job(list(items)))

    def close(self) -> None:
        """Cancel what is running or waiting, stop the thread, free the context. Idempotent."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify()
        self._thread.join()
        self.cx.close()

    # --- the scheduler thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._closing or self._jobs or self._waiting or self._running()):
                    self._cv.wait()
                if self._closing:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
            for job, fut in jobs:
                self._run_job(job, fut)
            try:
                self._reap_cancelled()
                self._admit()
                self._step()
            except Exception as exc:  # a native failure: fail what ran, keep serving
                self._fail_running(exc)
        self._shutdown()

    def _run_job(self, job, fut: Future) -> None:
        try:
            out = job()
        except BaseException as exc:  # handed to the caller
            fut.set_exception(exc)
            return
        if out is _RETRY:
            with self._cv:
                self._jobs.append((job, fut))
            if not self._running() and not self._waiting:
                time.sleep(0.001)
        else:
            fut.set_result(out)

    def _running(self) -> list[Slot]:
        return [s for s in self._slots if s.busy]

    def _users(self) -> list[RequestHandle]:
        with self._cv:
            waiting = list(self._waiting)
        return [s.handle for s in self._running()] + waiting

    def _shutdown(self) -> None:
        err = RequestCancelled("the engine was closed")
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
            jobs, self._jobs = list(self._jobs), deque()
        for h in waiting:
            h._fail(err)
        for _, fut in jobs:
            fut.set_exception(err)
        for slot in self._running():
            slot.handle._fail(err)
            slot.end_request()

    # --- admission and release ---------------------------------------------------------------
    def _admit(self) -> None:
        while True:
            free = [s for s in self._slots if not s.busy]
            with self._cv:
                if not free or not self._waiting:
                    return
                handle = self._waiting.popleft()
            if handle.cancelled:
                self.stats.cancelled += 1
                handle._fail(handle._cancelled_error())
                continue
            try:
                self._start(handle, free)
            except Exception as exc:
                handle._fail(exc)

    def _start(self, handle: RequestHandle, free: list[Slot]) -> None:
        req = handle.request
        for name in req.mix:
            if name not in self.cx.handles:
                raise MixError(
                    f"request {req.request_id!r}: adapter {name!r} is not loaded (loaded: {', '.join(sorted(self.cx.handles)) or 'none'})"
                )
        path = self.path_for(req.mix)
        slot, reuse = best_slot(free, req.tokens, req.mix, path)
        sampler = SequenceSampler(req.sampling, self.cx.n_vocab)
        self.cx.keep_prefix(slot.seq_id, reuse)
        self.cx.set_seq_mix(slot.seq_id, req.mix if path == NATIVE else Mix())
        slot.fed = slot.fed[:reuse]
        slot.kv_mix, slot.kv_path = req.mix, path
        slot.handle, slot.sampler, slot.text = handle, sampler, StopText(req.stop)
        slot.prompt, slot.out, slot.pending, slot.cached = list(req.tokens), [], None, reuse
        slot.group = None if path == NATIVE else req.mix
        slot.limit = req.max_tokens if req.max_tokens is not None else self.n_ctx - len(req.tokens)
        slot.order, self._order = self._order, self._order + 1
        handle.joined_step = self.stats.steps
        self.stats.prefix_hit_tokens += reuse
        self.stats.prompt_tokens += len(req.tokens)

    def _release(self, slot: Slot, *, keep_kv: bool) -> None:
        if not keep_kv:
            self.cx.keep_prefix(slot.seq_id, 0)
            slot.forget_kv()
        self.cx.set_seq_mix(slot.seq_id, Mix())
        slot.last_used = self.stats.steps
        slot.end_request()

    def _reap_cancelled(self) -> None:
        for slot in self._running():
            if slot.handle.cancelled:
                self.stats.cancelled += 1
                slot.handle._fail(slot.handle._cancelled_error())
                self._release(slot, keep_kv=False)

    def _fail_running(self, exc: Exception) -> None:
        for slot in self._running():
            slot.handle._fail(exc if isinstance(exc, LoramuxError) else LoramuxError(f"decoding failed: {exc}"))
            self._release(slot, keep_kv=False)

    # --- one step -------------------------------------------------------------------------
    def _pick_group(self) -> tuple[Mix | None, list[Slot]]:
        groups: dict[Mix | None, list[Slot]] = {}
        for slot in sorted(self._running(), key=lambda s: s.order):
            groups.setdefault(slot.group, []).append(slot)
        if not groups:
            return None, []
        stay = self._group in groups and (len(groups) == 1 or self._group_steps < self.fair_steps)
        if not stay:
            others = [g for g in groups if g != self._group] or list(groups)
            self._group, self._group_steps = others[0], 0
        self._group_steps += 1
        return self._group, groups[self._group]

    def _step(self) -> None:
        group, slots = self._pick_group()
        if not slots:
            return
        self.cx.set_context_mix(group or Mix())
        batch = StepBuilder(self.cx)
        rows = batch.fill(slots)
        if not rows and batch.n == 0:
            return
        seconds = batch.decode()
        self.stats.record_step(batch.n, batch.n_sequences, seconds)
        for slot in slots:
            slot.handle.steps += 1
            slot.handle.max_step_sequences = max(slot.handle.max_step_sequences, batch.n_sequences)
        for slot, row in rows:
            finished = accept_token(self.cx, slot, row, self.stats)
            if finished is not None:
                slot.handle._finish(finished)
                self.stats.finished += 1
                self._release(slot, keep_kv=True)

    # --- jobs -------------------------------------------------------------------------------
    def _set_adapters(self, handles: dict[str, Any]) -> None:
        for slot in self._slots:  # K/V of removed adapters, and routed K/V (computed over the old set), is stale
            kv = slot.kv_mix
            if kv is not None and not slot.busy and (kv.token_routing is not None or any(n not in handles for n in kv)):
                self.cx.keep_prefix(slot.seq_id, 0)
                slot.forget_kv()
        self.cx.register(handles)
        for slot in self._running():
            if slot.group is None:
                try:
                    self.cx.set_seq_mix(slot.seq_id, slot.handle.request.mix)
                except MixError as exc:  # a routed request whose pool is gone: it fails, the others run on
                    slot.handle._fail(exc)
                    self._release(slot, keep_kv=False)

    def _score_job(self, items: list):
        free = [s for s in self._slots if not s.busy]
        if not free:
            return _RETRY
        self.cx.set_context_mix(Mix())
        losses: list[float] = []
        for batch in plan_batches(items, self.cx.n_batch, len(free)):
            losses += score_batch(self.cx, free, [items[i] for i in batch])
        return losses

    def _choices_job(self, tokens: list[int], mix: Mix):
        free = [s for s in self._slots if not s.busy]
        if not free:
            return _RETRY
        slot = min(free, key=lambda s: s.last_used)
        self.cx.keep_prefix(slot.seq_id, 0)
        slot.forget_kv()
        self.cx.set_context_mix(Mix())
        self.cx.set_seq_mix(slot.seq_id, mix)
        try:
            return self.cx.decode_recorded(slot.seq_id, tokens)
        finally:
            self.cx.set_seq_mix(slot.seq_id, Mix())
            self.cx.keep_prefix(slot.seq_id, 0)

    def _logits_job(self, tokens: list[int], mix: Mix, path: str):
        free = [s for s in self._slots if not s.busy]
        if not free:
            return _RETRY
        if path == NATIVE and not self.cx.per_sequence(mix):
            raise LoramuxError(
                f"mix {mix} cannot run as a per-sequence mix (native library in use: {self.native}; "
                f"at most max_active={self.max_active} adapters)"
            )
        slot = min(free, key=lambda s: s.last_used)
        self.cx.keep_prefix(slot.seq_id, 0)
        slot.forget_kv()
        self.cx.set_context_mix(Mix() if path == NATIVE else mix)
        self.cx.set_seq_mix(slot.seq_id, mix if path == NATIVE else Mix())
        try:
            return self.cx.decode_all_logits(slot.seq_id, tokens)
        finally:
            self.cx.set_seq_mix(slot.seq_id, Mix())
            self.cx.keep_prefix(slot.seq_id, 0)


__all__ = ["Engine"]
