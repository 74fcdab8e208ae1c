"""loramux.native: the patched llama.cpp with per-sequence adapter mixes (not built yet)."""
from __future__ import annotations


def available() -> bool:
    """True when the native per-sequence mix library is loaded; for now always False."""
    return False
