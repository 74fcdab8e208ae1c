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

from loramux import llama_batch
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
    """A fresh llama_context on ``model_ptr`` with a unified K/V cache of ``n_ctx`` cells in all (free with llama_free)."""
    return llama_batch.new_context(model_ptr, n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch, n_threads=n_threads, kv_unified=True)


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
    batch = llama_batch.TokenBatch(max(n_prefill, len(seqs)))
    out = [[] for _ in seqs]
    try:
        if interleave_prompts:
            order = [(i, p) for p in range(max(len(s.prompt) for s in seqs)) for i, s in enumerate(seqs) if p < len(s.prompt)]
        else:
            order = [(i, p) for i, s in enumerate(seqs) for p in range(len(s.prompt))]
        last = [p == len(seqs[i].prompt) - 1 for i, p in order]
        batch.set([seqs[i].prompt[p] for i, p in order], [p for _, p in order], [i for i, _ in order], last)
        batch.decode(ctx)
        for k, (i, _) in enumerate(order):
            if last[k]:
                out[i].append(_logits(ctx, k, n_vocab))
        for t in range(max(len(s.forced) for s in seqs)):
            live = [i for i, s in enumerate(seqs) if t < len(s.forced)]
            batch.set([seqs[i].forced[t] for i in live], [len(seqs[i].prompt) + t for i in live], live, True)
            batch.decode(ctx)
            for k, i in enumerate(live):
                out[i].append(_logits(ctx, k, n_vocab))
    finally:
        batch.close()
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
    batch = llama_batch.TokenBatch(max(len(prompt), 1))
    try:
        batch.set(prompt, range(len(prompt)), 0, [p == len(prompt) - 1 for p in range(len(prompt))])
        batch.decode(ctx)
        row = _logits(ctx, len(prompt) - 1, n_vocab)
        for t in range(n_steps):
            logits.append(row)
            tok = int(np.argmax(row))
            tokens.append(tok)
            batch.set([tok], [len(prompt) + t], 0, True)
            batch.decode(ctx)
            row = _logits(ctx, 0, n_vocab)
        logits.append(row)
    finally:
        batch.close()
    return tokens, np.stack(logits)


def _logits(ctx, i: int, n_vocab: int) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(ctx, i)
    if not ptr:
        raise LoramuxError(f"llama.cpp has no logits for batch row {i} (was it decoded with logits requested?)")
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
