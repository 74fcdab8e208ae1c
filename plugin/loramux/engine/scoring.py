"""Teacher-forced scoring of many (tokens, mix) sequences, several mixes in one ``llama_decode``.

The job runs on the engine's scheduler thread between two steps (:meth:`Engine.score`): it takes
the free sequences, gives each one item's mix as a per-sequence mix (native library), puts as
many whole items into one batch as fit in ``n_batch`` tokens and the free sequences, and reads
the logits only where a target token is predicted. An item's loss is the mean negative
log-likelihood of its target tokens ``tokens[n_prompt:]``. Composition (LoraHub) scores every
candidate mix of one optimiser round this way: one decode for many candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from loramux.errors import LoramuxError
from loramux.mix import Mix


@dataclass(frozen=True)
class ScoreItem:
    """One sequence to score: the prompt's tokens then the target's, and the mix to score it under."""

    tokens: tuple[int, ...]
    n_prompt: int
    mix: Mix

    def __post_init__(self) -> None:
        if not 0 < self.n_prompt < len(self.tokens):
            raise LoramuxError(f"a scored item needs 1 <= n_prompt < len(tokens), got {self.n_prompt} of {len(self.tokens)}")


def mean_nll(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Mean negative log-likelihood of ``targets`` under rows of ``logits`` (float64 log-softmax)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(targets)), np.asarray(targets)].mean())


def plan_batches(items: Sequence[ScoreItem], n_batch: int, n_seqs: int) -> list[list[int]]:
    """Indices of the items of each decode: whole items, at most ``n_seqs`` and ``n_batch`` tokens each."""
    batches: list[list[int]] = [[]]
    used = 0
    for i, item in enumerate(items):
        n = len(item.tokens)
        if n > n_batch:
            raise LoramuxError(f"a scored item of {n} tokens does not fit in one batch of {n_batch}")
        if batches[-1] and (used + n > n_batch or len(batches[-1]) == n_seqs):
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += n
    return batches


def score_batch(cx, slots, items: Sequence[ScoreItem]) -> list[float]:
    """Score ``items`` (all fitting at once) on sequences ``slots``; the sequences are left empty."""
    rows: list[range] = []
    tokens: list[int] = []
    pos: list[int] = []
    seq: list[int] = []
    want: list[bool] = []
    try:
        for slot, item in zip(slots, items):
            cx.keep_prefix(slot.seq_id, 0)
            slot.forget_kv()
            cx.set_seq_mix(slot.seq_id, item.mix)
            n, t = len(tokens), len(item.tokens)  # logits where a target token is predicted
            rows.append(range(n + item.n_prompt - 1, n + t - 1))
            tokens += item.tokens
            pos += range(t)
            seq += [slot.seq_id] * t
            want += [item.n_prompt - 1 <= p < t - 1 for p in range(t)]
        cx.batch.set(tokens, pos, seq, want)
        cx.decode()
        return [mean_nll(np.stack([cx.logits_row(r) for r in idx]), item.tokens[item.n_prompt :]) for idx, item in zip(rows, items)]
    finally:
        for slot in slots[: len(items)]:
            cx.set_seq_mix(slot.seq_id, Mix())
            cx.keep_prefix(slot.seq_id, 0)


__all__ = ["ScoreItem", "mean_nll", "plan_batches", "score_batch"]
