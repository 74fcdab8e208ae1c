"""Metrics of the Ray application: each replica's ``/metrics`` (the engine's, as ``loramux serve``
renders them, plus its adapter loads), collected on a board and served with a ``replica`` label by
the ingress, beside the ingress's own affinity counters."""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from loramux.ray.adapter_sets import SetCounters

STALE_S = 30.0  # a replica that has not reported for this long (gone, restarted) is left out
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(.*)$")


def replica_families(sets: SetCounters, hits: int, misses: int) -> list:
    """A replica's adapter holdings: loads, unloads, keys loaded, evicted and held, affinity hits and misses."""
    out = []
    for name, value, doc in (
        ("loramux_ray_adapter_loads", sets.adapter_loads, "adapters loaded on this replica (a request's mix needed them)"),
        ("loramux_ray_adapter_unloads", sets.adapter_unloads, "adapters unloaded (their keys were evicted)"),
        ("loramux_ray_key_loads", sets.key_loads, "affinity keys loaded (Serve multiplexing)"),
        ("loramux_ray_key_evictions", sets.key_evictions, "affinity keys evicted (LRU, --max-adapter-sets)"),
        ("loramux_ray_affinity_hits", hits, "requests whose key this replica held already"),
        ("loramux_ray_affinity_misses", misses, "requests whose key this replica had to load"),
    ):
        out.append(CounterMetricFamily(name, doc, value=float(value)))
    out.append(GaugeMetricFamily("loramux_ray_keys_held", "affinity keys held now", value=len(sets.keys)))
    out.append(GaugeMetricFamily("loramux_ray_replica_pid", "the replica's process id (its logs, its CPU)", value=os.getpid()))
    return out


def with_label(text: str, name: str, value: str) -> str:
    """Prometheus text with ``name="value"`` added to every sample (comments kept)."""
    lines = []
    for line in text.splitlines():
        m = _SAMPLE.match(line) if line and not line.startswith("#") else None
        if m is None:
            lines.append(line)
            continue
        labels = f'{name}="{value}"' + (f",{m.group(3)}" if m.group(3) else "")
        lines.append(f"{m.group(1)}{{{labels}}} {m.group(4)}")
    return "\n".join(lines) + "\n"


def merge_texts(texts: list[str]) -> str:
    """Several Prometheus texts as one: each metric's ``# HELP`` / ``# TYPE`` once, its samples together."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        current = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                current = line.split()[2]
                heads.setdefault(current, [])
                if line not in heads[current]:
                    heads[current].append(line)
            elif line.strip() and current is not None:
                samples.setdefault(current, []).append(line)
    return "".join("\n".join(heads[n] + samples.get(n, [])) + "\n" for n in heads)


class IngressCounters:
    """The ingress's affinity counters (thread-safe): requests by whether the replica held their key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter = Counter()

    def count(self, result: str) -> None:
        with self._lock:
            self.counts[result] += 1

    def families(self) -> list:
        fam = CounterMetricFamily(
            "loramux_ray_affinity_requests",
            "requests forwarded by the ingress, by result: hit (the replica held the key), miss, error (the replica failed)",
            labels=["result"],
        )
        with self._lock:
            for result in ("hit", "miss", "error"):
                fam.add_metric([result], self.counts[result])
            hits, misses = self.counts["hit"], self.counts["miss"]
        rate = GaugeMetricFamily("loramux_ray_affinity_hit_rate", "hits / (hits + misses)", value=hits / max(1, hits + misses))
        return [fam, rate]


class Board:
    """The latest metrics text of each replica (a Serve deployment of one replica holds one)."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self._texts[replica] = (time.time(), text)

    def texts(self) -> dict[str, str]:
        """Each live replica's text (those that reported in the last :data:`STALE_S` seconds)."""
        now = time.time()
        return {r: t for r, (at, t) in sorted(self._texts.items()) if now - at < STALE_S}


__all__ = ["Board", "IngressCounters", "merge_texts", "replica_families", "with_label"]
