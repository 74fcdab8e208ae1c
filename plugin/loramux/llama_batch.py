"""The one way loramux makes a llama.cpp context and fills a batch.

:func:`new_context` creates a ``llama_context`` with loramux's settings (one K/V stream per
sequence unless asked otherwise, llama-cpp-python's flash-attention default), for the engine,
the probe and teacher forcing alike. :class:`TokenBatch` owns one ``llama_batch`` whose columns
are numpy views: a step's rows are written as whole arrays (``set``), not one ctypes item at a
time, and each row's sequence id lives in one contiguous array (the batch's per-row id pointers
point into it; the batch's own small buffers are put back before ``llama_batch_free``).
"""

from __future__ import annotations

import ctypes
import time
from typing import Any, Sequence

import numpy as np

from loramux.errors import LoramuxError, RuntimeLoadError


def new_context(
    model_ptr,
    *,
    n_ctx: int,
    n_seq_max: int = 1,
    n_batch: int = 512,
    n_threads: int = 2,
    flash_attn: bool = False,
    kv_unified: bool = False,
    cb_eval: Any = None,
):
    """A ``llama_context *`` of ``n_ctx`` cells in all, ``n_seq_max`` sequences, batches of ``n_batch``.

    ``kv_unified=False`` (llama-server's -np layout): each sequence attends over its own cells only;
    a unified cache makes every token attend over every sequence's cells (masked), which at 32
    sequences cost 2-5x the decode time. ``flash_attn`` off by default, as ``llama_cpp.Llama``'s.
    ``cb_eval``: a graph evaluation callback (the probe's). RuntimeLoadError when llama.cpp refuses."""
    import llama_cpp as lc

    params = lc.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = n_seq_max
    params.kv_unified = kv_unified
    params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.n_threads = params.n_threads_batch = n_threads
    if cb_eval is not None:
        params.cb_eval, params.cb_eval_user_data = cb_eval, None
    ctx = lc.llama_init_from_model(model_ptr, params)
    if not ctx:
        raise RuntimeLoadError(
            f"llama.cpp could not create a context of {n_ctx} cells for {n_seq_max} sequence(s); lower n_seq_max or n_ctx"
        )
    return ctx


class TokenBatch:
    """A ``llama_batch`` of up to ``capacity`` tokens, one sequence id per token, filled through numpy."""

    def __init__(self, capacity: int) -> None:
        import llama_cpp as lc

        self._lc = lc
        self.capacity = capacity
        self.batch = lc.llama_batch_init(capacity, 0, 1)
        b = self.batch
        self.token = np.ctypeslib.as_array(b.token, shape=(capacity,))
        self.pos = np.ctypeslib.as_array(b.pos, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(b.logits, shape=(capacity,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(capacity,))[:] = 1
        self.seq = np.zeros(capacity, dtype=np.int32)
        self._own = [ctypes.cast(b.seq_id[i], ctypes.c_void_p).value for i in range(capacity)]
        row = ctypes.POINTER(ctypes.c_int32)
        for i in range(capacity):  # each row's id pointer into self.seq
            b.seq_id[i] = ctypes.cast(self.seq.ctypes.data + 4 * i, row)
        self.n = 0

    def set(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int] | int, logits: Sequence[bool] | bool) -> None:
        """Rows 0..len(tokens)-1: token ids, positions, sequence ids (one for all, or one per row), logit flags."""
        n = len(tokens)
        if n > self.capacity:
            raise LoramuxError(f"a batch of {n} tokens is over this batch's capacity of {self.capacity}")
        self.token[:n], self.pos[:n], self.seq[:n], self.logits[:n] = tokens, pos, seq, logits
        self.n = n

    def decode(self, ctx) -> float:
        """``llama_decode`` of the rows set; the seconds it took. LoramuxError with the code when it fails."""
        self.batch.n_tokens = self.n
        start = time.perf_counter()
        rc = self._lc.llama_decode(ctx, self.batch)
        seconds = time.perf_counter() - start
        if rc != 0:
            raise LoramuxError(
                f"llama_decode failed with code {rc} on a batch of {self.n} tokens (1: no room in the K/V cache; lower n_seq_max or n_ctx)"
            )
        return seconds

    def close(self) -> None:
        """Give the batch its own id buffers back and free it. Idempotent."""
        if self.batch is not None:
            for i, ptr in enumerate(self._own):
                self.batch.seq_id[i] = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_int32))
            self._lc.llama_batch_free(self.batch)
            self.batch = None


__all__ = ["TokenBatch", "new_context"]
