"""Retrieval routing (LoraRetriever-style): each adapter has a key, the mean embedding of a few of its prompts.

Keys (``loramux router index``): for every adapter, up to ``samples_per_adapter`` (default 40,
chosen by 5-fold cross-validation on the BBH train split alone among 5/10/20/40/all, with the
feature: ``benchmarks/retrieval_cv.py``; LoraRetriever uses 20) unlabelled prompts of its task are embedded (:mod:`.embedding`); the
embeddings are centred on the mean of all samples (the embedding space of a language model is
anisotropic: every vector shares a large common direction, which swamps cosines), L2-normalised
and averaged; the key is that mean, normalised again. The file stores the feature, the base
model's fingerprint, the centre and one key per adapter, so adding an adapter (with its samples)
or removing one needs no retraining: :meth:`RetrievalRouter.add`, :meth:`RetrievalRouter.remove`.

Routing: the prompt's centred, normalised embedding against every key of an adapter that is
loaded in the pool now (cosine); the ``k`` most similar are kept and weighted by
``softmax(cosine / T)`` over those k (``weights=softmax``, default) or ``1/k`` each
(``weights=uniform``, LoraRetriever's own rule, which ignores the scores); weights below
``min_weight`` are dropped (never the top adapter) and the rest renormalised to sum to 1.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from loramux.converters.atomic import atomic_output
from loramux.errors import MixError
from loramux.mix import Mix
from loramux.router.embedding import DEFAULT_FEATURE, PromptEmbedder, check_feature
from loramux.router.options import parse_options
from loramux.router.selection import Routing, softmax

FORMAT = "loramux-retrieval-keys"
VERSION = 1
SAMPLES_PER_ADAPTER = 40  # chosen by cross-validation on train only (benchmarks/retrieval_cv.py)
DEFAULTS: dict[str, Any] = {"k": 3, "T": 0.05, "weights": "softmax", "min_weight": 0.05}
WEIGHT_RULES = ("softmax", "uniform")


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


@dataclass
class RetrievalKeys:
    """The keys of a retrieval router: one unit vector per adapter, in the centred feature space."""

    feature: str
    base_fingerprint: str
    center: np.ndarray
    keys: dict[str, np.ndarray] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    def key_from(self, embeddings: np.ndarray) -> np.ndarray:
        """An adapter's key from its samples' raw embeddings."""
        return _unit(_unit(np.asarray(embeddings, dtype=np.float64) - self.center).mean(axis=0)).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "feature": self.feature,
            "base_fingerprint": self.base_fingerprint,
            "center": self.center.astype(float).tolist(),
            "adapters": {n: {"samples": self.samples.get(n, 0), "key": k.astype(float).tolist()} for n, k in sorted(self.keys.items())},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the keys as JSON, atomically."""
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_json()) + "\n", encoding="utf-8")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RetrievalKeys":
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MixError(f"retrieval keys {p} do not exist (loramux router index ... -o {p} builds them)") from None
        except (OSError, ValueError) as exc:
            raise MixError(f"retrieval keys {p} are not readable JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise MixError(f"{p} is not a loramux retrieval key file (format {FORMAT} version {VERSION})")
        try:
            center = np.asarray(data["center"], dtype=np.float64)
            keys = {n: np.asarray(a["key"], dtype=np.float32) for n, a in data["adapters"].items()}
            samples = {n: int(a.get("samples", 0)) for n, a in data["adapters"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MixError(f"retrieval keys {p} are malformed: {exc}") from exc
        if any(k.shape != center.shape for k in keys.values()):
            raise MixError(f"retrieval keys {p}: every key must have the centre's width {center.shape}")
        return cls(check_feature(str(data["feature"])), str(data["base_fingerprint"]), center, keys, samples)


def build_keys(pool: Any, samples: Mapping[str, Sequence[str]], *, feature: str = DEFAULT_FEATURE, progress=None) -> RetrievalKeys:
    """Keys for the adapters of ``samples`` (adapter -> its prompts), embedded with ``feature`` of ``pool``'s base."""
    from loramux.converters import read_base_model

    if not samples or any(not v for v in samples.values()):
        raise MixError("retrieval keys need at least one sample prompt for every adapter")
    embedder = PromptEmbedder(pool, feature)
    embedded: dict[str, np.ndarray] = {}
    for name, prompts in samples.items():
        embedded[name] = embedder.embed(list(prompts))
        if progress is not None:
            progress(len(prompts))
    center = np.concatenate(list(embedded.values())).astype(np.float64).mean(axis=0)
    keys = RetrievalKeys(feature, read_base_model(pool.base_path).fingerprint, center)
    for name, vectors in embedded.items():
        keys.keys[name], keys.samples[name] = keys.key_from(vectors), len(vectors)
    return keys


def retrieval_weights(sims: np.ndarray, settings: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights) of the kept adapters for cosine similarities ``sims`` (see the module docstring)."""
    order = np.argsort(-sims, kind="stable")[: settings["k"]]
    if settings["weights"] == "uniform":
        w = np.full(len(order), 1.0 / len(order))
    else:
        w = softmax(sims[order], settings["T"])
    keep = w >= settings["min_weight"]
    keep[0] = True
    return order[keep], w[keep] / w[keep].sum()


def check_settings(settings: Mapping[str, Any], source: str) -> dict[str, Any]:
    s = dict(settings)
    if s["k"] < 1 or not s["T"] > 0 or s["weights"] not in WEIGHT_RULES or not 0 <= s["min_weight"] < 1:
        raise MixError(f"{source}: want k >= 1, T > 0, weights in {WEIGHT_RULES}, 0 <= min_weight < 1; got {s}")
    return s


class RetrievalRouter:
    """Routes a prompt to the adapters whose keys are nearest to its embedding."""

    def __init__(self, keys: RetrievalKeys, pool: Any, *, settings: Mapping[str, Any] | None = None, source: str = "retrieval") -> None:
        from loramux.converters import read_base_model

        fingerprint = read_base_model(pool.base_path).fingerprint
        if keys.base_fingerprint != fingerprint:
            raise MixError(f"{source} was built for another base model than {pool.base_path}; rebuild it with loramux router index")
        self.keys, self.pool, self.source = keys, pool, source
        self.settings = check_settings({**DEFAULTS, **(settings or {})}, source)
        self.embedder = PromptEmbedder(pool, keys.feature)

    @classmethod
    def load(cls, path: str | os.PathLike, *, pool: Any, options: str | None = None) -> "RetrievalRouter":
        """Open a key file; ``options`` like ``k=3,T=0.05,weights=uniform,min_weight=0.05``."""
        settings = parse_options(options, DEFAULTS, source=f"retrieval:{path}")
        return cls(RetrievalKeys.load(path), pool, settings=settings, source=f"retrieval keys {path}")

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters it can route to now: those with a key that are loaded in the pool."""
        loaded = set(self.pool.names)
        return tuple(n for n in sorted(self.keys.keys) if n in loaded)

    def similarities(self, prompt: str) -> dict[str, float]:
        """Cosine of the prompt's centred embedding with every routable adapter's key."""
        names = self.adapters
        if not names:
            raise MixError(f"{self.source}: none of its adapters is loaded in the pool")
        query = _unit(self.embedder.embed_one(prompt).astype(np.float64) - self.keys.center)
        matrix = np.stack([self.keys.keys[n] for n in names]).astype(np.float64)
        return dict(zip(names, (matrix @ query).tolist()))

    def route(self, prompt: str) -> Routing:
        sims = self.similarities(prompt)
        names = list(sims)
        order, weights = retrieval_weights(np.asarray(list(sims.values())), self.settings)
        mix = Mix({names[i]: float(w) for i, w in zip(order, weights)})
        top = names[int(order[0])]
        return Routing(mix, sims, None, top, float(weights[0]))

    def add(self, name: str, prompts: Sequence[str]) -> None:
        """Give adapter ``name`` a key from its sample prompts (no retraining; the centre is kept)."""
        if not prompts:
            raise MixError(f"adapter {name!r} needs at least one sample prompt for its retrieval key")
        vectors = self.embedder.embed(list(prompts))
        self.keys.keys[name], self.keys.samples[name] = self.keys.key_from(vectors), len(prompts)

    def remove(self, name: str) -> None:
        """Forget adapter ``name``'s key."""
        if self.keys.keys.pop(name, None) is None:
            raise MixError(f"{self.source} has no key for adapter {name!r}")
        self.keys.samples.pop(name, None)

    def close(self) -> None:
        pass


def samples_by_adapter(rows: Sequence[Mapping[str, Any]], adapters: Sequence[str], per_adapter: int) -> dict[str, list[str]]:
    """The first ``per_adapter`` inputs of each adapter's task (a row belongs to the adapter named like its task)."""
    out: dict[str, list[str]] = {a: [] for a in adapters}
    for row in rows:
        task = str(row.get("task"))
        if task in out and len(out[task]) < per_adapter:
            out[task].append(str(row["input"]))
    missing = sorted(a for a, v in out.items() if not v)
    if missing:
        raise MixError(f"no sample rows for adapter(s) {', '.join(missing)}: the data needs rows whose task is the adapter's name")
    return out


__all__ = ["DEFAULTS", "RetrievalKeys", "RetrievalRouter", "SAMPLES_PER_ADAPTER", "build_keys", "retrieval_weights", "samples_by_adapter"]
