"""loramux demo runs from the shipped examples alone (a copy outside the repository, no ../shared)."""
from __future__ import annotations

import json
import shutil

from loramux.cli import main
from loramux.cli.demo_cmd import default_examples_dir

from conftest import ROOT

DEFAULT_EXAMPLES = ROOT / "examples"


def test_demo_answers_with_base_and_mixes_from_a_copy_of_examples(tmp_path, base_model, capsys, monkeypatch):
    monkeypatch.setenv("LORAMUX_HOME", str(tmp_path / "home"))  # converts the demo adapters afresh
    examples = tmp_path / "examples"
    shutil.copytree(DEFAULT_EXAMPLES / "adapters", examples / "adapters")
    prompts = [json.loads(x) for x in (DEFAULT_EXAMPLES / "demo_prompts.jsonl").read_text().splitlines() if x.strip()][:3]
    (examples / "demo_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    assert main(["demo", "--base", str(base_model), "--examples", str(examples), "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "adapters boolean_expressions, dyck_languages, sports_understanding" in out
    assert out.count("    base ") == 3
    for p in prompts:
        assert p["prompt"] in out
        assert ",".join(f"{k}={v:g}" for k, v in sorted(p["mix"].items())) in out
    assert len(list((tmp_path / "home" / "adapters").glob("*.gguf"))) == 3


def test_demo_finds_the_repository_examples_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # how the README runs it, with loramux installed as a wheel or editable
    assert (default_examples_dir() / "demo_prompts.jsonl").samefile(DEFAULT_EXAMPLES / "demo_prompts.jsonl")
