"""Hidden states of a real llama.cpp forward pass, read where the graph computes them.

:class:`HiddenProbe` owns a small llama.cpp context of the pool's model (its own K/V, no
sampling) whose graph evaluation callback (``cb_eval``) copies out the tensors asked for by
name, e.g. ``attn_norm-29`` (the input of layer 29's q/k/v projections, after the RMSNorm),
``l_out-15`` (the residual stream after layer 15) or ``result_norm`` (the final norm). The pass
can run with adapters set on the context (stock ``llama_set_adapters_lora``; the engine's own
adapter handles, borrowed for the pass), so the captured tensors are the ones the mixed model
really computes. Routers use it: retrieval embeds prompts
with it, LoGo reads q_proj's input with it.

With an evaluation callback set, llama.cpp's scheduler computes the graph as views between the
observed nodes, which turns off the CPU backend's op fusion: the probe's numbers equal a
request's up to llama.cpp's batch floor (measured: logits within 1.08 of the engine's on the
default model, where the floor between batch layouts is 2), not bit for bit.

ggml tensor names are ``NAME-LAYER`` (llama.cpp's ``cb(cur, NAME, il)``); the rows of a captured
tensor are the batch's tokens in order (for ``result_norm``, only the rows whose logits were
asked for).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from loramux.errors import LoramuxError, RuntimeLoadError
from loramux.llama_batch import TokenBatch, new_context
from loramux.llama_runtime import ContextLoraState

GGML_TYPE_F32 = 0


class _GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of the vendored ggml (ggml/include/ggml.h), as far as ``name``."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


def _tensor_get_function():
    """``ggml_backend_tensor_get`` of the ggml the loaded libllama uses (it copies from any backend)."""
    import llama_cpp.llama_cpp as bindings

    lib = bindings._lib
    candidates = [lib]
    folder = Path(getattr(lib, "_name", "")).parent
    for pattern in ("libggml-base.*", "ggml-base.dll", "libggml.*"):
        candidates += [ctypes.CDLL(str(p)) for p in sorted(folder.glob(pattern)) if p.suffix in (".so", ".dylib", ".dll")]
    for handle in candidates:
        fn = getattr(handle, "ggml_backend_tensor_get", None)
        if fn is not None:
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
            fn.restype = None
            return fn
    raise RuntimeLoadError(f"ggml_backend_tensor_get is not exported by {folder}: the probe cannot read tensors")


class HiddenProbe:
    """A forward-pass-only llama.cpp context that captures named graph tensors. Thread-safe (one pass at a time)."""

    def __init__(self, model_ptr, *, n_ctx: int = 2048, n_batch: int = 512, n_threads: int = 2) -> None:
        import llama_cpp as lc

        self._lc = lc
        self._model = model_ptr
        self._lock = threading.Lock()
        self._want: set[str] = set()
        self._got: dict[str, list[np.ndarray]] = {}
        self._error: BaseException | None = None
        self._tensor_get = _tensor_get_function()
        # llama_cpp's own prototype (bool (*)(ggml_tensor *, bool ask, void *)), kept alive with the context
        self._callback = lc.ggml_backend_sched_eval_callback(self._on_tensor)
        self.ctx = new_context(model_ptr, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, cb_eval=self._callback)
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self._batch = TokenBatch(n_batch)
        self._mem = lc.llama_get_memory(self.ctx)
        self._lora = ContextLoraState(self.ctx)

    # --- the callback (runs inside llama_decode, on this thread) -----------------------------
    def _on_tensor(self, ptr: int, ask: bool, user_data: Any) -> bool:
        try:
            t = _GgmlTensor.from_address(ptr)
            name = t.name.decode("utf-8", "replace")
            if ask:
                return name in self._want
            if name in self._want:
                self._got.setdefault(name, []).append(self._copy(ptr, t, name))
        except BaseException as exc:  # never let an exception unwind through llama.cpp
            self._error = exc
        return True

    def _copy(self, ptr: int, t: _GgmlTensor, name: str) -> np.ndarray:
        if t.type != GGML_TYPE_F32 or t.ne[2] != 1 or t.ne[3] != 1 or t.nb[1] != 4 * t.ne[0]:
            raise LoramuxError(f"probe: tensor {name} is not a contiguous 2-d f32 tensor (type {t.type}, ne {list(t.ne)})")
        out = np.empty((t.ne[1], t.ne[0]), dtype=np.float32)
        self._tensor_get(ptr, out.ctypes.data, 0, out.nbytes)
        return out

    # --- a pass -----------------------------------------------------------------------------
    def capture(
        self, tokens: Sequence[int], names: Iterable[str], *, adapters: Iterable[tuple[Any, float]] = (), all_logits: bool = False
    ) -> dict[str, np.ndarray]:
        """Decode ``tokens`` (from position 0, alone) and return each named tensor, rows = tokens.

        ``adapters``: ``(LoraAdapterHandle, scale)`` pairs set on the probe context (stock
        llama.cpp), loaded while they stay set: the engine's own handles, borrowed
        (:meth:`loramux.AdapterPool.hidden_states` does that); empty: the base model. ``all_logits``: ask for every token's output (so ``result_norm`` has a row per token);
        otherwise only the last token's. Raises LoramuxError when a name was never computed.
        """
        tokens = [int(t) for t in tokens]
        if not 0 < len(tokens) <= self.n_ctx:
            raise LoramuxError(f"probe: a pass takes 1 to {self.n_ctx} tokens, got {len(tokens)}")
        names = set(names)
        with self._lock:
            self._lora.apply(list(adapters))
            self._want, self._got, self._error = names, {}, None
            try:
                self._decode(tokens, all_logits)
            finally:
                self._want = set()
                if not self._lc.llama_memory_seq_rm(self._mem, 0, 0, -1):
                    raise LoramuxError("probe: llama.cpp could not clear the probe's K/V")
            if self._error is not None:
                raise LoramuxError(f"probe: reading a tensor failed: {self._error}") from self._error
            missing = sorted(set(names) - set(self._got))
            if missing:
                raise LoramuxError(f"probe: the graph has no tensor named {', '.join(missing)}")
            return {k: np.concatenate(v, axis=0) for k, v in self._got.items()}

    def _decode(self, tokens: list[int], all_logits: bool) -> None:
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            pos = np.arange(start, start + len(chunk))
            self._batch.set(chunk, pos, 0, all_logits or pos == len(tokens) - 1)
            self._batch.decode(self.ctx)

    def drop_adapters(self) -> None:
        """Set no adapter on the probe's context (before the handles it holds are given back)."""
        with self._lock:
            if self.ctx:
                self._lora.apply([])

    def close(self) -> None:
        """Free the context. Idempotent."""
        with self._lock:
            if self.ctx:
                self._lora.clear()
                self._batch.close()
                self._lc.llama_free(self.ctx)
                self.ctx = None


def layer_index(n_layer: int, layer: int) -> int:
    """``layer`` as an index into ``n_layer`` layers (negative counts from the end), checked."""
    index = layer + n_layer if layer < 0 else layer
    if not 0 <= index < n_layer:
        raise LoramuxError(f"layer {layer} is outside the model's {n_layer} layers")
    return index


__all__ = ["HiddenProbe", "layer_index"]
