"""What a caller gives the engine (:class:`EngineRequest`) and gets back (:class:`RequestHandle`).

A handle is a stream of :class:`TokenEvent` ending with one :class:`Finished`, readable from any
thread (iterate it) or from asyncio (``async for``; the events are handed to the loop with
``call_soon_threadsafe``). :meth:`RequestHandle.cancel` ends the request at the next step and
frees its sequence, K/V cells and mix; :meth:`RequestHandle.result` waits for the whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Collection, Iterator, Sequence

from loramux.engine.sampling import GREEDY, SamplingParams
from loramux.errors import ContextLengthError, RequestCancelled, RequestError
from loramux.mix import Mix

_ids = itertools.count()


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class EngineRequest:
    """Prompt token ids, the mix, sampling, limits. ``max_tokens=None``: until the context is full."""

    tokens: Sequence[int]
    mix: Mix = field(default_factory=Mix)
    sampling: SamplingParams = GREEDY  # the one default of every request type (PoolRequest too)
    max_tokens: int | None = 16
    stop: Sequence[str] = ()
    stop_tokens: Collection[int] | None = None  # None: the model's end-of-generation tokens
    logprobs: int | None = None  # top alternatives to report per token (0: only the chosen one)
    request_id: Any = None

    def __post_init__(self) -> None:
        self.tokens = [int(t) for t in self.tokens]
        if not self.tokens:
            raise RequestError(f"request {self.request_id!r}: the prompt is empty")
        if self.max_tokens is not None and not (_is_whole(self.max_tokens) and self.max_tokens >= 1):
            raise RequestError(
                f"request {self.request_id!r}: max_tokens must be a whole number >= 1, got {self.max_tokens!r}", param="max_tokens"
            )
        if self.logprobs is not None and not (_is_whole(self.logprobs) and 0 <= self.logprobs <= 20):
            raise RequestError(
                f"request {self.request_id!r}: logprobs must be a whole number from 0 to 20, got {self.logprobs!r}", param="logprobs"
            )
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.mix = Mix.coerce(self.mix)
        if self.request_id is None:
            self.request_id = f"req-{next(_ids)}"

    def check_limits(self, *, n_ctx: int, n_vocab: int) -> None:
        """The checks that need the engine's model and context (the rest ran at construction):
        the prompt plus ``max_tokens`` must fit one sequence of ``n_ctx`` tokens (ContextLengthError),
        and prompt and ``logit_bias`` token ids must lie in ``0 .. n_vocab - 1``.

        llama.cpp refuses a batch holding an unknown token as a whole, which would fail every
        request decoding in that step; so an id outside the vocabulary is refused before the batch."""
        n = len(self.tokens)
        if n + (1 if self.max_tokens is None else self.max_tokens) > n_ctx:
            raise ContextLengthError(
                f"request {self.request_id!r}: the prompt has {n} tokens"
                + ("" if self.max_tokens is None else f" and asks for {self.max_tokens} more")
                + f", but a sequence holds at most {n_ctx} (n_ctx); shorten the prompt or lower max_tokens",
                n_prompt_tokens=n,
                n_ctx=n_ctx,
            )
        for param, ids in (("prompt", self.tokens), ("logit_bias", self.sampling.logit_bias)):
            bad = [t for t in ids if not 0 <= t < n_vocab]
            if bad:
                raise RequestError(
                    f"request {self.request_id!r}: {param} holds token ids outside the vocabulary (0..{n_vocab - 1}): {bad[:5]}",
                    param=param,
                )


def check_choices(requests, n_seq_max: int) -> None:
    """The choices of one request: 1 to ``n_seq_max`` of them (they run at once), one prompt, one mix."""
    if not 1 <= len(requests) <= n_seq_max:
        raise RequestError(
            f"n={len(requests)} choices: they decode together, one sequence each, so at most {n_seq_max} (n_seq_max)", param="n"
        )
    first = requests[0]
    if any(list(r.tokens) != list(first.tokens) or r.mix != first.mix for r in requests[1:]):
        raise RequestError("the choices of one request share its prompt and mix")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id, the text it releases (may be empty), and its log-probabilities."""

    token: int
    text: str
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass(frozen=True)
class Finished:
    """The end of a request."""

    finish_reason: str  # "stop" (end-of-generation token or stop string) or "length"
    text: str  # the whole answer (cut before a stop string)
    tail: str  # text released at the end that no TokenEvent carried (held back for stop strings)
    tokens: tuple[int, ...]  # generated token ids (the stop token excluded)
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache (same mix)
    mix: Mix
    path: str  # "native" (per-sequence mix) or "context" (one mix per decode)
    stop_word: str = ""  # the stop string that ended it ("" for a token or the length)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


_END = object()
_OUTBOX = threading.local()  # the engine thread's per-step outbox (one_wakeup_per_loop)


def _deliver(items: list) -> None:
    for handle, item in items:
        handle._async.put_nowait(item)


@contextlib.contextmanager
def one_wakeup_per_loop() -> Iterator[None]:
    """While the block runs (one decode step, on the engine thread), what the handles submitted
    from asyncio receive is held, then handed to each event loop in one ``call_soon_threadsafe``:
    a step of 32 streams wakes the server's loop once, not 32 times."""
    held: dict[Any, list] = {}
    _OUTBOX.held = held
    try:
        yield
    finally:
        _OUTBOX.held = None
        for loop, items in held.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody listens any more
                for handle, _ in items:
                    handle._cancel.set()


class RequestHandle:
    """The stream of one submitted request. Iterate it, or ``async for`` it, or call :meth:`result`."""

    def __init__(self, request: EngineRequest, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request = request
        self._loop = loop
        self._sync: queue.SimpleQueue = queue.SimpleQueue()
        self._async: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._finished: Finished | None = None
        self._error: BaseException | None = None
        self.joined_step: int | None = None  # the engine's decode step at which the request joined
        self.steps = 0  # decode steps of its group while it ran
        self.max_step_sequences = 0  # most sequences in one of those decodes (others' included)
        self.choices: list[RequestHandle] = []  # the other choices of this request (n > 1), started with it

    # --- engine side ------------------------------------------------------------------------
    def _put(self, item: Any) -> None:
        held = getattr(_OUTBOX, "held", None)
        if self._async is not None and held is not None:
            held.setdefault(self._loop, []).append((self, item))
        elif self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                self._cancel.set()
        else:
            self._sync.put(item)

    def _emit(self, event: TokenEvent) -> None:
        self._put(event)

    def _finish(self, finished: Finished) -> None:
        self._finished = finished
        self._done.set()
        self._put(finished)
        self._put(_END)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()
        self._put(error)
        self._put(_END)

    # --- caller side --------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop the request at the next step; its sequence, K/V cells and mix are freed."""
        self._cancel.set()

    def __iter__(self) -> Iterator[TokenEvent | Finished]:
        if self._async is not None:
            raise RequestError("this request was submitted for asyncio: use `async for`")
        while True:
            item = self._sync.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self) -> AsyncIterator[TokenEvent | Finished]:
        if self._async is None:
            raise RequestError("this request was submitted without an event loop: iterate it")
        while True:
            item = await self._async.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self, timeout: float | None = None) -> Finished:
        """Wait for the end of the request; raise what it failed with."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request.request_id!r} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._finished is not None
        return self._finished

    def _cancelled_error(self) -> RequestCancelled:
        return RequestCancelled(f"request {self.request.request_id!r} was cancelled")


__all__ = ["EngineRequest", "Finished", "RequestHandle", "TokenEvent"]
