"""Teacher forcing on the pool's engine: logits, per-token routing choices, scores.

:class:`TeacherForcing` is a base class of :class:`loramux.AdapterPool`: each call decodes given
tokens (no sampling) on the engine's thread between two steps of the running requests, under a
mix the pool resolves against its loaded adapters.
"""

from __future__ import annotations

from typing import Any, Collection, Sequence

import numpy as np

from loramux.engine import CONTEXT
from loramux.errors import MixError
from loramux.mix import MixLike
from loramux.routing_report import TokenChoiceReport


class TeacherForcing:
    """Logits, token choices and scores of :class:`loramux.AdapterPool`."""

    def logits(self, tokens: Sequence[int], mix: MixLike = None, *, path: str = CONTEXT) -> np.ndarray:
        """Teacher-forced logits (n_tokens, n_vocab) of ``tokens`` decoded alone in one batch under ``mix``.

        ``path="context"`` (default): the mix set on the whole context, exactly what stock
        llama.cpp computes; ``"native"``: as a per-sequence mix. At most ``n_batch`` tokens.
        """
        self._check_open()
        return self._engine.logits(tokens, self.resolve_mix(mix), path=path)

    def token_choices(self, prompt: str | Sequence[int], mix: MixLike, *, modules: Collection[str] | None = None) -> TokenChoiceReport:
        """What per-token routing chose for every token of ``prompt`` at every adapted weight.

        ``prompt`` (text, tokenized with BOS as :meth:`create_completion` does, or token ids, at
        most ``n_batch``) is teacher-forced alone in one batch under the routed ``mix`` (``"arrow"``,
        ``"spectr:k=3"``, ``Mix.arrow(k=2)``, ...) on the engine's thread, between two steps of the
        running requests, with the native record on. Needs the native library's fused CPU op (the
        device form does not record) and loaded adapters; a fixed mix is a MixError. ``modules`` (GGUF base
        weight names): keep only the choices at those weights (a router that reads a few weights skips
        turning the rest of the record into objects)."""
        self._check_open()
        resolved = self.resolve_mix(mix)
        tokens = self.tokenize(prompt, add_bos=True) if isinstance(prompt, str) else [int(t) for t in prompt]
        choices = self._engine.token_choices(tokens, resolved, None if modules is None else frozenset(modules))
        return TokenChoiceReport(resolved, tuple(tokens), tuple(self.piece(t) for t in tokens), tuple(choices))

    def score(self, items: Sequence[Any]) -> list[float]:
        """Mean target cross-entropy of each :class:`loramux.engine.scoring.ScoreItem` (tokens, n_prompt, mix).

        Items with different mixes are decoded together, as many per ``llama_decode`` as fit in
        ``n_batch`` tokens and the free sequences; every mix must run per sequence (native library,
        at most ``max_active`` adapters)."""
        from loramux.engine.scoring import ScoreItem

        self._check_open()
        resolved = [ScoreItem(tuple(i.tokens), i.n_prompt, self.resolve_mix(i.mix)) for i in items]
        return self._engine.score(resolved)

    def hidden_states(
        self, tokens: Sequence[int], names: Sequence[str], *, mix: MixLike = None, all_logits: bool = False
    ) -> dict[str, np.ndarray]:
        """Graph tensors ``names`` (e.g. ``attn_norm-29``) of a forward pass of ``tokens`` under ``mix``
        set on the whole context of the pool's :class:`~loramux.probe.HiddenProbe` (its own context,
        not the engine's: running requests are not held up). The mix's adapters are the engine's
        own handles, borrowed while the probe has them set (no file is read again per pass, and the
        same mix is always summed in the same order, so a pass is reproducible); :meth:`unload`
        makes the probe let go first."""
        resolved = self.resolve_mix(mix)
        if resolved.token_routing is not None:
            raise MixError(f"hidden_states sets a fixed mix on the probe's context; {resolved} routes per token")
        probe = self.probe()
        with self._probe_lock:
            wanted = tuple(sorted(resolved))
            if wanted != self._probe_names:
                self._probe_handles = self._engine.borrow(wanted)
                probe.drop_adapters()
                self._engine.give_back(self._probe_names)
                self._probe_names = wanted
            pairs = [(self._probe_handles[n], w) for n, w in resolved.items()]
            return probe.capture(tokens, names, adapters=pairs, all_logits=all_logits)

    def _probe_let_go(self, name: str) -> None:
        """The probe stops holding adapter ``name`` (before it is unloaded)."""
        with self._probe_lock:
            if name in self._probe_names:
                self._probe.drop_adapters()
                self._engine.give_back(self._probe_names)
                self._probe_names, self._probe_handles = (), {}


__all__ = ["TeacherForcing"]
