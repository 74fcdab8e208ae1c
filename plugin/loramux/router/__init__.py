"""loramux.router: a learned router that turns a prompt into a Mix of the pool's adapters.

- :mod:`.features`: the base model's tokenizer and token embeddings (the only inputs);
- :mod:`.model`: the small MLP (torch, ``train`` extra) and its folded export form;
- :mod:`.train`: training on task-labelled rows; :mod:`.export`: one ONNX file with metadata;
- :mod:`.runtime`: :class:`Router` on onnxruntime (CPU, or CUDA when available);
- :mod:`.selection`: top-k, top-p, temperature, minimum weight, confidence threshold and fallback;
- :mod:`.eval_mode`: ``loramux eval --mix router:PATH`` (registered on import).
"""
from __future__ import annotations

from loramux.router.errors import RouterError, RouterFileError, RouterMismatchError, RouterSettingsError
from loramux.router.features import BaseTokenizer, FeatureRecipe
from loramux.router.metadata import METADATA_KEY, RouterMetadata
from loramux.router.runtime import Router, resolve_providers
from loramux.router.selection import Routing, SelectionSettings, select

from loramux.router import eval_mode as _eval_mode

_eval_mode.register()

__all__ = [
    "BaseTokenizer",
    "FeatureRecipe",
    "METADATA_KEY",
    "Router",
    "RouterError",
    "RouterFileError",
    "RouterMetadata",
    "RouterMismatchError",
    "RouterSettingsError",
    "Routing",
    "SelectionSettings",
    "resolve_providers",
    "select",
]
