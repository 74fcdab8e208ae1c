"""What a router file says about itself (ONNX ``metadata_props``, one JSON value under ``loramux.router``).

A router is bound to one base model (its tokenizer and ``token_embd`` made the features) and to one
ordered list of adapter names (one output column each). Both are checked whenever a router meets a
base model or an adapter pool, so a router is never used with the wrong ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from loramux.router.errors import RouterFileError, RouterMismatchError
from loramux.router.features import FeatureRecipe
from loramux.router.selection import SelectionSettings

METADATA_KEY = "loramux.router"
FORMAT_VERSION = 1
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
OUTPUT_LOGITS = "logits"


@dataclass(frozen=True)
class RouterMetadata:
    """The router file's self-description."""

    adapters: tuple[str, ...]  # output columns 0..n-1, in this order
    none_outcome: bool  # one more column last: "none of these"
    base_fingerprint: str  # loramux.converters.read_base_model(base).fingerprint
    base_name: str
    features: FeatureRecipe
    selection: SelectionSettings
    training: dict[str, Any] = field(default_factory=dict)  # what it was trained on and how well it did
    format_version: int = FORMAT_VERSION

    @property
    def n_outcomes(self) -> int:
        return len(self.adapters) + int(self.none_outcome)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "adapters": list(self.adapters),
            "none_outcome": self.none_outcome,
            "base_fingerprint": self.base_fingerprint,
            "base_name": self.base_name,
            "features": self.features.to_json(),
            "selection": self.selection.to_json(),
            "training": self.training,
            "inputs": [INPUT_IDS, ATTENTION_MASK],
            "output": OUTPUT_LOGITS,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def loads(cls, text: str, *, source: str = "router file") -> "RouterMetadata":
        try:
            data = json.loads(text)
            version = int(data.get("format_version", 0))
            if version != FORMAT_VERSION:
                raise RouterFileError(
                    f"{source} has router format version {version}; this loramux reads version {FORMAT_VERSION}: "
                    "retrain the router with this loramux"
                )
            adapters = tuple(str(a) for a in data["adapters"])
            return cls(
                adapters=adapters,
                none_outcome=bool(data["none_outcome"]),
                base_fingerprint=str(data["base_fingerprint"]),
                base_name=str(data.get("base_name", "")),
                features=FeatureRecipe.from_json(data["features"]),
                selection=SelectionSettings.from_json(data.get("selection", {})),
                training=dict(data.get("training", {})),
            )
        except RouterFileError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RouterFileError(
                f"{source} has unreadable {METADATA_KEY} metadata ({type(exc).__name__}: {exc}); retrain the router"
            ) from None

    # --- checks -------------------------------------------------------------------------
    def check_base(self, fingerprint: str, *, base: str = "the base model", source: str = "router") -> None:
        """Raise RouterMismatchError unless the router was trained on the base with this fingerprint."""
        if fingerprint != self.base_fingerprint:
            raise RouterMismatchError(
                f"{source} was trained for base model {self.base_name!r} (fingerprint {self.base_fingerprint}), "
                f"but {base} has fingerprint {fingerprint}: its features would be meaningless. "
                "Use the base model the router was trained on, or retrain it with `loramux router train --base ...`"
            )

    def check_adapters(self, names: Iterable[str], *, source: str = "router") -> None:
        """Raise RouterMismatchError unless ``names`` (a pool's adapters) are exactly the router's adapters."""
        pool = set(names)
        mine = set(self.adapters)
        missing = sorted(mine - pool)
        extra = sorted(pool - mine)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"the pool lacks {missing}")
            if extra:
                parts.append(f"the pool has adapters the router does not know: {extra}")
            hint = ""
            if missing:
                hint = (
                    " If an adapter was skipped while loading (e.g. an embedding LoRA on a tied-output base), "
                    "load it with --skip-embeddings;"
                )
            raise RouterMismatchError(
                f"{source} routes over {len(self.adapters)} adapters that do not match the pool's {len(pool)}: "
                f"{'; '.join(parts)}.{hint} load the adapters the router was trained for, or retrain it on this pool"
            )


def read_metadata_map(props: Mapping[str, str], *, source: str) -> RouterMetadata:
    """The router metadata from an ONNX model's custom metadata map (raises RouterFileError if absent)."""
    if METADATA_KEY not in props:
        raise RouterFileError(
            f"{source} is an ONNX model but not a loramux router (no {METADATA_KEY!r} metadata); train one with `loramux router train`"
        )
    return RouterMetadata.loads(props[METADATA_KEY], source=source)


__all__ = [
    "ATTENTION_MASK",
    "FORMAT_VERSION",
    "INPUT_IDS",
    "METADATA_KEY",
    "OUTPUT_LOGITS",
    "RouterMetadata",
    "read_metadata_map",
]
