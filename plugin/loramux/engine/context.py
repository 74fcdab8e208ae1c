"""The engine's llama.cpp context and everything native it does, each return code checked.

:class:`EngineContext` owns one ``llama_context`` (``n_seq_max`` sequences in one unified K/V
cache), its batch, the adapters registered on it for per-sequence mixes (:class:`SeqMixer`,
native library) and the context-level adapter set (:class:`ContextLoraState`, stock llama.cpp).
Only the engine's scheduler thread calls it (:meth:`EngineContext.check_routable` only reads).

A routed mix (``Mix.arrow()``, ``Mix.spectr()``: per-token routing among every registered adapter)
runs only per sequence: without the native library or a registered pool it is refused with a
MixError, never run as the base model.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Mapping, Sequence

import numpy as np

from loramux.engine.sampling import grammar_sampler
from loramux.errors import LoramuxError, MixError
from loramux.llama_batch import TokenBatch, new_context
from loramux.llama_runtime import ContextLoraState
from loramux.mix import Mix

if TYPE_CHECKING:  # pragma: no cover
    from loramux.native.mixer import TokenChoice


@dataclass(frozen=True)
class HeldAdapter:
    """A read-only view of one adapter the engine holds: its name, pinned file, slot in the
    per-sequence pool (None without the native library) and whether its llama.cpp tensors are
    loaded now (released after entering a slot, unless a context-level mix or its token-embedding
    LoRA needs them) or freed for good."""

    _handle: Any
    slot: int | None

    @property
    def name(self) -> str:
        return self._handle.name

    @property
    def path(self):
        return self._handle.path

    @property
    def loaded(self) -> bool:
        return self._handle.loaded

    @property
    def freed(self) -> bool:
        return self._handle.freed


class EngineContext:
    """One llama.cpp context of a model, with per-sequence and context-level mixes."""

    def __init__(
        self,
        model_ptr,
        *,
        n_seq_max: int,
        n_ctx: int,
        n_batch: int = 512,
        n_threads: int = 2,
        max_active: int = 3,
        native: bool = False,
        flash_attn: bool = False,
        device_form: bool = False,
    ) -> None:
        import llama_cpp as lc

        self._lc = lc
        self.model = model_ptr
        self.vocab = lc.llama_model_get_vocab(model_ptr)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        # one K/V stream per sequence (as llama-server -np N) unless $LORAMUX_KV_UNIFIED=1 (llama_batch.new_context)
        self.ctx = new_context(
            model_ptr,
            n_ctx=n_seq_max * n_ctx,
            n_seq_max=n_seq_max,
            n_batch=n_batch,
            n_threads=n_threads,
            flash_attn=flash_attn,
            kv_unified=os.environ.get("LORAMUX_KV_UNIFIED", "") == "1",
        )
        self.n_batch = n_batch
        self.native = native
        self.max_active = max_active
        self.batch = TokenBatch(n_batch)
        self._mem = lc.llama_get_memory(self.ctx)
        self.lora = ContextLoraState(self.ctx)
        self.context_mix = Mix()
        self.handles: dict[str, Any] = {}  # every adapter handle of the engine: this context owns them
        self.borrowed: dict[str, int] = {}  # name -> borrows (the probe's passes): kept loaded, not removed
        self.mixer = None
        if native:
            from loramux.native.mixer import SeqMixer

            self.mixer = SeqMixer(self.ctx, max_active=max_active, device_form=device_form)  # an empty pool of slots
        self.max_active_native = self.mixer.max_active if self.mixer is not None else 0
        # max_active of the pool, 0 while it holds no adapter: what Engine.submit checks routed
        # mixes against from the caller's thread. Updated only once a change is complete, so a
        # routed request arriving while the engine thread changes the pool is judged by a whole
        # pool, never by the moment in between (it is admitted on the engine thread after).
        self.routable_k = 0
        self._piece = ctypes.create_string_buffer(64)

    # --- adapters and mixes -----------------------------------------------------------------
    def per_sequence(self, mix: Mix) -> bool:
        """Whether ``mix`` runs as a per-sequence mix (else: set on the whole context).

        A routed mix always runs per sequence: raises MixError when it cannot run here."""
        if mix.token_routing is not None:
            self.check_routable(mix)
            return True
        return self.native and (not mix or (self.mixer is not None and len(mix) <= self.max_active))

    def check_grammar(self, grammar: str) -> None:
        """RequestError (``param`` grammar, llama.cpp's reason) unless GBNF ``grammar`` parses on this vocabulary."""
        self._lc.llama_sampler_free(grammar_sampler(self.vocab, grammar))

    def check_routable(self, mix: Mix) -> None:
        """Raise MixError (saying what to do) unless routed ``mix`` can run: the native library, a
        registered pool, top-k within the pool's max_active, and LoGo only on the fused CPU op."""
        routing = mix.token_routing
        if routing is None:
            return
        if not self.native:
            from loramux import native

            raise MixError(
                f"mix {mix} routes every token inside the graph, which needs loramux's native library; it is not in use "
                f"({native.status().reason or 'turned off'}): use a fixed mix name=w,..., or build the library (native/README.md)"
            )
        if routing.mode == "logo-token" and self.mixer is not None and self.mixer.device_form:
            raise MixError(
                f"mix {mix}: LoGo routing runs only in the fused CPU op, and this pool uses the device form "
                "(ggml_mul_mat_id, device_form=True), which does not implement it: use arrow or spectr here, "
                "or open the pool without the device form"
            )
        max_active = self.routable_k
        if max_active == 0:
            raise MixError(f"mix {mix} routes among the pool's adapters, but no adapter is loaded: load adapters first")
        if routing.k is not None and routing.k > max_active:
            raise MixError(
                f"mix {mix}: top-k {routing.k} is above this pool's max_active={max_active}; use k <= "
                f"{max_active}, or open the pool with max_active >= {routing.k} (loramux CLI: --max-active {routing.k})"
            )

    def add_adapters(self, handles: Mapping[str, Any]) -> None:
        """Take ownership of ``handles`` (name -> LoraAdapterHandle) and put them into the pool.

        With the native library each goes into a slot of the per-sequence pool; only these
        adapters are read (the library copies the other slots). Their native tensors are then
        released (memory held once) unless they adapt the token embeddings (read at decode time);
        :meth:`set_context_mix` loads them again when a wide mix needs them. On failure the
        handles are freed and nothing changes."""
        handles = dict(handles)
        try:
            if self.mixer is not None and handles:
                for h in handles.values():
                    h.ensure()
                self.mixer.fill({n: h.ptr for n, h in handles.items()})
        except BaseException:
            for h in handles.values():
                h.free()
            raise
        self.handles |= handles
        self._publish_routable()
        self._release_unused()

    def held(self) -> dict[str, HeldAdapter]:
        """What this context holds, by name (a snapshot; safe from any thread)."""
        slots = self.mixer.slots if self.mixer is not None else {}
        return {n: HeldAdapter(h, slots.get(n)) for n, h in dict(self.handles).items()}

    def remove_adapter(self, name: str) -> None:
        """Take ``name`` out of the pool (no sequence may use it) and free its handle."""
        if name in self.context_mix:
            self.set_context_mix(Mix())
        if self.mixer is not None:
            self.mixer.remove([name])
        self.handles.pop(name).free()
        self._publish_routable()

    def _publish_routable(self) -> None:
        """The pool's max_active for routed requests, once a change is complete (0 while it holds no adapter)."""
        self.routable_k = self.max_active_native if self.handles else 0

    def borrow(self, names) -> dict[str, Any]:
        """The handles of ``names``, loaded and kept so until :meth:`give_back` (another context,
        the probe's, sets them; the engine neither releases nor removes them meanwhile)."""
        missing = [n for n in names if n not in self.handles]
        if missing:
            raise MixError(f"adapters {', '.join(missing)} are not loaded (loaded: {', '.join(sorted(self.handles)) or 'none'})")
        for n in names:
            self.handles[n].ensure()
            self.borrowed[n] = self.borrowed.get(n, 0) + 1
        return {n: self.handles[n] for n in names}

    def give_back(self, names) -> None:
        for n in names:
            self.borrowed[n] -= 1
            if not self.borrowed[n]:
                del self.borrowed[n]
        self._release_unused()

    def _release_unused(self) -> None:
        if self.mixer is None:
            return
        for name, h in self.handles.items():
            if not h.adapts_embeddings and name not in self.context_mix and name not in self.borrowed:
                h.release()

    def set_seq_mix(self, seq_id: int, mix: Mix) -> None:
        """Give sequence ``seq_id`` its mix: fixed weights, per-token routing, or the base model (empty)."""
        if mix.token_routing is not None:
            self.check_routable(mix)
            self.mixer.set_routing(seq_id, *mix.token_routing.native_args())
        elif self.mixer is not None:
            if mix:
                self.mixer.set(seq_id, mix.to_dict())
            else:
                self.mixer.clear(seq_id)

    def set_context_mix(self, mix: Mix) -> None:
        """Set ``mix`` on the whole context (only when it changes: a change rebuilds the scheduler).
        A routed mix cannot be set on the whole context (MixError)."""
        if mix.token_routing is not None:
            raise MixError(f"mix {mix} routes per token and runs only as a per-sequence mix (path 'native'), never on the whole context")
        if mix != self.context_mix:
            for n in mix:
                self.handles[n].ensure()
            self.lora.apply([(self.handles[n], w) for n, w in mix.items()])
            self.context_mix = mix
            self._release_unused()

    # --- memory, decoding, tokens ------------------------------------------------------------
    def keep_prefix(self, seq_id: int, n: int) -> None:
        """Keep the K/V of the first ``n`` positions of ``seq_id`` (0: none)."""
        if not self._lc.llama_memory_seq_rm(self._mem, seq_id, n, -1):
            raise LoramuxError(f"llama.cpp could not free the K/V of sequence {seq_id} from position {n}")

    def copy_sequence(self, src: int, dst: int) -> None:
        """Make ``dst``'s K/V a copy of ``src``'s (``dst`` empty before; the copy lands at the next decode)."""
        self._lc.llama_memory_seq_cp(self._mem, src, dst, -1, -1)

    def decode(self) -> float:
        """Decode the rows set in :attr:`batch`; return the seconds it took."""
        seconds = self.batch.decode(self.ctx)
        if self.mixer is not None:
            self.mixer.check_applied()  # an adapted weight the graph could not apply is an error, never skipped
        return seconds

    def logits_row(self, i: int) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self.ctx, i)
        if not ptr:
            raise LoramuxError(f"llama.cpp has no logits for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def decode_all_logits(self, seq_id: int, tokens: Sequence[int]) -> np.ndarray:
        """Decode ``tokens`` as sequence ``seq_id`` from position 0 in one batch; every row's logits."""
        self.batch.set(tokens, range(len(tokens)), seq_id, True)
        self.decode()
        return np.stack([self.logits_row(i).copy() for i in range(len(tokens))])

    def decode_recorded(self, seq_id: int, tokens: Sequence[int], modules: Collection[str] | None = None) -> list["TokenChoice"]:
        """Decode ``tokens`` as routed sequence ``seq_id`` from position 0 in one batch, recording the
        adapters every token chose at every adapted weight; the rows of ``seq_id`` (at ``modules`` only,
        when given), in record order."""
        if self.mixer is None:
            raise MixError("recording routing choices needs a registered pool: load adapters first")
        self.mixer.record(True)
        try:
            self.batch.set(tokens, range(len(tokens)), seq_id, True)  # logits on every row: the last layer computes every token
            self.decode()
            return [c for c in self.mixer.take_choices(modules) if c.seq_id == seq_id]
        finally:
            self.mixer.record(False)

    def token_piece(self, token: int) -> bytes:
        n = self._lc.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:  # the buffer is too small: -n bytes are needed
            self._piece = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            raise LoramuxError(f"llama.cpp could not turn token {token} into text")
        return self._piece.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        """Free the context, then every adapter handle (adapters are freed before their model). Idempotent."""
        if self.ctx:
            if self.mixer is not None:
                self.mixer.close()
                self.mixer = None
                self.routable_k = 0
            self.lora.clear()
            self.batch.close()
            self._lc.llama_free(self.ctx)
            self.ctx = None
        for handle in self.handles.values():
            handle.free()
        self.handles = {}


__all__ = ["EngineContext", "HeldAdapter"]
