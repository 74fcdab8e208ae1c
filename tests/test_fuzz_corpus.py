"""Replay the fuzzing corpus through loramux's file readers (issue 13, part 4: fuzzed readers).

``tests/fuzz_corpus/<target>/`` holds the inputs ``scripts/fuzz_readers.py`` found (crash-*,
slow-*, timeout-*: each made a reader raise something other than a LoramuxError, or hang, before
the fixes) and a few seeds made from the real fixtures (seed-*). Every one must now give a result
or a LoramuxError whose message names the input, within TIME_LIMIT_S. atheris is not needed here:
the script's harness (how an input becomes a file, which reader reads it) is imported without it.
"""

from __future__ import annotations

import importlib.util
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

from loramux.errors import LoramuxError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).with_name("fuzz_corpus")
TIME_LIMIT_S = 5.0
MAX_CORPUS_BYTES = 1 << 20


def _load_harness() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_readers", ROOT / "scripts" / "fuzz_readers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUZZ = _load_harness()
CASES = [(t, p) for t in FUZZ.TARGETS if (CORPUS / t).is_dir() for p in sorted((CORPUS / t).iterdir()) if p.is_file()]


def _run_with_time_limit(call: Callable[[], Any], seconds: float) -> tuple[bool, Any, BaseException | None]:
    """(finished, result, exception) of ``call`` run in a daemon thread that is given ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - judged by the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), box.get("result"), box.get("error")


def test_every_target_has_a_corpus():
    """The replay below must have something to replay: seeds and findings for every reader."""
    for target in FUZZ.TARGETS:
        names = [p.name for p in (CORPUS / target).iterdir()] if (CORPUS / target).is_dir() else []
        assert names, f"{CORPUS / target} is empty: run scripts/fuzz_readers.py --target {target} --save-seeds"
        assert any(n.startswith("seed-") for n in names), f"{CORPUS / target} has no seed-* input"
    assert sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) == sorted(FUZZ.TARGETS)
    findings = [p for _, p in CASES if not p.name.startswith("seed-")]
    assert findings, "the corpus holds no finding (crash-*, slow-*, timeout-*) at all"
    total = sum(p.stat().st_size for _, p in CASES)
    assert total < MAX_CORPUS_BYTES, f"the corpus is {total} bytes; keep it under {MAX_CORPUS_BYTES}"


@pytest.fixture(scope="module")
def base_info(base_model):
    from loramux.converters import read_base_model

    return read_base_model(base_model)


@pytest.mark.parametrize("target,path", CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_corpus_input_gives_a_result_or_a_loramux_error(target, path, tmp_path, request):
    base = request.getfixturevalue("base_info") if target == "gguf_adapter" else None
    data = path.read_bytes()
    finished, result, error = _run_with_time_limit(lambda: FUZZ.replay(target, data, tmp_path, base), TIME_LIMIT_S)
    assert finished, f"{target} reader still busy after {TIME_LIMIT_S} s on {path.name} (a hang)"
    if error is None:
        assert result is not None
        return
    if not isinstance(error, LoramuxError):
        trace = "".join(traceback.format_exception(error))
        pytest.fail(f"{target} reader raised {type(error).__name__}, not a LoramuxError, on {path.name}:\n{trace}")
    message = str(error)
    named = {str(tmp_path), str(tmp_path.resolve())}
    assert any(n in message for n in named), f"the message does not name the input file: {message}"
    assert len(message) < 2000, f"the message is {len(message)} characters long: {message[:300]}..."
