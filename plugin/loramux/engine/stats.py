"""Counters of the engine, read by ``AdapterPool.stats``, the benchmarks and the server's /metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """What the engine did since it started (plain counters; read them from any thread)."""

    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0  # refused because the queue was full
    steps: int = 0  # llama_decode calls
    tokens_decoded: int = 0  # tokens fed (prompt + generated)
    tokens_generated: int = 0
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (same mix)
    decode_seconds: float = 0.0
    step_sequences: int = 0  # sum over steps of the sequences in that step
    max_step_sequences: int = 0
    last_step_sequences: int = 0
    pool_rebuilt: int = 0  # adapter pool changes that built the next native pool (the others copied inside the library)
    pool_in_place: int = 0  # adapter pool changes written into free slices of the native pool

    def record_step(self, n_tokens: int, n_sequences: int, seconds: float) -> None:
        self.steps += 1
        self.tokens_decoded += n_tokens
        self.decode_seconds += seconds
        self.step_sequences += n_sequences
        self.last_step_sequences = n_sequences
        self.max_step_sequences = max(self.max_step_sequences, n_sequences)

    @property
    def mean_step_sequences(self) -> float:
        """Sequences per llama_decode, on average: the direct measure of mixed batching."""
        return self.step_sequences / self.steps if self.steps else 0.0


__all__ = ["EngineStats"]
