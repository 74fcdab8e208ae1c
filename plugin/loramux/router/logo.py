"""LoGo routing: each adapter is scored by the size of its own output on the prompt, no training, no samples.

One pass of the prompt (one user turn of the chat template, so the last token is where the answer
starts; ``template=raw``: the text with BOS) is teacher-forced on the pool's engine under per-token
LoGo routing (``logo-token``, :mod:`loramux.token_routing`) with the native record on. The fused
CPU op scores every adapter that adapts a base weight by its own output on that weight's real
input, ``s_e = ||D_e x|| / c_e`` (``D_e = k_e B_e A_e`` exactly as llama.cpp applies the adapter),
keeps the top k with ``w = s / sum(s)`` and records them: the signal is the graph's own, taken on
the same pass. The router reads the record's row at one base weight (default: the last layer's q
projection, ``layer=-1,module=attn_q``; Phi-3's fused ``attn_qkv``) and the last prompt token:
that row is the mix.

Calibration ``cal`` (``c_e``, folded in when the adapters are registered):

- ``none``: LoGo's raw signal (the default is ``spectral``, which beat it on the dev split: BENCHMARKS.md). In a pool of adapters trained alike it ranks the adapters by how
  strongly the prompt draws them out; in a pool of different ranks, scales and learning rates the
  adapters with the largest deltas win every prompt (BENCHMARKS.md, "LoGo");
- ``spectral``: ``c_e = ||D_e||_2``, the share of the adapter's largest possible gain that this input
  draws out;
- ``frobenius``: ``c_e = ||D_e||_F``, the output relative to the adapter's expected response to an
  isotropic input.

Differences from LoGo's code, each measured or forced by the graph: the pass applies each token's
top-k at every layer (LoGo's sets every adapter at weight 1: 22 adapters cost about 2x a prefill,
the routed pass about what SpectR costs, BENCHMARKS.md); the module's input is the one it
multiplies (after the RMSNorm; LoGo's code reads the residual stream); the entropy score of LoGo's
paper is not offered (the op records norms only). Every pass starts from an empty K/V.

``k``: LoGo keeps 20 of 260 adapters (about 8 %); with a pool of 22 task adapters the default is 3,
as retrieval's. It cannot exceed the pool's ``max_active`` (the record keeps a token's chosen k).
"""

from __future__ import annotations

from typing import Any

from loramux.errors import MixError
from loramux.mix import Mix
from loramux.probe import layer_index
from loramux.router.options import parse_options
from loramux.router.selection import Routing
from loramux.token_routing import CALIBRATIONS, DEFAULT_CALIBRATION

DEFAULTS: dict[str, Any] = {"k": 3, "cal": DEFAULT_CALIBRATION, "layer": -1, "module": "attn_q", "template": "chat"}
TEMPLATES = ("chat", "raw")


class LogoRouter:
    """Scores the pool's adapters by their own LoRA output at one base weight, per prompt, from the graph."""

    def __init__(self, pool: Any, *, options: str | None = None) -> None:
        s = parse_options(options, DEFAULTS, source="logo")
        if s["k"] < 1 or s["cal"] not in CALIBRATIONS or s["template"] not in TEMPLATES:
            raise MixError(f"logo: want k >= 1, cal in {'|'.join(CALIBRATIONS)}, template {'|'.join(TEMPLATES)}; got {s}")
        if s["k"] > pool.max_active:
            raise MixError(f"logo: k={s['k']} is above the pool's max_active={pool.max_active}; load the pool with a larger max_active")
        self.pool, self.settings = pool, s
        self.layer = layer_index(pool.n_layer, s["layer"])
        module = s["module"]
        if module == "attn_q" and f"blk.{self.layer}.attn_q.weight" not in pool.base_info.tensor_shapes:
            module = "attn_qkv"  # Phi-3 keeps q, k and v fused: the same input, the fused output
        self.tensor = f"blk.{self.layer}.{module}.weight"
        self.routing = pool.resolve_mix(Mix.logo_token(k=s["k"], calibration=s["cal"]))
        pool.path_for(self.routing)  # refused here when this pool cannot route (native library, device form)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.pool.names)

    def tokens(self, prompt: str) -> list[int]:
        """The prompt's tokens as a request decodes them (the last ``n_batch`` of them)."""
        limit = min(self.pool.n_batch, self.pool.n_ctx)
        if self.settings["template"] == "raw":
            return self.pool.tokenize(str(prompt), add_bos=True)[-limit:]
        return self.pool.text.prompt_of(None, [{"role": "user", "content": str(prompt)}])[0][-limit:]

    def scores(self, prompt: str) -> dict[str, float]:
        """The top-k adapters' weights ``s / sum(s)`` at the router's base weight and the last prompt token."""
        tokens = self.tokens(prompt)
        rows = self.pool.token_choices(tokens, self.routing, modules={self.tensor}).choices
        last = [c for c in rows if c.pos == len(tokens) - 1]
        if not last:
            raise MixError(f"logo: no loaded adapter adapts {self.tensor}; choose another layer= or module=")
        return dict(zip(last[0].adapters, last[0].weights))

    def route(self, prompt: str) -> Routing:
        scores = self.scores(prompt)
        top = max(scores, key=lambda n: (scores[n], n))
        return Routing(Mix(scores), scores, None, top, scores[top])

    def close(self) -> None:
        pass


__all__ = ["DEFAULTS", "LogoRouter"]
