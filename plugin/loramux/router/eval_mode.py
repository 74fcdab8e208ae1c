"""``loramux eval --mix router:PATH``: the router chooses each row's mix; routing accuracy is reported.

Registered into :mod:`loramux.evaluate`'s mix-mode registry when :mod:`loramux.router` is imported.
The result JSON gains:

- ``"routing_top1_accuracy"``: among rows whose task names an adapter of the pool, the share whose
  mix's highest-weight adapter is that adapter (a tie for the highest weight, or the base model,
  counts as a miss);
- ``"routing"``: the router file, its providers, the number of rows behind the accuracy, how many
  rows took the fallback and why, and for rows of tasks without an adapter which adapter (or the
  base model) got the highest weight, per task.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from loramux.errors import MixError
from loramux.mix import Mix

BASE = "(base)"
TIE = "(tie)"


def top_adapter(mix: Mix) -> str:
    """The adapter with the highest weight in ``mix``: BASE for the empty mix, TIE when several share it."""
    if mix.is_base:
        return BASE
    best = max(mix.values())
    top = [n for n, w in mix.items() if w == best]
    return top[0] if len(top) == 1 else TIE


@dataclass
class RouterPolicy:
    """A :class:`loramux.evaluate.MixPolicy` backed by a :class:`loramux.Router`."""

    router: Any
    pool: Any
    path: str
    hits: int = 0
    scored: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    unmatched: dict[str, Counter] = field(default_factory=dict)

    def mix_for(self, row: Mapping[str, Any]) -> Mix:
        routing = self.router.route(str(row["input"]))
        mix = self.pool.resolve_mix(routing.mix)
        task = str(row["task"])
        top = top_adapter(mix)
        if routing.fallback:
            self.fallbacks[routing.fallback] += 1
        if task in self.router.adapters:
            self.scored += 1
            self.hits += top == task
        else:
            self.unmatched.setdefault(task, Counter())[top] += 1
        return mix

    def report(self) -> dict[str, Any]:
        return {
            "router": self.path,
            "routing_top1_accuracy": self.hits / self.scored if self.scored else None,
            "routing": {
                "providers": self.router.providers,
                "rows_with_adapter": self.scored,
                "fallbacks": dict(self.fallbacks),
                "tasks_without_adapter": {t: dict(c.most_common()) for t, c in sorted(self.unmatched.items())},
            },
        }


def router_mode(arg: str | None, ctx: Any) -> RouterPolicy:
    """Factory for ``--mix router:PATH``: load the router against the pool's base model and adapters."""
    from loramux.router.runtime import Router

    if not arg:
        raise MixError("mix mode 'router' needs a path: router:PATH")
    return RouterPolicy(Router.load(arg, pool=ctx.pool), ctx.pool, arg)


def register() -> None:
    """Install the ``router`` mode in loramux.evaluate's registry."""
    from loramux.evaluate import register_mix_mode

    register_mix_mode("router", router_mode)


__all__ = ["BASE", "TIE", "RouterPolicy", "register", "router_mode", "top_adapter"]
