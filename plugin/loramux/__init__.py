"""loramux: per-request weighted mixes of LoRA adapters for llama.cpp."""

from __future__ import annotations

__version__ = "0.1.0"

# Before anything imports llama_cpp: point it at the patched libllama when one is built, so that
# exactly one libllama is loaded and the native per-sequence path can be used (loramux.native).
from loramux import native as _native  # noqa: E402

_native.prepare()

from loramux.mix import MAX_ABS_WEIGHT, MAX_MIX_ADAPTERS, Mix  # noqa: E402
from loramux.pool import AdapterPool, AdapterSkippedWarning  # noqa: E402
from loramux.router import Router  # noqa: E402
from loramux.token_routing import TokenRouting  # noqa: E402

__all__ = ["MAX_ABS_WEIGHT", "MAX_MIX_ADAPTERS", "AdapterPool", "AdapterSkippedWarning", "Mix", "Router", "TokenRouting", "__version__"]
