"""loramux: per-request weighted mixes of LoRA adapters for llama.cpp."""
from __future__ import annotations

__version__ = "0.1.0"

from loramux.mix import MAX_ABS_WEIGHT, MAX_MIX_ADAPTERS, Mix  # noqa: E402
from loramux.pool import AdapterPool, AdapterSkippedWarning  # noqa: E402
from loramux.router import Router  # noqa: E402
