"""Single requests shaped as llama-cpp-python's: the completion half of :class:`loramux.AdapterPool`.

:class:`Completions` is a base class of the pool (it uses the pool's ``submit_choices``,
``piece`` and base path): ``create_completion`` and ``create_chat_completion`` build one
:class:`~loramux.pool_requests.PoolRequest` (every field checked there, or by the engine's
request types) and answer it whole or streamed, in :mod:`loramux.responses`' shapes.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Mapping, Sequence

from loramux import responses
from loramux.engine import RequestHandle
from loramux.mix import MixLike
from loramux.pool_requests import PoolRequest, sampling_from


class Completions:
    """``create_completion`` / ``create_chat_completion`` of :class:`loramux.AdapterPool`."""

    def _respond(self, req: PoolRequest, *, chat: bool, stream: bool, n: int = 1):
        handles = self.submit_choices(req, n)
        shape = responses.Shape(
            chat=chat, model=str(self.base_path), extra={"mix": handles[0].request.mix.to_json()}, tool_use=req.tool_use
        )
        piece = None if req.logprobs is None else self.piece
        if stream and n == 1:
            return responses.chunks(shape, _cancel_on_exit(handles[0]), piece=piece)
        if stream:
            return _choice_chunks(shape, handles, piece)
        try:
            return responses.whole_choices(shape, [iter(h) for h in handles], piece)
        finally:
            for h in handles:
                if not h.done:
                    h.cancel()

    def create_completion(
        self,
        prompt: str | list[int],
        *,
        mix: MixLike = None,
        max_tokens: int | None = 16,
        stop: str | list[str] | None = None,
        stream: bool = False,
        logprobs: int | None = None,
        n: int = 1,
        **sampling: Any,
    ):
        """Text completion, as ``llama_cpp.Llama.create_completion``, under ``mix``.

        Sampling keywords as llama-cpp-python's (``temperature=0.8, top_k=40, top_p=0.95,
        min_p=0.05, typical_p=1, repeat_penalty=1, frequency_penalty=0, presence_penalty=0,
        seed, logit_bias``); ``temperature=0`` is greedy. Returns an OpenAI-style completion dict
        (or an iterator of chunks with ``stream=True``) with ``"mix"`` and ``"path"``. ``n``: that
        many choices, decoded together from one reading of the prompt (:meth:`submit_choices`).
        """
        req = PoolRequest(
            prompt=prompt, mix=mix, max_tokens=max_tokens, stop=stop or (), logprobs=logprobs, sampling=sampling_from(sampling, chat=False)
        )
        return self._respond(req, chat=False, stream=stream, n=n)

    __call__ = create_completion

    def create_chat_completion(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        mix: MixLike = None,
        max_tokens: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        n: int = 1,
        **sampling: Any,
    ):
        """Chat completion through the base model's chat template, as ``llama_cpp.Llama.create_chat_completion``.

        Sampling keywords as :meth:`create_completion` (chat defaults: ``temperature=0.2``).
        ``max_tokens=None``: until an end-of-turn token or the end of the context. ``tools`` and
        ``tool_choice`` as OpenAI's (:mod:`loramux.tools`): calls come back as ``message.tool_calls``
        (streamed: ``delta.tool_calls``) with ``finish_reason`` ``"tool_calls"``. ``logprobs=True``
        (with ``top_logprobs`` alternatives) gives OpenAI's ``choices[].logprobs.content``; ``n`` as
        :meth:`create_completion`'s.
        """
        req = PoolRequest(
            messages=[dict(m) for m in messages],
            mix=mix,
            max_tokens=max_tokens,
            stop=stop or (),
            sampling=sampling_from(sampling, chat=True),
            tools=tools,
            tool_choice=tool_choice,
            logprobs=(top_logprobs or 0) if logprobs else None,
        )
        return self._respond(req, chat=True, stream=stream, n=n)


def _cancel_on_exit(handle: RequestHandle) -> Iterator:
    """The handle's events; a consumer that stops early (closes the stream) cancels the request."""
    try:
        yield from handle
    finally:
        if not handle.done:
            handle.cancel()


def _choice_chunks(shape: responses.Shape, handles: list[RequestHandle], piece) -> Iterator[dict[str, Any]]:
    """The chunks of several choices as their tokens come (``choices[0].index`` says whose), as the
    server streams them; a consumer that stops early cancels them all."""
    shapers = [responses.StreamShaper(shape, piece=piece, index=i) for i in range(len(handles))]
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def pump(i: int, handle: RequestHandle) -> None:
        try:
            for ev in handle:
                inbox.put((i, ev))
        except BaseException as exc:  # raised again in the consumer's thread
            inbox.put((i, exc))
        inbox.put((i, None))

    for i, handle in enumerate(handles):
        threading.Thread(target=pump, args=(i, handle), daemon=True).start()
    try:
        for shaper in shapers:
            yield from shaper.first()
        left = len(handles)
        while left:
            i, ev = inbox.get()
            if isinstance(ev, BaseException):
                raise ev
            if ev is None:
                left -= 1
            else:
                yield from shapers[i].on_event(ev)
    finally:
        for handle in handles:
            if not handle.done:
                handle.cancel()


__all__ = ["Completions"]
