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

Adapter pool changes (:meth:`Engine.add_adapters`, :meth:`Engine.retire_adapter`), teacher-forced logits and routing
records (:meth:`Engine.token_choices`) run as jobs on the scheduler thread between two steps, so
nothing native changes under a running decode.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Sequence

from loramux.engine.admission import Admission
from loramux.engine.context import EngineContext
from loramux.engine.forced import RETRY as _RETRY
from loramux.engine.forced import ForcedJobs
from loramux.engine.request import EngineRequest, RequestHandle, check_choices, one_wakeup_per_loop
from loramux.engine.slots import CONTEXT, NATIVE, GroupTurns, Slot, share_prompts
from loramux.engine.stats import EngineStats
from loramux.engine.step import StepBuilder, accept_token
from loramux.errors import LoramuxError, QueueFullError, RequestCancelled
from loramux.mix import Mix

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


class Engine(Admission, ForcedJobs):
    """Continuous batching of every request on one context of a model (``llama_model *``).

    ``n_ctx`` is the context of one sequence (prompt + generated tokens of one request); the
    context holds ``n_seq_max`` of them in one unified K/V cache. ``native``: use per-sequence
    mixes (the patched library). ``max_queue`` bounds the requests waiting for a slot.
    """

    def __init__(
        self, model_ptr, *, n_seq_max: int = 8, n_ctx: int = 2048, max_queue: int = 256, fair_steps: int = 8, **context: Any
    ) -> None:
        """``context``: :class:`EngineContext`'s options (n_batch, n_threads, max_active, native, flash_attn, device_form)."""
        if n_seq_max < 1 or n_ctx < 8 or max_queue < 1:
            raise LoramuxError(f"engine needs n_seq_max >= 1, n_ctx >= 8, max_queue >= 1 (got {n_seq_max}, {n_ctx}, {max_queue})")
        self.cx = EngineContext(model_ptr, n_seq_max=n_seq_max, n_ctx=n_ctx, **context)
        self.n_ctx, self.n_seq_max, self.max_queue = n_ctx, n_seq_max, max_queue
        self.stats = EngineStats()
        self._slots = [Slot(i) for i in range(n_seq_max)]
        self._waiting: deque[RequestHandle] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._order = 0
        self._turns = GroupTurns(fair_steps)
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
    def busy_slots(self) -> list[bool]:
        """For each sequence id: whether a request runs in it now."""
        return [s.busy for s in self._slots]

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_batch(self) -> int:
        """The most tokens one ``llama_decode`` takes (logits(), token_choices())."""
        return min(self.cx.n_batch, self.n_ctx)

    @property
    def lora_stats(self):
        """How often a mix was set on the whole context (:class:`~loramux.llama_runtime.LoraSetStats`)."""
        return self.cx.lora.stats

    def held(self):
        """The adapters the engine holds, by name (:class:`~loramux.engine.context.HeldAdapter` views)."""
        return self.cx.held()

    def path_for(self, mix: Mix) -> str:
        """``"native"`` when ``mix`` runs as a per-sequence mix, ``"context"`` when set on the whole context."""
        return NATIVE if self.cx.per_sequence(mix) else CONTEXT

    def submit(self, request: EngineRequest, *, loop=None) -> RequestHandle:
        """Queue ``request``; it joins the batch at the next step with a free sequence. Raises
        ContextLengthError when it cannot fit one sequence, RequestError for a token id outside the
        vocabulary, QueueFullError when the queue is full."""
        return self.submit_choices([request], loop=loop)[0]

    def submit_choices(self, requests: Sequence[EngineRequest], *, loop=None) -> list[RequestHandle]:
        """Queue the choices of one request (same prompt and mix; their own samplers): they start
        together, one sequence reads the prompt and the others copy its K/V (:func:`share_prompts`)."""
        check_choices(requests, self.n_seq_max)
        for request in requests:
            request.check_limits(n_ctx=self.n_ctx, n_vocab=self.cx.n_vocab)
            if request.sampling.grammar is not None:  # parsed here, so that a bad one never reaches a step
                self.cx.check_grammar(request.sampling.grammar)
        self.cx.check_routable(requests[0].mix)  # a routed mix that cannot run is refused here, never run as the base model
        handles = [RequestHandle(r, loop) for r in requests]
        handles[0].choices = handles[1:]
        with self._cv:
            if self._closing:
                raise LoramuxError("the engine is closed")
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue}); retry later")
            self._waiting.append(handles[0])
            self.stats.submitted += len(handles)
            self._cv.notify()
        return handles

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

    def add_adapters(self, handles: Mapping[str, Any]) -> None:
        """Put new adapters (name -> LoraAdapterHandle) into the pool between two steps; the engine
        owns the handles from here on (freed on failure). Running requests keep their mixes; only
        these adapters are read. Routed K/V (computed over the old set) is dropped."""
        self.call(lambda: self._change_pool(lambda: self.cx.add_adapters(handles), removed=None))

    def retire_adapter(self, name: str, then: Callable[[], None]) -> None:
        """Once no running or waiting request uses ``name``: take it out of the pool, free it, call ``then``."""

        def job():
            if name in self.cx.borrowed or any(name in h.request.mix or h.request.mix.token_routing is not None for h in self._users()):
                return _RETRY
            self._change_pool(lambda: self.cx.remove_adapter(name), removed=name)
            then()
            return None

        self.call(job)

    def borrow(self, names) -> dict[str, Any]:
        """The handles of ``names`` (name -> LoraAdapterHandle), loaded and neither released nor
        retired until :meth:`give_back`: for passes on another context (the probe's)."""
        names = list(names)
        return self.call(lambda: self.cx.borrow(names))

    def give_back(self, names) -> None:
        names = list(names)
        self.call(lambda: self.cx.give_back(names))

    def clear_prefix_cache(self) -> None:
        """Forget the K/V that ended requests left in their sequences (the next prompts are read whole)."""

        def job():
            for slot in self._slots:
                if not slot.busy and slot.kv_mix is not None:
                    self.cx.keep_prefix(slot.seq_id, 0)
                    slot.forget_kv()

        self.call(job)

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

    # --- release ---------------------------------------------------------------------------
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
    def _step(self) -> None:
        group, slots = self._turns.pick(self._running())
        if not slots:
            return
        self.cx.set_context_mix(group or Mix())
        share_prompts(self.cx, slots)
        batch = StepBuilder(self.cx)
        rows = batch.fill(slots)
        if not rows and batch.n == 0:
            return
        seconds = batch.decode()
        self.stats.record_step(batch.n, batch.n_sequences, seconds)
        for slot in slots:
            slot.handle.steps += 1
            slot.handle.max_step_sequences = max(slot.handle.max_step_sequences, batch.n_sequences)
        with one_wakeup_per_loop():  # the step's tokens reach each event loop in one hand-off
            for slot, row in rows:
                try:
                    finished = accept_token(self.cx, slot, row, self.stats)
                except Exception as exc:  # this request's sampling or text failed: it alone fails
                    slot.handle._fail(exc if isinstance(exc, LoramuxError) else LoramuxError(f"sampling failed: {exc}"))
                    self._release(slot, keep_kv=False)
                    continue
                if finished is not None:
                    slot.handle._finish(finished)
                    self.stats.finished += 1
                    self._release(slot, keep_kv=True)

    # --- jobs -------------------------------------------------------------------------------
    def _change_pool(self, change: Callable[[], None], *, removed: str | None) -> None:
        for slot in self._slots:  # K/V of a removed adapter, and routed K/V (computed over the old set), is stale
            kv = slot.kv_mix
            if kv is not None and not slot.busy and (kv.token_routing is not None or (removed is not None and removed in kv)):
                self.cx.keep_prefix(slot.seq_id, 0)
                slot.forget_kv()
        change()
        if self.cx.mixer is not None:
            self.stats.pool_rebuilt, self.stats.pool_in_place = self.cx.mixer.changes()


__all__ = ["Engine"]
