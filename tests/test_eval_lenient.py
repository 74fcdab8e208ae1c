"""Lenient match next to exact match: the rule case by case, EvalResult's JSON and table carrying both, and the demo's marks.

No model runs here: the cases are strings, and the EvalResult is built from hand-written rows (the
object itself, as evaluate() builds it from its answers).
"""

from __future__ import annotations

import pytest

from loramux.cli.demo_cmd import MARK_RULE, _counts, _mark, _print
from loramux.evaluate import EvalResult, lenient_match, normalize_answer

# (answer, target, exact, lenient)
CASES = [
    # exact matches stay matches
    ("False", "False", True, True),
    ("  false\n", "False", True, True),
    ("(B)", "(B)", True, True),
    ("", "", True, True),
    ("] )", "] )", True, True),
    # (a) trailing punctuation and surrounding quotes, on both sides
    ("False.", "False", False, True),
    ("False!", "False", False, True),
    ("yes;", "yes", False, True),
    ('"False"', "False", False, True),
    ("`false`.", "False", False, True),
    ("False", "False.", False, True),
    ("] ) .", "] )", False, True),
    # (b) an option-letter target: the answer's leading option letter
    ("B", "(B)", False, True),
    ("B)", "(B)", False, True),
    ("B.", "(B)", False, True),
    ("(b).", "(B)", False, True),
    ("(B) some text", "(B)", False, True),
    ("B) some text", "(B)", False, True),
    ("B. some text", "(B)", False, True),
    ("(A) a dog", "(A)", False, True),  # the option's text may start with the word "a"
    ("(B) or (B)", "(B)", False, True),  # the same letter twice names one option
    # negative controls
    ("(C)", "(B)", False, False),
    ("C", "(B)", False, False),
    ("Bob", "(B)", False, False),
    ("B is right", "(B)", False, False),  # a bare letter followed by text is not an option
    ("The answer is (B)", "(B)", False, False),
    ("(B) or (C)", "(B)", False, False),
    ("(B) or C", "(B)", False, False),
    ("(B) (C)", "(B)", False, False),
    ("(B) C) text", "(B)", False, False),
    ("(B), (C)", "(B)", False, False),
    ("B/C", "(B)", False, False),
    ("(B) because not (C)", "(B)", False, False),
    ("(B)", "B", False, False),  # rule (b) reads option targets "(X)" only
    ("True.", "False", False, False),
    ("True", "False", False, False),
    ("yes, because it is", "yes", False, False),
    ("no", "yes", False, False),
    ("", "(B)", False, False),
    ("", "False", False, False),
    (".", "False", False, False),
    ("False", "", False, False),
    ("] ] )", "] )", False, False),  # brackets are not punctuation to drop
    ("False False", "False", False, False),
]


@pytest.mark.parametrize("answer,target,exact,lenient", CASES)
def test_exact_and_lenient_cases(answer, target, exact, lenient):
    assert (normalize_answer(answer) == normalize_answer(target)) is exact
    assert lenient_match(answer, target) is lenient
    assert not exact or lenient  # lenient never refuses an exact match


def test_lenient_match_documents_its_rule():
    doc = lenient_match.__doc__
    for phrase in ("trailing punctuation", "option letter", "yes, because", "Bob", "True."):
        assert phrase in doc, phrase
    import loramux.evaluate as evaluate

    assert "lenient" in evaluate.__doc__ and "exact" in evaluate.__doc__


def _row(task, i, answer, exact, lenient):
    return {"task": task, "id": i, "answer": answer, "correct": exact, "correct_lenient": lenient, "mix": {}}


def test_eval_result_reports_both_numbers_from_its_rows():
    rows = [
        _row("navigate", 0, "No", True, True),
        _row("navigate", 1, "No.", False, True),
        _row("navigate", 2, "Yes", False, False),
        _row("navigate", 3, "yes", True, True),
        _row("snarks", 0, "(A) text", False, True),
        _row("snarks", 1, "(B)", False, False),
    ]
    result = EvalResult(mode="base", rows=rows, extra={"seconds": 1.0})
    data = result.to_json()
    assert data["tasks"]["navigate"] == {"accuracy": 0.5, "accuracy_lenient": 0.75, "n": 4}
    assert data["tasks"]["snarks"] == {"accuracy": 0.0, "accuracy_lenient": 0.5, "n": 2}
    assert data["macro_accuracy"] == pytest.approx((0.5 + 0.0) / 2)
    assert data["macro_accuracy_lenient"] == pytest.approx((0.75 + 0.5) / 2)
    assert data["rows"] is rows and data["seconds"] == 1.0
    lines = result.table().splitlines()
    assert lines[0].split() == ["task", "n", "exact", "lenient"]
    assert lines[1].split() == ["navigate", "4", "0.500", "0.750"]
    assert lines[2].split() == ["snarks", "2", "0.000", "0.500"]
    assert lines[3].split()[-3:] == ["6", "0.250", "0.625"] and lines[3].startswith("macro average (2 tasks)")


class _Answer:
    def __init__(self, text, mix=None):
        self.text, self.mix = text, mix or {}


def test_demo_marks_by_the_lenient_rule(capsys):
    item = {"task": "boolean_expressions", "prompt": "not True is", "expected": "False"}
    for answer, _, _, lenient in [c for c in CASES if c[1] == "False"]:
        assert _mark(answer, item) == ("ok" if lenient else "x"), answer
    option = {"prompt": "which?", "expected": "(B)"}
    assert [_mark(a, option) for a in ("(B) some text", "B.", "(C)", "Bob")] == ["ok", "ok", "x", "x"]
    assert _mark("anything", {"prompt": "no expected answer"}) == ""
    # routed and base answers go through the same mark; the summary counts both rules
    prompts = [item, option]
    routed, base = [_Answer("False."), _Answer("(B)")], [_Answer("True"), _Answer("B) text")]
    assert _counts(routed, prompts) == (2, 1) and _counts(base, prompts) == (1, 0)
    _print(prompts, routed, base)
    out = capsys.readouterr().out
    assert out.count(MARK_RULE) == 1 and "lenient match" in MARK_RULE
    assert "-> 'False.' [ok]" in out and "-> 'True' [x]" in out and "-> 'B) text' [ok]" in out
