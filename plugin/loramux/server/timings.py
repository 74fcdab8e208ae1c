"""llama-server's ``timings`` of an answer, measured by the route that serves it."""

from __future__ import annotations

import time

from loramux.engine import Finished


class AnswerClock:
    """When a request was taken, when its first token came; ``timings`` as llama-server reports them."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token: float | None = None

    def on_token(self) -> None:
        self.first_token = self.first_token or time.perf_counter()

    def timings(self, *fins: Finished) -> dict[str, float]:
        """Prompt until the first token, then generation (``fins``: the choices of one request)."""
        now = time.perf_counter()
        first = self.first_token or now
        prompt_ms, predicted_ms = (first - self.started) * 1e3, (now - first) * 1e3
        read = fins[0].prompt_tokens - fins[0].cached_tokens
        made = sum(f.completion_tokens for f in fins)
        return {
            "cache_n": fins[0].cached_tokens,
            "prompt_n": read,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / max(read, 1),
            "prompt_per_second": read / prompt_ms * 1e3 if prompt_ms > 0 else 0.0,
            "predicted_n": made,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / max(made, 1),
            "predicted_per_second": made / predicted_ms * 1e3 if predicted_ms > 0 else 0.0,
        }


__all__ = ["AnswerClock"]
