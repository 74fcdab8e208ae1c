"""The llama.cpp layer under the pool: one small class per native handle, every return code checked.

- :class:`LoraAdapterHandle` owns one ``llama_adapter_lora *`` (``llama_adapter_lora_init`` /
  ``llama_adapter_lora_free``). Adapters must be freed before the model they were loaded on.
- :class:`ContextLoraState` remembers the adapters and scales currently set on one
  ``llama_context`` and calls ``llama_set_adapters_lora`` only when they change: a change makes
  llama.cpp rebuild its scheduler (``sched_reserve``) and drop graph reuse at the next decode.
- :func:`decode_logits` runs one teacher-forced batch and returns every position's logits
  (used by the oracle tests and the benchmarks).
- :func:`capture_llama_log` collects llama.cpp's log lines while a call runs, so that a
  refusal can be reported with llama.cpp's own reason.
- :func:`silence_llama_log` mutes llama.cpp's log for the rest of the process. The ctypes
  callback it installs lives at module level: llama.cpp keeps calling the callback it was given
  (``llama_free`` logs too), and a callback garbage-collected before the last free makes the
  process crash with SIGSEGV at exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from loramux.errors import LoramuxError, RuntimeLoadError

# ggml_log_level values (ggml.h): 2 = WARN, 3 = ERROR.
_LOG_WARN, _LOG_ERROR = 2, 3


@dataclass
class LlamaLog:
    """Warning and error lines llama.cpp logged while a block ran."""

    lines: list[str] = field(default_factory=list)

    def reason(self) -> str:
        text = " ".join(line.strip() for line in self.lines if line.strip())
        return text or "llama.cpp gave no reason (run with verbose=True to see its log)"


_CAPTURE_LOCK = threading.RLock()  # llama.cpp has one log callback per process: one capture at a time


@contextlib.contextmanager
def capture_llama_log(*, echo: bool = False) -> Iterator[LlamaLog]:
    """Collect llama.cpp WARN/ERROR log lines during the block (``echo``: also print every line to stderr),
    then restore llama-cpp-python's logger. Captures from several threads take turns."""
    import llama_cpp
    from llama_cpp import _logger

    with _CAPTURE_LOCK, _captured(llama_cpp, _logger, echo) as log:
        yield log


_SINKS: list[tuple[LlamaLog, bool]] = []  # the capture in progress (the lock keeps it to one)
_COLLECT_CALLBACK = None  # one callback for every capture, never freed (see _collect_callback)


def _collect_callback(llama_cpp):
    """The log callback of every capture, made once and kept for the process: llama.cpp may still call
    a callback it read just before a capture ended (another thread's decode logging), so a callback
    freed at the end of a capture could be called after its memory was reused (a crash, seen in CI)."""
    global _COLLECT_CALLBACK
    if _COLLECT_CALLBACK is None:

        @llama_cpp.llama_log_callback
        def _collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if not _SINKS:
                return
            log, echo = _SINKS[-1]
            line = text.decode("utf-8", errors="replace")
            if level in (_LOG_WARN, _LOG_ERROR):
                log.lines.append(line)
            if echo:
                sys.stderr.write(line)

        _COLLECT_CALLBACK = _collect
    return _COLLECT_CALLBACK


@contextlib.contextmanager
def _captured(llama_cpp, _logger, echo: bool) -> Iterator[LlamaLog]:
    log = LlamaLog()
    _SINKS.append((log, echo))
    llama_cpp.llama_log_set(_collect_callback(llama_cpp), ctypes.c_void_p(0))
    try:
        yield log
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        _SINKS.pop()


_SILENT_CALLBACK = None  # set once by silence_llama_log(); must outlive every llama.cpp object


def silence_llama_log(*, errors_to_stderr: bool = False) -> None:
    """Mute llama.cpp's log (``errors_to_stderr``: still print ERROR lines) for the rest of the process."""
    global _SILENT_CALLBACK
    import llama_cpp

    if _SILENT_CALLBACK is None:

        @llama_cpp.llama_log_callback
        def _silent(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if errors_to_stderr and level == _LOG_ERROR:
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        _SILENT_CALLBACK = _silent
    llama_cpp.llama_log_set(_SILENT_CALLBACK, ctypes.c_void_p(0))


class LoraAdapterHandle:
    """Owns one llama.cpp LoRA adapter loaded on a model.

    :meth:`release` frees the native tensors but keeps the handle (the native per-sequence path
    holds its own copy once registered); :meth:`ensure` loads them again from the file when a
    context-level mix or a new registration needs them. :meth:`free` ends the handle.
    """

    def __init__(self, model_ptr, path: str | Path, name: str, *, verbose: bool = False, adapts_embeddings: bool = False) -> None:
        self.name = name
        self.path = Path(path)
        self.adapts_embeddings = adapts_embeddings
        self._model = model_ptr
        self._verbose = verbose
        self._ptr = None
        self._freed = False
        self.ensure()

    def ensure(self) -> None:
        """Load the native adapter if it is not loaded (after :meth:`release`)."""
        import llama_cpp

        if self._freed:
            raise LoramuxError(f"adapter {self.name!r} was already freed")
        if self._ptr is not None:
            return
        with capture_llama_log(echo=self._verbose) as log:
            ptr = llama_cpp.llama_adapter_lora_init(self._model, str(self.path).encode("utf-8"))
        if not ptr:
            raise RuntimeLoadError(f"llama.cpp refused adapter {self.name!r} ({self.path}): {log.reason()}")
        self._ptr = ptr

    def release(self) -> None:
        """Free the native tensors, keeping the handle (``ensure`` loads them again)."""
        import llama_cpp

        if self._ptr is not None:
            llama_cpp.llama_adapter_lora_free(self._ptr)
            self._ptr = None

    @property
    def loaded(self) -> bool:
        return self._ptr is not None

    @property
    def ptr(self):
        if self._ptr is None:
            state = "freed" if self._freed else "released (call ensure())"
            raise LoramuxError(f"adapter {self.name!r} was {state}")
        return self._ptr

    @property
    def freed(self) -> bool:
        return self._freed

    def free(self) -> None:
        """Free the native adapter for good (idempotent). Call before the model is freed."""
        self.release()
        self._freed = True


@dataclass
class LoraSetStats:
    """How often the adapter set of a context changed, and what the calls cost."""

    set_calls: int = 0  # llama_set_adapters_lora calls made
    skipped: int = 0  # applies that found the same set and scales (no call)
    set_seconds: float = 0.0  # time inside llama_set_adapters_lora (the rebuild cost comes at the next decode)


class ContextLoraState:
    """The adapters and scales set on one llama_context; sets them only when they change."""

    def __init__(self, ctx_ptr) -> None:
        self._ctx = ctx_ptr
        self._current: tuple[tuple[int, float], ...] = ()
        self.stats = LoraSetStats()

    @staticmethod
    def _key(pairs: Sequence[tuple[LoraAdapterHandle, float]]) -> tuple[tuple[int, float], ...]:
        # llama.cpp keeps float scales and drops zero ones; compare what it would store.
        return tuple(sorted((id(h), float(np.float32(s))) for h, s in pairs if float(np.float32(s)) != 0.0))

    @property
    def current(self) -> tuple[tuple[int, float], ...]:
        return self._current

    def apply(self, pairs: Sequence[tuple[LoraAdapterHandle, float]]) -> bool:
        """Set exactly these adapters with these scales; return True if llama_set_adapters_lora was called."""
        import llama_cpp

        key = self._key(pairs)
        if key == self._current:
            self.stats.skipped += 1
            return False
        live = [(h, s) for h, s in pairs if float(np.float32(s)) != 0.0]
        n = len(live)
        if n:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*[h.ptr for h, _ in live])
            scales = (ctypes.c_float * n)(*[float(s) for _, s in live])
        else:
            adapters, scales = None, None
        start = time.perf_counter()
        rc = llama_cpp.llama_set_adapters_lora(self._ctx, adapters, n, scales)
        self.stats.set_seconds += time.perf_counter() - start
        self.stats.set_calls += 1
        if rc != 0:
            names = ", ".join(h.name for h, _ in live) or "(none)"
            raise RuntimeLoadError(f"llama_set_adapters_lora failed with code {rc} for adapters {names}")
        self._current = key
        return True

    def clear(self) -> bool:
        """Remove every adapter from the context (the base model)."""
        return self.apply(())


def decode_logits(ctx_ptr, tokens: Sequence[int], n_vocab: int) -> np.ndarray:
    """Clear the context's memory, decode ``tokens`` as sequence 0 in one batch and return (n, n_vocab) logits.

    ``len(tokens)`` must not exceed the context's n_batch. The caller owns the context's state afterwards
    (a llama_cpp.Llama on the same context must be ``reset()``).
    """
    import llama_cpp

    n = len(tokens)
    if n == 0:
        raise ValueError("decode_logits needs at least one token")
    mem = llama_cpp.llama_get_memory(ctx_ptr)
    if mem is not None:
        llama_cpp.llama_memory_clear(mem, True)
    from loramux.llama_batch import TokenBatch

    batch = TokenBatch(n)
    try:
        batch.set(tokens, range(n), 0, True)
        batch.decode(ctx_ptr)
        ptr = llama_cpp.llama_get_logits(ctx_ptr)
        return np.ctypeslib.as_array(ptr, shape=(n * n_vocab,)).reshape(n, n_vocab).copy()
    finally:
        batch.close()


__all__ = [
    "ContextLoraState",
    "LlamaLog",
    "LoraAdapterHandle",
    "LoraSetStats",
    "capture_llama_log",
    "decode_logits",
]
