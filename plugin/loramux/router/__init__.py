"""loramux.router: a learned router that turns a prompt into a Mix of the pool's adapters.

- :mod:`.features`: the base model's tokenizer and token embeddings (the only inputs);
- :mod:`.model`: the small MLP (torch, ``train`` extra) and its folded export form;
- :mod:`.train`: training on task-labelled rows; :mod:`.export`: one ONNX file with metadata;
- :mod:`.runtime`: :class:`Router` on onnxruntime (CPU, or CUDA when available);
- :mod:`.selection`: top-k, top-p, temperature, minimum weight, confidence threshold and fallback;
- :mod:`.registry`: the one registry of routers (``router:PATH``, ``retrieval:KEYS``, ``logo``,
  ``file:MIX.json``) that eval, run, chat and the server read: :func:`open_router`;
- training-free routers: :mod:`.retrieval` (keys from sample prompts, :mod:`.embedding`),
  :mod:`.logo` (the adapters' own output norms), :mod:`.fixed` (a mix from a file).
"""

from __future__ import annotations

from loramux.router.errors import RouterError, RouterFileError, RouterMismatchError, RouterSettingsError
from loramux.router.features import BaseTokenizer, FeatureRecipe
from loramux.router.metadata import METADATA_KEY, RouterMetadata
from loramux.router.registry import PromptRouter, is_router_spec, open_router, register_router, router_kinds
from loramux.router.runtime import Router, resolve_providers
from loramux.router.selection import Routing, SelectionSettings, select

__all__ = [
    "BaseTokenizer",
    "FeatureRecipe",
    "METADATA_KEY",
    "PromptRouter",
    "Router",
    "RouterError",
    "RouterFileError",
    "RouterMetadata",
    "RouterMismatchError",
    "RouterSettingsError",
    "Routing",
    "SelectionSettings",
    "is_router_spec",
    "open_router",
    "register_router",
    "resolve_providers",
    "router_kinds",
    "select",
]
