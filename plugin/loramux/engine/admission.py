"""Admission: which waiting request starts in which free slot, and what a slot keeps when it ends.

A mixin of :class:`~loramux.engine.Engine` (its scheduler thread runs these between steps). A
request starts in the free slot holding the longest prefix of its prompt under exactly its mix
(:func:`~loramux.engine.slots.best_slot`); the choices of one request (``n > 1``) start together,
the first reading the prompt and the others waiting to copy its K/V
(:func:`~loramux.engine.slots.share_prompts`).
"""

from __future__ import annotations

from loramux.engine.request import RequestHandle
from loramux.engine.sampling import SequenceSampler
from loramux.engine.slots import NATIVE, Slot, best_slot
from loramux.engine.text import StopText
from loramux.errors import MixError
from loramux.mix import Mix


class Admission:
    """Starting and ending requests in slots (``self``: the engine)."""

    def _admit(self) -> None:
        while True:
            free = [s for s in self._slots if not s.busy]
            with self._cv:  # the choices of a request start together: it waits for as many free slots
                if not self._waiting or len(free) < 1 + len(self._waiting[0].choices):
                    return
                handle = self._waiting.popleft()
            group = [h for h in (handle, *handle.choices) if not h.cancelled]
            for h in (handle, *handle.choices):
                if h.cancelled:
                    self.stats.cancelled += 1
                    h._fail(h._cancelled_error())
            try:
                leader = self._start(group[0], free) if group else None
                for h in group[1:]:
                    self._start(h, [s for s in free if not s.busy], leader=leader)
            except Exception as exc:
                for h in group:
                    h._fail(exc)

    def _start(self, handle: RequestHandle, free: list[Slot], leader: Slot | None = None) -> Slot:
        req = handle.request
        for name in req.mix:
            if name not in self.cx.handles:
                raise MixError(
                    f"request {req.request_id!r}: adapter {name!r} is not loaded (loaded: {', '.join(sorted(self.cx.handles)) or 'none'})"
                )
        path = self.path_for(req.mix)
        slot, reuse = best_slot(free, () if leader else req.tokens, req.mix, path)
        if leader is not None:  # a choice after the first: it copies the leader's K/V of the prompt
            slot.waits_for = leader
            leader.followers.append(slot)
        sampler = SequenceSampler(req.sampling, self.cx.n_vocab, self.cx.vocab)
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
        return slot

    def _release(self, slot: Slot, *, keep_kv: bool) -> None:
        if not keep_kv:
            self.cx.keep_prefix(slot.seq_id, 0)
            slot.forget_kv()
        self.cx.set_seq_mix(slot.seq_id, Mix())
        slot.last_used = self.stats.steps
        slot.end_request()


__all__ = ["Admission"]
