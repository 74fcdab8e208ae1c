"""Sequence slots of the engine's context, and the prefix cache they hold.

A slot is one llama.cpp sequence id. While a request runs in it, the slot holds the request's
state (prompt progress, sampler, text). When the request ends, the slot keeps the K/V of the
tokens it fed, tagged with the mix they were computed under: a later request with the same mix
and a common prefix starts from there (:func:`best_slot`). K/V is never reused under another
mix: the key of a slot is the exact :class:`~loramux.mix.Mix`, and a slot whose mix differs
gives no match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from loramux.engine.request import RequestHandle
from loramux.engine.sampling import SequenceSampler
from loramux.engine.text import StopText
from loramux.mix import Mix

NATIVE, CONTEXT = "native", "context"


@dataclass
class Slot:
    """One sequence id: the request running in it (if any) and the K/V it holds."""

    seq_id: int
    handle: RequestHandle | None = None
    kv_mix: Mix | None = None  # the mix the K/V in this sequence was computed under (None: empty)
    kv_path: str = NATIVE
    fed: list[int] = field(default_factory=list)  # tokens whose K/V is in the cache, in order
    last_used: int = 0
    # --- the running request ---
    prompt: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled token not yet fed
    sampler: SequenceSampler | None = None
    text: StopText | None = None
    group: Mix | None = None  # None: per-sequence mix (native); a Mix: set on the whole context
    limit: int = 0  # most tokens to generate
    cached: int = 0  # prompt tokens reused from the prefix cache
    order: int = 0
    # --- choices of one request (n > 1): one slot reads the prompt, the others copy its K/V ---
    waits_for: "Slot | None" = field(default=None, repr=False)  # the slot reading this one's prompt
    followers: list["Slot"] = field(default_factory=list, repr=False)  # slots waiting for this one's prompt

    @property
    def busy(self) -> bool:
        return self.handle is not None

    @property
    def prompt_left(self) -> int:
        """Prompt tokens to feed now: none while waiting for a leader's K/V; a leader stops one short
        of its prompt until its followers have copied that K/V (then all read the last token together)."""
        if self.waits_for is not None or self.out or self.pending is not None:
            return 0
        return len(self.prompt) - len(self.fed) - (1 if self.followers else 0)

    def forget_kv(self) -> None:
        self.kv_mix, self.fed = None, []

    def end_request(self) -> None:
        """Drop the running request's state (the K/V stays, for the prefix cache). Followers of this
        slot read their prompt themselves from now on; a follower leaves its leader's list."""
        for f in self.followers:
            f.waits_for = None
        if self.waits_for is not None:
            self.waits_for.followers.remove(self)
        self.followers, self.waits_for = [], None
        if self.sampler is not None:
            self.sampler.close()
        self.handle = self.sampler = self.text = self.group = None
        self.prompt, self.out, self.pending = [], [], None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def best_slot(free: Sequence[Slot], prompt: Sequence[int], mix: Mix, path: str) -> tuple[Slot, int]:
    """The free slot to run ``prompt`` in, and how many of its tokens' K/V it already holds.

    The longest common prefix under exactly the same mix and path wins (at least one prompt token
    is always decoded, for the logits); without one, the least recently used slot.
    """
    best, best_n = None, 0
    for slot in free:
        if slot.kv_mix is None or slot.kv_mix != mix or slot.kv_path != path:
            continue
        n = min(common_prefix(slot.fed, prompt), len(prompt) - 1)
        if n > best_n:
            best, best_n = slot, n
    if best is not None:
        return best, best_n
    return min(free, key=lambda s: (s.kv_mix is not None, s.last_used)), 0


def share_prompts(cx, slots: Sequence[Slot]) -> None:
    """Give each leader's followers the K/V of its prompt but the last token, once it has read it
    (``cx.copy_sequence``): the choices of one request then read only that last token each."""
    for leader in slots:
        if not leader.followers or len(leader.fed) != len(leader.prompt) - 1:
            continue
        for f in leader.followers:
            if leader.fed:
                cx.copy_sequence(leader.seq_id, f.seq_id)
            f.fed, f.cached, f.waits_for = list(leader.fed), len(leader.fed), None
        leader.followers = []


class GroupTurns:
    """Which group of running slots decodes next: slots sharing one context-level mix form a group
    (``slot.group``; None: every per-sequence slot). The current group keeps the turn for
    ``fair_steps`` steps while others wait, then the next one in arrival order takes it."""

    def __init__(self, fair_steps: int) -> None:
        self.fair_steps = fair_steps
        self.group: Mix | None = None
        self.steps = 0

    def pick(self, running: list[Slot]) -> tuple[Mix | None, list[Slot]]:
        groups: dict[Mix | None, list[Slot]] = {}
        for slot in sorted(running, key=lambda s: s.order):
            groups.setdefault(slot.group, []).append(slot)
        if not groups:
            return None, []
        stay = self.group in groups and (len(groups) == 1 or self.steps < self.fair_steps)
        if not stay:
            others = [g for g in groups if g != self.group] or list(groups)
            self.group, self.steps = others[0], 0
        self.steps += 1
        return self.group, groups[self.group]


__all__ = ["CONTEXT", "NATIVE", "GroupTurns", "Slot", "best_slot", "common_prefix", "share_prompts"]
