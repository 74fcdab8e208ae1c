"""A pytest plugin (``-p loramux_upstream``) for llama.cpp's server tests run against ``loramux serve``.

Loaded into the pytest that runs upstream's unit files (tests/test_upstream_server.py starts it),
without editing upstream's files:

- ``wget`` (imported by upstream's utils.py) is replaced by a module whose ``download`` fails
  with a clear message: no model hub is reachable, so ``utils.download_file`` cannot fetch.
- ``utils.ServerPreset.load_all`` (called by the autouse session fixture of upstream's conftest.py
  to download every preset's model from the hub) becomes a no-op: the launcher serves loramux's
  embedded base model whatever the preset asks for.
- ``ServerProcess.make_request``'s headers stay case-insensitive, as HTTP header names are
  (upstream copies them into a plain dict; uvicorn writes names in lower case, llama-server capitalized).
- The skip list (``skips.toml`` beside this file, or ``$LORAMUX_UPSTREAM_SKIPS``) marks its tests
  skipped with their reason (an entry is a node id, or ``file::test[*]`` for every
  parametrization). Entries that match no collected test of the files run are written to
  ``$LORAMUX_UPSTREAM_REPORT`` (JSON), so the caller can refuse a stale list.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SKIPS = Path(__file__).resolve().with_name("skips.toml")
CATEGORIES = {
    "model_text": "asserts the stories260K / tinyllama model's own text or token counts (loramux serves SmolLM2-135M)",
    "out_of_scope": "needs a feature loramux serve leaves out of scope",
    "hub": "needs a file from a model hub (none is reachable)",
}
SKIP_PREFIX = "loramux skip list: "


class HubUnreachable(RuntimeError):
    """What upstream's download_file raises here."""


def _no_download(url: str, out: str | None = None, bar=None) -> str:
    raise HubUnreachable(f"no model hub is reachable in loramux's test run: cannot download {url} (list the test in skips.toml as 'hub')")


def _install_wget_stub() -> None:
    stub = types.ModuleType("wget")
    stub.download = _no_download
    sys.modules["wget"] = stub


_install_wget_stub()


def load_skips(path: Path) -> dict[str, tuple[str, str]]:
    """node-id pattern -> (category, reason), from the TOML skip list (one table per category)."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    unknown = sorted(set(data) - set(CATEGORIES))
    if unknown:
        raise pytest.UsageError(f"{path}: unknown skip categories {unknown}; known: {sorted(CATEGORIES)}")
    skips: dict[str, tuple[str, str]] = {}
    for category, entries in data.items():
        for pattern, reason in entries.items():
            if not isinstance(reason, str) or not reason.strip():
                raise pytest.UsageError(f"{path}: [{category}] {pattern!r} needs a reason")
            if pattern in skips:
                raise pytest.UsageError(f"{path}: {pattern!r} is listed twice")
            skips[pattern] = (category, reason)
    return skips


def matches(pattern: str, nodeid: str) -> bool:
    """An exact node id, or ``file::test[*]``: every parametrization of that test."""
    if pattern.endswith("[*]"):
        return nodeid.startswith(pattern[:-2])
    return nodeid == pattern


def _neutralize_presets() -> None:
    utils = sys.modules.get("utils")
    if utils is not None and hasattr(utils, "ServerPreset"):
        utils.ServerPreset.load_all = staticmethod(lambda: None)
    if utils is not None and hasattr(utils, "ServerProcess") and not hasattr(utils.ServerProcess, "_loramux_headers"):
        _case_insensitive_headers(utils.ServerProcess)


def _case_insensitive_headers(process_class) -> None:
    """``make_request`` answers with ``dict(response.headers)``: a case-sensitive copy of headers whose
    names HTTP defines case-insensitive (RFC 9110, 5.1). llama-server writes ``Access-Control-Allow-Origin``,
    uvicorn writes every name in lower case: the answer keeps requests' case-insensitive mapping instead."""
    from requests.structures import CaseInsensitiveDict

    original = process_class.make_request

    def make_request(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        result.headers = CaseInsensitiveDict(result.headers)
        return result

    process_class.make_request = make_request
    process_class._loramux_headers = True


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the listed tests skipped, neutralize ``load_all``, report the entries that matched nothing."""
    _neutralize_presets()
    skips = load_skips(Path(os.environ.get("LORAMUX_UPSTREAM_SKIPS") or SKIPS))
    used: set[str] = set()
    for item in items:
        for pattern, (category, reason) in skips.items():
            if matches(pattern, item.nodeid):
                item.add_marker(pytest.mark.skip(reason=f"{SKIP_PREFIX}{category}: {reason}"))
                used.add(pattern)
                break
    files = {item.nodeid.split("::", 1)[0] for item in items}
    stale = sorted(p for p in skips if p not in used and p.split("::", 1)[0] in files)
    report = os.environ.get("LORAMUX_UPSTREAM_REPORT")
    if report:
        Path(report).write_text(json.dumps({"stale_skips": stale, "collected": len(items)}), encoding="utf-8")
