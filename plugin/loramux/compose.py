"""LoraHub composition: weights for the pool's adapters from a few labelled examples, gradient-free.

For at most five examples ``{input, target}`` a gradient-free optimiser (nevergrad ``NGOpt``,
LoraHub's choice; the ``compose`` extra) searches weights ``w`` in ``[-bound, bound]`` (1.5)
for the adapters, starting from 0, minimising

    loss(w) = mean over examples of the mean cross-entropy of the target tokens under the mix w
              + reg * mean |w|                                   (reg = 0.05, LoraHub's)

within ``budget`` evaluations (40). Each example is one user turn of the chat template followed
by its target and the end-of-turn token. The mix is the exact output-space sum ``sum_a w_a
delta_a`` (``mode="output"``, the default): the candidates of one optimiser round (``population``
of them) are scored together, every candidate x example one sequence with its own mix, in as few
``llama_decode`` calls as the batch holds (:meth:`loramux.AdapterPool.score`).

``mode="lorahub"``: LoraHub's own merge, ``A = sum w_a A_a`` and ``B = sum w_a B_a`` (cross terms;
all adapters must share rank, alpha and modules), each candidate written as one adapter, the
round's candidates loaded together and scored in one batch; kept so the two can be compared, not
the default. (w = 0 is then the zero adapter, i.e. the base model, as in the output mode.)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from loramux.engine.scoring import ScoreItem
from loramux.errors import LoramuxError, MixError
from loramux.mix import Mix

MAX_EXAMPLES = 5
BUDGET = 40
BOUND = 1.5
REG = 0.05
POPULATION = 8
MODES = ("output", "lorahub")


@dataclass
class ComposeResult:
    """The composed mix and how it was found."""

    mix: Mix
    loss: float  # the objective at the returned weights
    nll: float  # its cross-entropy part
    base_nll: float  # the examples' cross-entropy under the base model (w = 0)
    evaluations: int
    seconds: float
    settings: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)  # per round: best loss so far, seconds

    def to_json(self) -> dict[str, Any]:
        """``{"mix", "method", "loss", ...}``: what ``file:MIX.json`` and ``loramux compose -o`` use."""
        return {
            "mix": self.mix.to_dict(),
            "method": "lorahub",
            "loss": self.loss,
            "nll": self.nll,
            "base_nll": self.base_nll,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 2),
            "settings": self.settings,
            "history": self.history,
        }


def read_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``{input, target}`` JSON lines of ``path`` (1 to MAX_EXAMPLES of them)."""
    p = Path(path)
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError as exc:
        raise LoramuxError(f"cannot read examples {p}: {exc}") from exc
    rows = []
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise LoramuxError(f"{p}:{lineno}: not a JSON line ({exc})") from None
        if not isinstance(row, dict) or "input" not in row or "target" not in row:
            raise LoramuxError(f"{p}:{lineno}: an example needs 'input' and 'target'")
        rows.append(row)
    if not 1 <= len(rows) <= MAX_EXAMPLES:
        raise LoramuxError(f"{p}: composition takes 1 to {MAX_EXAMPLES} examples (LoraHub's few-shot setting), got {len(rows)}")
    return rows


def example_items(pool: Any, examples: Sequence[Mapping[str, Any]]) -> list[tuple[tuple[int, ...], int]]:
    """(tokens, n_prompt) per example: the chat prompt of its input, then its target and end of turn."""
    out = []
    for ex in examples:
        prompt = pool.tokenize(pool.chat_prompt([{"role": "user", "content": str(ex["input"])}]), special=True)
        target = pool.tokenize(str(ex["target"]), special=False) + [pool.token_eos()]
        out.append((tuple(prompt + target), len(prompt)))
    return out


def _check(examples: Sequence[Mapping[str, Any]], names: Sequence[str], settings: Mapping[str, Any]) -> None:
    if not 1 <= len(examples) <= MAX_EXAMPLES:
        raise LoramuxError(f"composition takes 1 to {MAX_EXAMPLES} examples (LoraHub's few-shot setting), got {len(examples)}")
    if any("input" not in e or "target" not in e for e in examples):
        raise LoramuxError("every example needs an 'input' and a 'target'")
    if not names:
        raise MixError("composition needs adapters: load some into the pool")
    if settings["mode"] not in MODES:
        raise LoramuxError(f"mode must be one of {MODES}, got {settings['mode']!r}")


class CompositionObjective:
    """The loss of weight vectors, scored in batches on the pool."""

    def __init__(self, pool: Any, names: Sequence[str], items, reg: float, batched: bool, mode: str = "output") -> None:
        self.pool, self.names, self.items, self.reg, self.batched = pool, list(names), items, reg, batched
        self.mode = mode

    def mix(self, w: np.ndarray) -> Mix:
        return Mix({n: float(x) for n, x in zip(self.names, w)})

    def nll(self, weights: Sequence[np.ndarray]) -> list[float]:
        """Mean target cross-entropy of each weight vector over the examples."""
        if self.mode == "lorahub":
            return self._merged_nll(weights)
        mixes = [self.mix(w) for w in weights]
        if not self.batched:
            return [self._nll_of([m])[0] for m in mixes]
        return self._nll_of(mixes)

    def _nll_of(self, mixes: Sequence[Mix]) -> list[float]:
        items = [ScoreItem(tokens, n, m) for m in mixes for tokens, n in self.items]
        losses = np.asarray(self.pool.score(items)).reshape(len(mixes), len(self.items))
        return losses.mean(axis=1).tolist()

    def _merged_nll(self, weights: Sequence[np.ndarray]) -> list[float]:
        """LoraHub's A/B merge: each candidate written as one adapter, all of a round loaded and scored in one batch."""
        import tempfile

        from loramux.converters.mix_gguf import write_averaged_gguf

        files = {n: self.pool.adapters[n].gguf_path for n in self.names}
        loaded: list[str] = []
        with tempfile.TemporaryDirectory(prefix="loramux-lorahub-") as tmp:
            try:
                for i, w in enumerate(weights):
                    name = f"lorahub-candidate-{i}"
                    path = write_averaged_gguf(dict(zip(self.names, map(float, w))), files, self.pool.base_path, Path(tmp) / f"{name}.gguf")
                    self.pool.load(path, name=name)
                    loaded.append(name)
                return self._nll_of([Mix({n: 1.0}) for n in loaded])
            finally:
                for name in loaded:
                    self.pool.unload(name)

    def loss(self, w: np.ndarray, nll: float) -> float:
        return nll + self.reg * float(np.abs(w).mean())


def compose(
    pool: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    adapters: Sequence[str] | None = None,
    budget: int = BUDGET,
    population: int = POPULATION,
    bound: float = BOUND,
    reg: float = REG,
    seed: int = 0,
    batched: bool = True,
    mode: str = "output",
    progress: Callable[[int, float], None] | None = None,
) -> ComposeResult:
    """LoraHub weights for ``adapters`` (default: all of the pool's) from ``examples`` (see the module docstring).

    ``progress(evaluations_done, best_loss)`` is called after every round. ``batched=False``
    scores one candidate at a time (the same losses, for timing the batch). ``mode="lorahub"``:
    LoraHub's A/B merge instead of the output-space sum (adapters of one rank, alpha and modules)."""
    names = list(adapters) if adapters is not None else list(pool.names)
    settings = {
        "budget": budget,
        "population": population,
        "bound": bound,
        "reg": reg,
        "seed": seed,
        "adapters": names,
        "examples": len(examples),
        "optimizer": "nevergrad NGOpt",
        "mode": mode,
    }
    _check(examples, names, settings)
    if mode == "output" and pool.max_active < len(names):
        raise LoramuxError(
            f"composition scores mixes of all {len(names)} adapters per sequence, but the pool holds "
            f"at most max_active={pool.max_active}: open it with AdapterPool(max_active={len(names)})"
        )
    ng = _nevergrad()
    objective = CompositionObjective(pool, names, example_items(pool, examples), reg, batched, mode)
    param = ng.p.Array(init=np.zeros(len(names))).set_bounds(-bound, bound)
    param.random_state.seed(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=budget, num_workers=population)
    start, done, history = time.perf_counter(), 0, []
    base_nll = objective.nll([np.zeros(len(names))])[0]
    best = (objective.loss(np.zeros(len(names)), base_nll), np.zeros(len(names)), base_nll)
    while done < budget:
        asked = [optimizer.ask() for _ in range(min(population, budget - done))]
        nlls = objective.nll([np.asarray(c.value) for c in asked])
        for cand, nll in zip(asked, nlls):
            w = np.asarray(cand.value)
            loss = objective.loss(w, nll)
            optimizer.tell(cand, loss)
            if loss < best[0]:
                best = (loss, w, nll)
        done += len(asked)
        history.append({"evaluations": done, "best_loss": best[0], "seconds": round(time.perf_counter() - start, 2)})
        if progress is not None:
            progress(done, best[0])
    loss, w, nll = best
    return ComposeResult(objective.mix(w), loss, nll, base_nll, done, time.perf_counter() - start, settings, history)


def _nevergrad():
    try:
        import nevergrad as ng
    except ImportError as exc:
        raise LoramuxError("composition needs nevergrad: pip install 'loramux[compose]'") from exc
    return ng


__all__ = [
    "BOUND",
    "BUDGET",
    "ComposeResult",
    "CompositionObjective",
    "MAX_EXAMPLES",
    "POPULATION",
    "REG",
    "compose",
    "example_items",
    "read_examples",
]
