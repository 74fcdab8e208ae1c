"""loramux.engine: one continuous-batching engine that carries every request of a pool.

- :class:`Engine` owns one llama.cpp context and a scheduler thread; requests join at the next
  decode step, each under its own mix (:mod:`loramux.engine.core`).
- :class:`EngineRequest` / :class:`RequestHandle`: what goes in, and the stream of
  :class:`TokenEvent` ending with :class:`Finished` that comes back (threads or asyncio).
- :class:`SamplingParams`: llama-cpp-python's sampling parameters, applied by llama.cpp's own
  sampler chain per sequence (:mod:`loramux.engine.sampling`).

The front end most callers want is :class:`loramux.AdapterPool`; the server is built on it.
"""

from __future__ import annotations

from loramux.engine.core import Engine
from loramux.engine.request import EngineRequest, Finished, RequestHandle, TokenEvent
from loramux.engine.sampling import GREEDY, SamplingParams
from loramux.engine.slots import CONTEXT, NATIVE
from loramux.engine.stats import EngineStats

__all__ = [
    "CONTEXT",
    "GREEDY",
    "NATIVE",
    "Engine",
    "EngineRequest",
    "EngineStats",
    "Finished",
    "RequestHandle",
    "SamplingParams",
    "TokenEvent",
]
