"""Which adapters a replica holds, and why: the keys that hold them and the requests that use them.

Ray Serve's multiplexing keeps an LRU of keys per replica (:mod:`loramux.ray.affinity`); this is
what a key means in the pool. A request under key K needs its mix's adapters: the missing ones are
loaded (a *load*) and held by K. When Serve evicts K, each adapter held by K alone, and used by no
running request, is unloaded; one still in use is unloaded when its last request ends. Keys share
adapters (``{a, b}`` and ``{a, c}`` both hold ``a``), so an adapter is loaded once per replica.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping


@dataclass
class SetCounters:
    """What a replica's adapter holdings cost: loads and unloads of adapters, key loads and evictions."""

    adapter_loads: int = 0
    adapter_unloads: int = 0
    key_loads: int = 0
    key_evictions: int = 0
    keys: list[str] = field(default_factory=list)


class AdapterSets:
    """The adapters of a pool held by affinity keys and pinned by running requests (thread-safe).

    ``sources`` maps every adapter a request may name to its file or PEFT folder; a name not there
    is left to the pool, which refuses the mix with the same error as ``loramux serve``."""

    def __init__(self, pool: Any, sources: Mapping[str, Path], *, skip_embeddings: bool = False) -> None:
        self.pool = pool
        self.sources = dict(sources)
        self.skip_embeddings = skip_embeddings
        self._lock = threading.Lock()
        self._holders: dict[str, set[str]] = {}  # adapter -> keys that hold it
        self._running: Counter = Counter()  # adapter -> running requests that use it
        self._keys: set[str] = set()
        self.counters = SetCounters()

    def add_key(self, key: str) -> None:
        """Serve loaded ``key`` on this replica (its adapters come with its first request)."""
        with self._lock:
            self._keys.add(key)
            self.counters.key_loads += 1

    def holds(self, key: str) -> bool:
        """Whether ``key`` is held on this replica now (Serve loaded it and has not evicted it)."""
        with self._lock:
            return key in self._keys

    def acquire(self, key: str, names: Iterable[str]) -> tuple[str, ...]:
        """Hold ``names`` under ``key`` (loading the missing ones) and pin them for one request;
        :meth:`release` the returned names when it ends."""
        known = tuple(sorted(n for n in set(names) if n in self.sources))
        with self._lock:
            for name in known:
                if name not in self.pool.names:
                    self.pool.load(self.sources[name], name=name, skip_embeddings=self.skip_embeddings)
                    self.counters.adapter_loads += 1
                self._holders.setdefault(name, set()).add(key)
                self._running[name] += 1
        return known

    def release(self, names: Iterable[str]) -> None:
        """A request that pinned ``names`` ended: unload those no key holds any more."""
        with self._lock:
            for name in names:
                self._running[name] -= 1
            self._unload_free(names)

    def drop_key(self, key: str) -> None:
        """Serve evicted ``key``: unload its adapters that no other key holds and no request uses."""
        with self._lock:
            if key not in self._keys:
                return
            self._keys.discard(key)
            self.counters.key_evictions += 1
            held = [n for n, keys in self._holders.items() if key in keys]
            for name in held:
                self._holders[name].discard(key)
            self._unload_free(held)

    def _unload_free(self, names: Iterable[str]) -> None:
        for name in sorted(set(names)):
            if not self._holders.get(name) and self._running[name] <= 0 and name in self.pool.names:
                self.pool.unload(name)
                self._holders.pop(name, None)
                self.counters.adapter_unloads += 1

    def snapshot(self) -> SetCounters:
        """The counters, with the keys held now."""
        with self._lock:
            c = self.counters
            return SetCounters(c.adapter_loads, c.adapter_unloads, c.key_loads, c.key_evictions, sorted(self._keys))


class HeldKey:
    """What Serve's multiplexing keeps per key: dropping it (eviction calls ``__del__``) lets go of the key's adapters."""

    def __init__(self, sets: AdapterSets, key: str) -> None:
        self.sets, self.key = sets, key
        self._dropped = False
        sets.add_key(key)

    def __del__(self) -> None:
        if not self._dropped:
            self._dropped = True
            with contextlib.suppress(Exception):  # at exit the pool may be closed already
                self.sets.drop_key(self.key)


def adapter_sources(paths: Iterable[Path]) -> dict[str, Path]:
    """Every adapter under ``paths`` (as ``loramux serve --adapters`` finds them) by name."""
    from loramux.adapters import adapter_name, find_adapter_sources

    found: dict[str, Path] = {}
    for path in paths:
        for source in find_adapter_sources(path)[0]:
            found.setdefault(adapter_name(source), source)
    return found


__all__ = ["AdapterSets", "HeldKey", "SetCounters", "adapter_sources"]
