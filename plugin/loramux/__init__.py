"""loramux: per-request weighted mixes of LoRA adapters for llama.cpp."""
from __future__ import annotations

__version__ = "0.1.0"
