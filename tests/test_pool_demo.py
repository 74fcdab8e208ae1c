"""loramux demo runs from the shipped examples alone (a copy outside the repository, no ../shared)."""

from __future__ import annotations

import json
import re
import shutil

from loramux.cli import main
from loramux.cli.demo_cmd import default_examples_dir

from conftest import ROOT

DEFAULT_EXAMPLES = ROOT / "examples"


def test_demo_routes_each_prompt_to_its_task_and_answers_in_one_batch(tmp_path, base_model, capsys, monkeypatch):
    monkeypatch.setenv("LORAMUX_HOME", str(tmp_path / "home"))  # converts the demo adapters afresh
    examples = tmp_path / "examples"
    shutil.copytree(DEFAULT_EXAMPLES / "adapters", examples / "adapters")
    shutil.copy(DEFAULT_EXAMPLES / "retrieval_samples.jsonl", examples)
    prompts = [json.loads(x) for x in (DEFAULT_EXAMPLES / "demo_prompts.jsonl").read_text().splitlines() if x.strip()]
    prompts = [prompts[0], prompts[3], prompts[6]]  # one prompt of each of the three tasks
    (examples / "demo_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    assert main(["demo", "--base", str(base_model), "--examples", str(examples), "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "adapters boolean_expressions, dyck_languages, sports_understanding" in out
    routed = re.findall(r"^    routed  (\S+)", out, flags=re.M)
    assert len(routed) == 3 and out.count("    base    ") == 3
    for p, mix in zip(prompts, routed):
        top = mix.split(",")[0].split("=")[0]
        assert top == p["task"], (p["task"], mix)  # retrieval over the shipped samples picks the task's adapter
    assert re.search(r"3 prompts in one batch \((native|context)[a-z, ]* path\)", out)
    assert len(list((tmp_path / "home" / "adapters").glob("*.gguf"))) == 3


def test_demo_finds_the_repository_examples_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # how the README runs it, with loramux installed as a wheel or editable
    assert (default_examples_dir() / "demo_prompts.jsonl").samefile(DEFAULT_EXAMPLES / "demo_prompts.jsonl")
