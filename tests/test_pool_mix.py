"""Mix: parsing, validation and bounds (pure Python, no model)."""

from __future__ import annotations

import math

import pytest

from loramux.errors import MixError
from loramux.mix import MAX_ABS_WEIGHT, MAX_MIX_ADAPTERS, Mix


def test_parse_round_trips_and_sorts():
    m = Mix.parse(" b=0.25 , a=0.75")
    assert m.to_dict() == {"a": 0.75, "b": 0.25}
    assert list(m) == ["a", "b"]
    assert Mix.parse(str(m)) == m
    third = Mix.uniform(["x", "y", "z"])
    assert Mix.parse(str(third)) == third  # repr-exact weights survive the text form


def test_empty_forms_are_the_base_model():
    for text in ("", "  ", "base", "none"):
        assert Mix.parse(text).is_base
    assert Mix.coerce(None) == Mix() == {}
    assert str(Mix()) == "base"


def test_zero_weights_are_dropped_and_equality_follows():
    assert Mix({"a": 1.0, "b": 0.0}) == Mix({"a": 1.0})
    assert hash(Mix({"a": 1.0, "b": 0.0})) == hash(Mix({"a": 1}))
    assert Mix({"a": 0.5}) != Mix({"a": 0.25})


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a", "has no '='"),
        ("a=x", "not a number"),
        ("a=1,,b=2", "empty item"),
        ("a=1,a=2", "appears twice"),
        ("a=nan", "finite"),
        ("a=inf", "finite"),
        (f"a={MAX_ABS_WEIGHT + 0.5}", "must lie in"),
        ("=1", "non-empty"),
    ],
)
def test_bad_mix_strings_raise_mix_error(text, fragment):
    with pytest.raises(MixError, match=fragment):
        Mix.parse(text)


def test_mapping_validation():
    with pytest.raises(MixError, match="finite"):
        Mix({"a": math.nan})
    with pytest.raises(MixError, match="bool"):
        Mix({"a": True})
    with pytest.raises(MixError, match="whitespace"):
        Mix({"a b": 1.0})
    with pytest.raises(MixError, match="at most"):
        Mix({f"n{i}": 0.01 for i in range(MAX_MIX_ADAPTERS + 1)})
    assert Mix({"a": -MAX_ABS_WEIGHT}).to_dict() == {"a": -MAX_ABS_WEIGHT}  # negative weights are allowed


def test_unknown_names_list_the_known_ones():
    with pytest.raises(MixError) as err:
        Mix.parse("a=1,zz=0.5").check_known(["a", "b", "c"])
    message = str(err.value)
    assert "'zz'" in message and "a, b, c" in message
    assert Mix.parse("a=1").check_known(["a"]) == {"a": 1.0}


def test_uniform_sums_to_one():
    m = Mix.uniform([f"t{i}" for i in range(22)])
    assert len(m) == 22
    assert math.isclose(sum(m.values()), 1.0)
    assert Mix.uniform([]).is_base
