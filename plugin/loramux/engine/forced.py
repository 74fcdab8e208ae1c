"""Teacher-forced jobs of the engine: logits, routing records, scores, between two decode steps.

:class:`ForcedJobs` is a base class of :class:`~loramux.engine.Engine`. Each public call checks its
input on the caller's thread, then runs as a job on the scheduler thread (``Engine.call``) on a
free sequence, so nothing native changes under a running decode; a job that finds no free
sequence returns :data:`RETRY` and runs again after the next step.
"""

from __future__ import annotations

from loramux.engine.scoring import plan_batches, score_batch
from loramux.engine.slots import CONTEXT, NATIVE
from loramux.errors import LoramuxError, MixError
from loramux.mix import Mix
from loramux.token_routing import ROUTING_MODES

RETRY = object()  # a job returns this to run again after the next step


class ForcedJobs:
    """Teacher forcing on the engine's context (uses the engine's ``cx``, ``_slots``, ``call``)."""

    def logits(self, tokens, mix: Mix, *, path: str = CONTEXT):
        """Teacher-forced logits (n, n_vocab) of ``tokens`` under ``mix``, decoded alone in one batch.

        ``path="context"``: the mix set on the whole context, llama.cpp's stock numerics;
        ``"native"``: as a per-sequence mix (needs the native library and a narrow mix)."""
        tokens = self._one_batch("logits()", tokens)
        return self.call(lambda: self._logits_job(tokens, mix, path))

    def token_choices(self, tokens, mix: Mix, modules=None) -> list:
        """Teacher-force ``tokens`` alone in one batch under routed ``mix`` and return the
        :class:`~loramux.native.mixer.TokenChoice` of every token at every adapted weight (at the
        base weights ``modules`` only, when given)."""
        tokens = self._one_batch("token_choices()", tokens)
        if mix.token_routing is None:
            raise MixError(f"token choices are recorded for routed mixes ({', '.join(ROUTING_MODES)}); {mix} is not one")
        self.cx.check_routable(mix)
        return self.call(lambda: self._choices_job(tokens, mix, modules))

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

    def _score_job(self, items: list):
        free = [s for s in self._slots if not s.busy]
        if not free:
            return RETRY
        self.cx.set_context_mix(Mix())
        losses: list[float] = []
        for batch in plan_batches(items, self.cx.n_batch, len(free)):
            losses += score_batch(self.cx, free, [items[i] for i in batch])
        return losses

    def _choices_job(self, tokens: list[int], mix: Mix, modules=None):
        free = [s for s in self._slots if not s.busy]
        if not free:
            return RETRY
        slot = min(free, key=lambda s: s.last_used)
        self.cx.keep_prefix(slot.seq_id, 0)
        slot.forget_kv()
        self.cx.set_context_mix(Mix())
        self.cx.set_seq_mix(slot.seq_id, mix)
        try:
            return self.cx.decode_recorded(slot.seq_id, tokens, modules)
        finally:
            self.cx.set_seq_mix(slot.seq_id, Mix())
            self.cx.keep_prefix(slot.seq_id, 0)

    def _logits_job(self, tokens: list[int], mix: Mix, path: str):
        free = [s for s in self._slots if not s.busy]
        if not free:
            return RETRY
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


__all__ = ["RETRY", "ForcedJobs"]
