"""``loramux serve --llama-server``: loramux's patched llama-server as a child, the hook in front.

:func:`patched_llama_server` builds the patched server once (:mod:`loramux.native.server_build`),
resolves ``--adapters`` into GGUF files as ``loramux serve`` does (PEFT folders are converted into
loramux's cache), and starts the server on a free loopback port with one ``--lora`` per adapter,
named by a symlink ``<adapter name>.gguf`` so that the hook names upstream adapters as the pool
does. The process itself (start, readiness, stop, dying with its parent) is
:func:`loramux.server.llama_process.llama_server_process`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from loramux.errors import LoramuxError
from loramux.server.llama_process import llama_server_process
from loramux.server.settings import ServeSettings


def adapter_files(settings: ServeSettings, base: Path) -> dict[str, Path]:
    """``{name: GGUF file}`` for ``--adapters`` (PEFT folders converted once, into loramux's cache)."""
    from loramux.adapters import adapter_name, cached_conversion, converted_adapter_path, find_adapter_sources, is_peft_folder
    from loramux.converters import read_base_model

    info = read_base_model(base)
    out: dict[str, Path] = {}
    for root in settings.adapters:
        for source in find_adapter_sources(root)[0]:
            name = adapter_name(source)
            if name in out:
                raise LoramuxError(f"two adapters are named {name!r} ({out[name]} and {source}): rename one")
            if is_peft_folder(source):
                target = converted_adapter_path(source, info, skip_embeddings=settings.skip_embeddings)
                source = cached_conversion(
                    source, base, target, outtype="f16", skip_embeddings=settings.skip_embeddings, allow_pickle=False
                )
            out[name] = source.resolve()
    return out


def server_flags(links: list[Path], settings: ServeSettings) -> list[str]:
    """llama-server's flags for the serve settings (slots, context per slot, threads, max_active, flash attention)."""
    threads = settings.threads or min(os.cpu_count() or 1, 8)
    flags = ["-np", str(settings.n_seq_max), "-c", str(settings.n_ctx * settings.n_seq_max), "-t", str(threads)]
    flags += ["--lora-max-active", str(settings.max_active), "--lora-init-without-apply", "--metrics"]
    flags += ["-fa", "on" if settings.flash_attn else "off"]
    for link in links:
        flags += ["--lora", str(link)]
    return flags


@contextlib.contextmanager
def patched_llama_server(settings: ServeSettings) -> Iterator[str]:
    """Start loramux's patched llama-server for ``settings`` (base, adapters, slots, context,
    threads, max_active, flash attention); yield its URL; stop it at the end."""
    from loramux.base_model import default_base_model
    from loramux.native.server_build import build_llama_server

    binary = build_llama_server()
    base = Path(settings.base) if settings.base else default_base_model()
    files = adapter_files(settings, base)
    with tempfile.TemporaryDirectory(prefix="loramux-llama-server-") as tmp:
        links = []
        for name, path in files.items():  # upstream names an adapter by its file's stem
            link = Path(tmp) / f"{name}.gguf"
            link.symlink_to(path)
            links.append(link)
        with llama_server_process(binary, base, server_flags(links, settings)) as server:
            print(
                f"loramux serve: patched llama-server (pid {server.proc.pid}) on {server.url} with {len(files)} adapters", file=sys.stderr
            )
            yield server.url


__all__ = ["adapter_files", "patched_llama_server", "server_flags"]
