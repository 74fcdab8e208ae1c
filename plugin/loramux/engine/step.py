"""One decode step: which tokens go into the batch, and what each sampled token does.

:class:`StepBuilder` puts the next token of every running sequence of the step's group first
(one each), then chunks of the prompts still being read, in arrival order, as long as the batch
has room. :func:`accept_token` samples one row with the request's own sampler chain, streams
the token and its text to the caller, and says whether the request ended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from loramux.engine.request import Finished, TokenEvent
from loramux.engine.slots import CONTEXT, NATIVE, Slot

if TYPE_CHECKING:  # pragma: no cover
    from loramux.engine.context import EngineContext
    from loramux.engine.stats import EngineStats


class StepBuilder:
    """The batch of one step, built from the running slots of one group (written once, as arrays)."""

    def __init__(self, cx: "EngineContext") -> None:
        self.cx = cx
        self.n = 0
        self._seqs: set[int] = set()

    @property
    def n_sequences(self) -> int:
        return len(self._seqs)

    def fill(self, slots: Sequence[Slot]) -> list[tuple[Slot, int]]:
        """Fill the batch; return (slot, batch row) of every row whose logits will be sampled."""
        rows: list[tuple[Slot, int]] = []
        tokens: list[int] = []
        pos: list[int] = []
        seq: list[int] = []
        logits: list[bool] = []
        for slot in slots:
            if slot.pending is not None:
                rows.append((slot, len(tokens)))
                tokens.append(slot.pending)
                pos.append(len(slot.fed))
                seq.append(slot.seq_id)
                logits.append(True)
                slot.fed.append(slot.pending)
                slot.pending = None
        for slot in sorted(slots, key=lambda s: s.order):
            take = min(slot.prompt_left, self.cx.n_batch - len(tokens))
            if take <= 0:
                continue
            start = len(slot.fed)
            chunk = slot.prompt[start : start + take]
            last = start + take == len(slot.prompt)
            tokens += chunk
            pos += range(start, start + take)
            seq += [slot.seq_id] * take
            logits += [False] * (take - 1) + [last]
            if last:
                rows.append((slot, len(tokens) - 1))
            slot.fed += chunk
        self._seqs = set(seq)
        self.n = len(tokens)
        self.cx.batch.set(tokens, pos, seq, logits)
        return rows

    def decode(self) -> float:
        return self.cx.decode()


def log_probs(logits: np.ndarray, token: int, top: int) -> tuple[float, dict[int, float]]:
    """log-softmax of the raw logits: the chosen token's, and the ``top`` best tokens'."""
    z = logits.astype(np.float64)
    lse = float(np.log(np.exp(z - z.max()).sum()) + z.max())
    best = np.argpartition(-z, top)[:top] if 0 < top < z.size else np.arange(0)
    return float(z[token] - lse), {int(t): float(z[t] - lse) for t in sorted(best, key=lambda t: -z[t])}


def finished_result(slot: Slot, reason: str, tail: str) -> Finished:
    req = slot.handle.request
    return Finished(
        finish_reason=reason,
        text=slot.text.text,
        tail=tail,
        tokens=tuple(slot.out),
        prompt_tokens=len(slot.prompt),
        cached_tokens=slot.cached,
        mix=req.mix,
        path=NATIVE if slot.group is None else CONTEXT,
        stop_word=slot.text.stop_word,
    )


def accept_token(cx: "EngineContext", slot: Slot, row: int, stats: "EngineStats") -> Finished | None:
    """Sample batch row ``row`` for ``slot``'s request; stream the token; return Finished if it ended."""
    req = slot.handle.request
    raw = cx.logits_row(row) if req.logprobs is not None else None
    tok = slot.sampler.sample(cx.ctx, row)
    stops = req.stop_tokens
    if (tok in stops) if stops is not None else cx.is_eog(tok):
        return finished_result(slot, "stop", slot.text.finish())
    slot.out.append(tok)
    stats.tokens_generated += 1
    text = slot.text.feed(cx.token_piece(tok))
    lp, top = log_probs(raw, tok, req.logprobs) if raw is not None else (None, None)
    slot.handle._emit(TokenEvent(tok, text, lp, top))
    if slot.text.stopped:
        return finished_result(slot, "stop", "")
    if len(slot.out) >= slot.limit:
        return finished_result(slot, "length", slot.text.finish())
    slot.pending = tok
    return None


__all__ = ["StepBuilder", "accept_token", "finished_result", "log_probs"]
