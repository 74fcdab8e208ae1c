"""What per-token routing chose for a prompt: :class:`TokenChoiceReport` (``AdapterPool.token_choices``).

The pool teacher-forces the prompt's tokens alone in one batch under a routed mix (Arrow or
SpectR) with the native record on, and keeps, for every token and every adapted base weight, the
adapters the token chose there and their weights (:class:`~loramux.native.mixer.TokenChoice`).
The report holds those rows with the prompt's tokens and their text, for tables and plots.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from loramux.errors import LoramuxError
from loramux.mix import Mix

if TYPE_CHECKING:  # pragma: no cover
    from loramux.native.mixer import TokenChoice


@dataclass(frozen=True)
class TokenChoiceReport:
    """The routed mix, the prompt's token ids and pieces (text), and one choice per token per adapted weight."""

    mix: Mix
    tokens: tuple[int, ...]
    pieces: tuple[str, ...]
    choices: tuple["TokenChoice", ...]

    @property
    def modules(self) -> tuple[str, ...]:
        """The adapted base weights that routed (GGUF names, e.g. ``blk.3.attn_q.weight``), in record order."""
        return tuple(dict.fromkeys(c.module for c in self.choices))

    def at(self, module: str) -> list["TokenChoice"]:
        """The choices at base weight ``module``, by position."""
        return sorted((c for c in self.choices if c.module == module), key=lambda c: c.pos)

    def usage(self) -> dict[str, float]:
        """Per adapter: its summed weight over every (token, weight) choice, divided by their number."""
        total: Counter = Counter()
        for c in self.choices:
            for name, w in zip(c.adapters, c.weights):
                total[name] += w
        n = len(self.choices) or 1
        return {name: total[name] / n for name in sorted(total)}

    def select(self, weights: Sequence[str] | None) -> list["TokenChoice"]:
        """The choices at the base weights of these kinds (``"attn_q"`` matches ``blk.*.attn_q.weight``);
        all of them for ``None``. A kind that no choice has is a LoramuxError naming the kinds there are."""
        if weights is None:
            return list(self.choices)
        suffixes = tuple(f".{w}.weight" for w in weights)
        chosen = [c for c in self.choices if c.module.endswith(suffixes)]
        have = sorted({m.split(".")[-2] for m in self.modules})
        missing = [w for w in weights if not any(c.module.endswith(f".{w}.weight") for c in chosen)]
        if missing:
            raise LoramuxError(f"no routed base weight of kind {', '.join(missing)}; the routed kinds are {', '.join(have)}")
        return chosen

    def shares(self, adapters: Sequence[str], weights: Sequence[str] | None = None) -> np.ndarray:
        """(len(adapters), n_tokens): each adapter's routing weight at each token, averaged over the
        routed base weights of the kinds ``weights`` (all for ``None``); a token's column sums to 1."""
        row_of = {a: i for i, a in enumerate(adapters)}
        chosen = self.select(weights)
        unlisted = sorted({name for c in chosen for name in c.adapters} - set(row_of))
        if unlisted:
            raise LoramuxError(f"adapters {', '.join(unlisted)} were chosen but are not among the {len(adapters)} listed")
        out = np.zeros((len(adapters), len(self.tokens)))
        count = np.zeros(len(self.tokens))
        for c in chosen:
            if 0 <= c.pos < len(self.tokens):
                count[c.pos] += 1
                for name, w in zip(c.adapters, c.weights):
                    out[row_of[name], c.pos] += w
        return out / np.maximum(count, 1)

    def to_json(self) -> dict[str, Any]:
        """``{"mix", "tokens", "pieces", "choices": [{"module", "pos", "adapters", "weights"}]}`` (JSON-ready)."""
        rows = [{"module": c.module, "pos": c.pos, "adapters": list(c.adapters), "weights": list(c.weights)} for c in self.choices]
        return {"mix": self.mix.to_json(), "tokens": list(self.tokens), "pieces": list(self.pieces), "choices": rows}


__all__ = ["TokenChoiceReport"]
