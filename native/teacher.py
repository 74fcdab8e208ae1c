"""Teacher-forced decoding on a raw llama_context: the oracle tests' and benchmarks' workhorse.

:func:`decode_forced` prefills several sequences' prompts in one ``llama_decode`` and then feeds
each sequence a given token per step, all sequences in one ``llama_decode`` per step (the shape
of continuous batching), returning each sequence's logits after the prompt and after every fed
token. Run with one sequence and stock ``llama_set_adapters_lora`` it is the oracle; run with
many sequences and per-sequence mixes it is the thing under test: the same tokens go into both.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from loramux.errors import LoramuxError


@dataclass
class ForcedSequence:
    prompt: Sequence[int]
    forced: Sequence[int]  # tokens fed after the prompt, one per step


@contextmanager
def loaded_model(base: str, adapter_paths: Mapping[str, str]) -> Iterator[tuple[object, dict[str, object]]]:
    """``(llama_model *, {name: llama_adapter_lora *})`` loaded from files (llama.cpp's log silenced), freed on exit."""
    import llama_cpp

    from loramux.llama_runtime import silence_llama_log

    silence_llama_log(errors_to_stderr=True)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(base).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise LoramuxError(f"llama.cpp could not load the model {base}")
    adapters: dict[str, object] = {}
    try:
        for name, path in adapter_paths.items():
            adapters[name] = llama_cpp.llama_adapter_lora_init(model, str(path).encode())
            if not adapters[name]:
                raise LoramuxError(f"llama.cpp could not load the adapter {path} on {base}")
        yield model, adapters
    finally:
        for a in adapters.values():
            if a:
                llama_cpp.llama_adapter_lora_free(a)
        llama_cpp.llama_model_free(model)


def new_context(model_ptr, *, n_seq_max: int, n_ctx: int, n_batch: int = 512, n_threads: int = 2):
    """A fresh llama_context on ``model_ptr`` with a unified K/V cache (free with llama_free)."""
    import llama_cpp

    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_batch, n_seq_max
    p.kv_unified = True
    p.n_threads = p.n_threads_batch = n_threads
    ctx = llama_cpp.llama_init_from_model(model_ptr, p)
    if not ctx:
        raise LoramuxError(f"llama.cpp could not create a context (n_seq_max={n_seq_max}, n_ctx={n_ctx})")
    return ctx


def set_stock_adapters(ctx, adapters: Sequence[tuple[object, float]]) -> None:
    """llama_set_adapters_lora on the whole context (empty: none)."""
    import llama_cpp

    n = len(adapters)
    if n:
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*[a for a, _ in adapters])
        sc = (ctypes.c_float * n)(*[float(s) for _, s in adapters])
        rc = llama_cpp.llama_set_adapters_lora(ctx, arr, n, sc)
    else:
        rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
    if rc != 0:
        raise LoramuxError(f"llama_set_adapters_lora failed with code {rc}")


def decode_forced(ctx, seqs: Sequence[ForcedSequence], *, interleave_prompts: bool = True) -> list[np.ndarray]:
    """Logits ``(1 + len(forced), n_vocab)`` per sequence; sequence i uses seq_id i (its mix, if any).

    Clears the context's memory first. With ``interleave_prompts`` the prompt tokens of all
    sequences are interleaved position by position in the prefill batch (ubatch order differs
    from sequence order), and only each prompt's last token has logits (n_outputs < n_tokens).
    """
    import llama_cpp

    model = llama_cpp.llama_get_model(ctx)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    mem = llama_cpp.llama_get_memory(ctx)
    llama_cpp.llama_memory_clear(mem, True)
    n_prefill = sum(len(s.prompt) for s in seqs)
    batch = llama_cpp.llama_batch_init(max(n_prefill, len(seqs)), 0, 1)
    out = [[] for _ in seqs]
    try:
        if interleave_prompts:
            order = [(i, p) for p in range(max(len(s.prompt) for s in seqs)) for i, s in enumerate(seqs) if p < len(s.prompt)]
        else:
            order = [(i, p) for i, s in enumerate(seqs) for p in range(len(s.prompt))]
        rows = []
        for k, (i, p) in enumerate(order):
            last = p == len(seqs[i].prompt) - 1
            _put(batch, k, seqs[i].prompt[p], p, i, last)
            if last:
                rows.append((i, k))
        batch.n_tokens = len(order)
        _decode(ctx, batch)
        for i, k in rows:
            out[i].append(_logits(ctx, k, n_vocab))
        n_steps = max(len(s.forced) for s in seqs)
        for t in range(n_steps):
            live = [i for i, s in enumerate(seqs) if t < len(s.forced)]
            for k, i in enumerate(live):
                _put(batch, k, seqs[i].forced[t], len(seqs[i].prompt) + t, i, True)
            batch.n_tokens = len(live)
            _decode(ctx, batch)
            for k, i in enumerate(live):
                out[i].append(_logits(ctx, k, n_vocab))
    finally:
        llama_cpp.llama_batch_free(batch)
    return [np.stack(o) for o in out]


def greedy_alone(ctx, prompt: Sequence[int], n_steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and logits of one sequence (seq 0) decoded alone, step by step."""
    tokens: list[int] = []
    logits = []
    # grow the forced list one greedy token at a time (teacher = the model itself)
    import llama_cpp

    model = llama_cpp.llama_get_model(ctx)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    mem = llama_cpp.llama_get_memory(ctx)
    llama_cpp.llama_memory_clear(mem, True)
    batch = llama_cpp.llama_batch_init(max(len(prompt), 1), 0, 1)
    try:
        for p, tok in enumerate(prompt):
            _put(batch, p, tok, p, 0, p == len(prompt) - 1)
        batch.n_tokens = len(prompt)
        _decode(ctx, batch)
        row = _logits(ctx, len(prompt) - 1, n_vocab)
        for t in range(n_steps):
            logits.append(row)
            tok = int(np.argmax(row))
            tokens.append(tok)
            _put(batch, 0, tok, len(prompt) + t, 0, True)
            batch.n_tokens = 1
            _decode(ctx, batch)
            row = _logits(ctx, 0, n_vocab)
        logits.append(row)
    finally:
        llama_cpp.llama_batch_free(batch)
    return tokens, np.stack(logits)


def _put(b, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    b.token[i] = int(token)
    b.pos[i] = pos
    b.n_seq_id[i] = 1
    b.seq_id[i][0] = seq
    b.logits[i] = logits


def _decode(ctx, batch) -> None:
    import llama_cpp

    rc = llama_cpp.llama_decode(ctx, batch)
    if rc != 0:
        raise LoramuxError(f"llama_decode failed with code {rc} on a batch of {batch.n_tokens} tokens")


def _logits(ctx, i: int, n_vocab: int) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(ctx, i)
    if not ptr:
        raise LoramuxError(f"llama.cpp has no logits for batch row {i} (was it decoded with logits requested?)")
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
