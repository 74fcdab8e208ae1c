"""The affinity key: which requests a replica should keep serving (Ray Serve's multiplexed model id).

A replica holds the adapters of the keys it serves and a prefix cache keyed by the exact mix; sending
the requests of one key to one replica saves adapter loads and reuses cached prompts. The key is:

* ``set`` (the default): a hash of the mix's sorted adapter set, without the weights. Mixes of the
  same adapters at other weights share a key (they need the same adapters loaded; the prefix cache
  still tells them apart, keyed by the exact mix).
* ``top``: the adapter of the largest weight (ties: the first name). Fewer keys when there are many
  distinct sets, so each replica's LRU of keys (``--max-adapter-sets``) covers more traffic; a
  replica loads the other adapters of a mix on demand, held by that key.

The base model's key is ``base``; a mix routed per token (``arrow``, ``spectr``) or a router that
runs on the replica (``pooled:arrow``, ``logo``) routes among every adapter: key ``all``.

``none`` computes keys as ``set`` does (a replica still loads and evicts by key) but routes requests
without them (Serve's default: the less busy of two random replicas): the baseline affinity is measured against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

from loramux.mix import Mix
from loramux.server.settings import AFFINITY_MODES

NO_AFFINITY = "none"  # keys as for "set", but requests are not routed by them (Serve's default routing): the baseline
BASE_KEY = "base"
ALL_KEY = "all"


@dataclass(frozen=True)
class AffinityKey:
    """A multiplexed model id and the adapters a replica must hold to serve its request."""

    id: str
    adapters: tuple[str, ...]


def set_key(names: Iterable[str]) -> str:
    """``set-`` and a hash of the sorted adapter names (weights left out)."""
    joined = "\n".join(sorted(set(names)))
    return "set-" + hashlib.sha256(joined.encode()).hexdigest()[:16]


def affinity_key(mix: Mix | None, mode: str, every_adapter: Iterable[str]) -> AffinityKey:
    """The key of a request under ``mix`` (None: chosen on the replica, among every adapter)."""
    if mode not in AFFINITY_MODES:
        raise ValueError(f"affinity mode {mode!r}: choose one of {', '.join(AFFINITY_MODES)}")
    mode = "set" if mode == NO_AFFINITY else mode
    if mix is None or mix.token_routing is not None:
        return AffinityKey(ALL_KEY, tuple(sorted(every_adapter)))
    if mix.is_base:
        return AffinityKey(BASE_KEY, ())
    names = tuple(sorted(mix))
    if mode == "top":
        top = min(names, key=lambda n: (-mix[n], n))
        return AffinityKey(f"top-{top}", names)
    return AffinityKey(set_key(names), names)


__all__ = ["AFFINITY_MODES", "ALL_KEY", "BASE_KEY", "NO_AFFINITY", "AffinityKey", "affinity_key", "set_key"]
