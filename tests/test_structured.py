"""Structured outputs (issue 26, first part): response_format and grammars through llama.cpp's grammar sampler.

Each request's grammar lives in its own sampler chain, so requests with different schemas, with
and without one, and under different mixes decode together. Oracles: every answer validates
against its schema (the ``jsonschema`` package); each equals the same request decoded alone; and,
as the negative control, the same requests without a constraint do not validate.
"""

from __future__ import annotations

import json

import pytest

from loramux.errors import RequestError
from loramux.pool import AdapterPool, PoolRequest
from loramux.pool_requests import sampling_from

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ANSWER = {
    "type": "object",
    "properties": {"answer": {"enum": ["True", "False"]}, "confidence": {"type": "number"}},
    "required": ["answer"],
}
COLORS = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3}
CASES = [  # (prompt, schema, mix)
    ("Describe a person as JSON with a name and an age.", PERSON, {"navigate": 1.0}),
    ("not ( True ) and ( True ) is", ANSWER, {"boolean_expressions": 1.0}),
    ("List two colors.", COLORS, None),
    ("Describe an old sailor as JSON.", PERSON, {"snarks": 0.6, "navigate": 0.4}),
]


def _request(prompt: str, schema: dict | None, mix) -> PoolRequest:
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}} if schema else None
    return PoolRequest(
        messages=[{"role": "user", "content": prompt}],
        mix=mix,
        max_tokens=64,
        sampling=sampling_from({"temperature": 0, "response_format": rf}, chat=True),
    )


@pytest.fixture(scope="module")
def pool(base_model, converted_dir):
    with AdapterPool(base_model, n_ctx=512, n_seq_max=4) as p:
        p.load_adapters([converted_dir / f"{n}.gguf" for n in ("navigate", "boolean_expressions", "snarks")])
        yield p


def test_schemas_constrain_batched_requests_each_as_alone(pool):
    together = pool.generate([_request(p, s, m) for p, s, m in CASES])
    for (prompt, schema, _), res in zip(CASES, together):
        jsonschema.validate(json.loads(res.text), schema)  # raises with the path of what is wrong
    alone = [pool.generate([_request(p, s, m)])[0].text for p, s, m in CASES]
    assert [r.text for r in together] == alone
    # negative control: without the grammar the same requests do not give valid JSON of their schema
    free = pool.generate([_request(p, None, m) for p, _, m in CASES])
    assert not any(_valid(r.text, s) for r, (_, s, _) in zip(free, CASES)), [r.text for r in free]


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_json_object_gives_an_object_and_a_grammar_is_applied_as_given(pool):
    cat = {"type": "object", "properties": {"cat": {"type": "string", "maxLength": 12}}, "required": ["cat"], "additionalProperties": False}
    out = pool.create_chat_completion(  # json_object with llama-cpp-python's "schema" extension
        [{"role": "user", "content": "Name a cat, as JSON."}],
        response_format={"type": "json_object", "schema": cat},
        temperature=0,
        max_tokens=48,
    )
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), cat)
    yes_no = pool.create_completion("Is the sky blue? Answer:", grammar='root ::= " yes" | " no"', temperature=0, max_tokens=8)
    assert yes_no["choices"][0]["text"] in (" yes", " no")


def test_bad_grammars_and_schemas_are_refused_naming_the_field(pool):
    with pytest.raises(RequestError, match="GBNF") as refused:
        pool.create_completion("hi", grammar="root ::= (", max_tokens=2)
    assert refused.value.param == "grammar"
    with pytest.raises(RequestError, match="response_format type") as refused:
        pool.create_chat_completion([{"role": "user", "content": "hi"}], response_format={"type": "yaml"})
    assert refused.value.param == "response_format"
    with pytest.raises(RequestError, match="not both"):
        pool.create_completion("hi", grammar='root ::= "a"', response_format={"type": "json_object"})


def test_the_greedy_shortlist_chooses_what_the_whole_vocabulary_chooses(pool, monkeypatch):
    """Greedy under a grammar tries the best ``shortlist`` tokens before the whole vocabulary: the
    same answers as with the whole vocabulary at every rejection (shortlist 0), for every case,
    and a shortlist of 1 (the negative control: too short to hold an allowed token) falls back."""
    from loramux.engine.sampling import SequenceSampler

    fast = [r.text for r in pool.generate([_request(p, s, m) for p, s, m in CASES])]
    monkeypatch.setattr(SequenceSampler, "shortlist", 0)
    whole = [r.text for r in pool.generate([_request(p, s, m) for p, s, m in CASES])]
    monkeypatch.setattr(SequenceSampler, "shortlist", 1)
    one = [r.text for r in pool.generate([_request(p, s, m) for p, s, m in CASES])]
    assert fast == whole == one
