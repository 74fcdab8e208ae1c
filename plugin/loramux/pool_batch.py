"""Many requests at once, each under its own mix: the batch half of :class:`loramux.AdapterPool`.

:class:`BatchCompletions` is a base class of the pool (it uses the pool's ``engine_request``,
engine and base path): every request is validated before any runs, then the engine decodes them
together, at most a window of them queued at a time.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from loramux.engine import GREEDY
from loramux.mix import MixLike
from loramux.pool_requests import PoolRequest, PoolResult, iter_results, mixes_for, sampling_from


class BatchCompletions:
    """Batched completions of :class:`loramux.AdapterPool` (greedy unless sampling keywords say otherwise)."""

    def iter_results(self, requests: Sequence[PoolRequest], *, window: int | None = None) -> Iterator[tuple[int, PoolResult]]:
        """Answer many requests, each under its own mix, decoded together; yield ``(index, result)``
        as each ends. All are validated before any runs; at most ``window`` (default
        ``2 * n_seq_max``) are in the engine at a time (``window=1``: one after another)."""
        self._check_open()
        engine_requests = [self.engine_request(r) for r in requests]
        return iter_results(engine_requests, self._engine.submit, window=window or 2 * self.batch_slots)

    def generate(self, requests: Sequence[PoolRequest], *, window: int | None = None) -> list[PoolResult]:
        """Answer many requests, each under its own mix, decoded together; results in request order."""
        results = dict(self.iter_results(list(requests), window=window))
        return [results[i] for i in range(len(results))]

    def create_completions(
        self,
        prompts: Sequence[str | list[int]],
        *,
        mixes: Sequence[MixLike] | None = None,
        mix: MixLike = None,
        max_tokens: int = 16,
        stop: str | list[str] | None = None,
        **sampling: Any,
    ) -> list[dict]:
        """Text completions of many prompts (``mixes[i]`` for prompt i, or one ``mix`` for all), batched;
        greedy unless sampling keywords say otherwise. OpenAI-style dicts as :meth:`create_completion`."""
        params = sampling_from(sampling, chat=False, default=GREEDY)
        reqs = [
            PoolRequest(prompt=p, mix=m, max_tokens=max_tokens, stop=stop or (), sampling=params)
            for p, m in zip(prompts, mixes_for(prompts, mixes, mix))
        ]
        return [r.as_dict(str(self.base_path), chat=False) for r in self.generate(reqs)]

    def create_chat_completions(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        *,
        mixes: Sequence[MixLike] | None = None,
        mix: MixLike = None,
        max_tokens: int = 256,
        stop: str | list[str] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        **sampling: Any,
    ) -> list[dict]:
        """Chat completions of many conversations (``mixes[i]`` for conversation i), batched; greedy by
        default; ``tools`` / ``tool_choice`` for all of them, as :meth:`create_chat_completion`'s."""
        params = sampling_from(sampling, chat=True, default=GREEDY)
        reqs = [
            PoolRequest(
                messages=[dict(m) for m in c],
                mix=m,
                max_tokens=max_tokens,
                stop=stop or (),
                sampling=params,
                tools=tools,
                tool_choice=tool_choice,
            )
            for c, m in zip(conversations, mixes_for(conversations, mixes, mix))
        ]
        return [r.as_dict(str(self.base_path), chat=True, tool_use=q.tool_use) for r, q in zip(self.generate(reqs), reqs)]


__all__ = ["BatchCompletions"]
