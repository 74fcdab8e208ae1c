"""Tool calling (OpenAI ``tools`` / ``tool_choice``): rendering, parsing, the call grammar, streaming, the server.

Oracles: every call that ``tool_choice: "required"`` or a named function forces names a given
function and its arguments validate against that function's parameter schema (the ``jsonschema``
package), over several prompts and tools; the same check refuses crafted arguments that break the
schema (its negative control). The fallback format is the Qwen2.5 template's own: a ChatML template
without tools (the embedded model's) renders a conversation with calls and results to exactly the
prompt a Qwen2.5-like template renders natively. A stream never shows text that the answer turns
into a call, and the official ``openai`` client's stream helper assembles the calls it sends.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from loramux import tools
from loramux.errors import RequestError
from loramux.pool import AdapterPool, PoolRequest
from loramux.pool_requests import sampling_from

from conftest import FIXTURES
from serve_proc import loramux_server

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    params = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


WEATHER = _fn(
    "get_weather",
    "Get the current weather in a city",
    {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    ["city", "unit"],
)
ADD = _fn("add", "Add two whole numbers", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"])
NOTE = _fn(
    "save_note",
    "Save a short note with tags",
    {
        "title": {"type": "string", "maxLength": 30},
        "tags": {"type": "array", "items": {"enum": ["work", "home", "urgent"]}, "maxItems": 3},
        "pinned": {"type": "boolean"},
    },
    ["title", "tags"],
)
TOOLS = [WEATHER, ADD, NOTE]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = ["What is the weather in Paris?", "What is 2 plus 3?", "Remember to buy milk tomorrow.", "Tell me a joke."]
CHOICES = ["required", *({"type": "function", "function": {"name": n}} for n in SCHEMAS)]
PLAIN_PROMPT = "What is 2 plus 3?"  # the 135M model answers it in words under tool_choice "auto"


def call_errors(call: dict, wanted: str | None = None) -> list[str]:
    """What is wrong with an OpenAI tool call (empty: a valid call of a given tool, ``wanted`` if named)."""
    fn = call.get("function") or {}
    if call.get("type") != "function" or not str(call.get("id", "")).startswith("call_"):
        return [f"not an OpenAI tool call: {call}"]
    if fn.get("name") not in SCHEMAS or (wanted is not None and fn["name"] != wanted):
        return [f"calls {fn.get('name')!r}, wanted {wanted or 'a given tool'}"]
    try:
        args = json.loads(fn["arguments"])
    except (TypeError, ValueError) as exc:
        return [f"arguments are not JSON: {exc}"]
    return [e.message for e in jsonschema.Draft202012Validator(SCHEMAS[fn["name"]]).iter_errors(args)]


def test_the_call_check_refuses_calls_that_break_the_schema():
    good = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}
    assert call_errors(good) == [] and call_errors(good, "get_weather") == []
    bad_args = [
        '{"city": 7, "unit": "celsius"}',
        '{"city": "Oslo", "unit": "kelvin"}',
        '{"city": "Oslo"}',
        '{"city": "Oslo", "unit": "celsius"',
    ]
    for args in bad_args:
        assert call_errors({**good, "function": {"name": "get_weather", "arguments": args}}), args
    assert call_errors(good, "add") and call_errors({**good, "function": {"name": "nope", "arguments": "{}"}})
    assert call_errors({**good, "function": {"name": "add", "arguments": '{"a": 1.5, "b": 2}'}})


# --- parsing -------------------------------------------------------------------------------------------


def test_the_parser_reads_calls_and_the_text_before_them():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>\n'
    text += '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    content, calls = tools.parse_calls(text, list(SCHEMAS))
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"a": 1, "b": 2} and not any(call_errors(c) for c in calls)
    assert len({c["id"] for c in calls}) == 2
    # a whole answer that is one JSON call ("parameters" too), and a last call the answer ended inside of
    for bare in ('  {"name": "add", "parameters": {"a": 4, "b": 5}}', '<tool_call>\n{"name": "add", "arguments": {"a": 4, "b": 5}}'):
        content, calls = tools.parse_calls(bare, list(SCHEMAS))
        assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": 4, "b": 5}
    content, calls = tools.parse_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>', ["add"])
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}  # arguments given as a JSON string


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 5.",
        '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>',  # malformed JSON
        '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>',  # a function not in tools
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call><tool_call>{"name": "nope", "arguments": {}}</tool_call>',
        '{"name": "add", "arguments": "a=1"}',  # arguments not a JSON object
        '{"name": "add", "arguments": {"a": 1}} and more',
        '{"city": "Oslo"}',
    ],
)
def test_what_is_not_a_valid_call_stays_content(text):
    assert tools.parse_calls(text, list(SCHEMAS)) is None
    use = tools.tool_use(TOOLS, "auto")
    holder = use.holder()
    shown = "".join(holder.feed(text[i : i + 3]) for i in range(0, len(text), 3))
    rest, calls = holder.finish("")
    assert calls == [] and shown + rest == text  # all of it is content, streamed or not


@pytest.mark.parametrize(
    "text",
    [
        'Sure! <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        '\n{"name": "add", "arguments": {"a": 1, "b": 2}}',
        "I will add them.  <tool_cal",
        "Plain words, then a brace { and <tool",
    ],
)
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_a_stream_never_shows_what_becomes_a_call(text, step):
    use = tools.tool_use(TOOLS, "auto")
    holder = use.holder()
    shown = "".join(holder.feed(text[i : i + step]) for i in range(0, len(text), step))
    rest, calls = holder.finish("")
    parsed = use.parse(text)
    if parsed is None:
        assert calls == [] and shown + rest == text
    else:
        assert shown + rest == (parsed[0] or "") and "<" not in shown and "{" not in shown
        assert [c["function"] for c in calls] == [c["function"] for c in parsed[1]] and [c["index"] for c in calls] == [0]


# --- rendering -----------------------------------------------------------------------------------------

QWEN_LIKE = (  # Qwen2.5-Instruct's chat template (its tool parts; the default system prompt shortened)
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    '{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}'
    '{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}'
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}'
    '\\n</tool_call><|im_end|>\\n" }}'
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) '
    'or (message.role == "assistant" and not message.tool_calls) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == \"assistant\" %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    '{%- elif message.role == "tool" %}'
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _conversation() -> list[dict]:
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
    ]
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Oslo, and 1 + 2?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature": 3}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "3"},
    ]


@pytest.fixture(scope="module")
def pool(base_model):
    with AdapterPool(base_model, n_ctx=1024, n_seq_max=4, n_threads=1) as p:  # one thread: no spinning on a shared machine
        yield p


def test_the_fallback_is_the_qwen_format_and_a_tools_template_renders_natively(pool):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # here: loramux is imported first (its native library)

    qwen = Jinja2ChatFormatter(template=QWEN_LIKE, eos_token="<|im_end|>", bos_token="")
    assert tools.template_takes_tools(qwen.template) and not tools.template_takes_tools(pool.text._chat_formatter.template)
    use = tools.tool_use(TOOLS, "auto")
    native = tools.render(qwen, _conversation(), use).prompt
    assert '"arguments": {"city": "Oslo", "unit": "celsius"}}' in native  # arguments as objects, as HF templates take them
    assert native.count("<tool_response>") == 2 and json.dumps(ADD) in native
    smol = pool.text.chat_format(_conversation(), use).prompt  # the embedded model's ChatML template: the fallback
    assert smol == native
    assert tools.FALLBACK_TOOLS_HEAD in smol and tools.FALLBACK_TOOLS_TAIL in smol and "You are terse.\n\n# Tools" in smol
    # without a system message the fallback adds one; a named choice lists only that tool; "none" lists none
    named = pool.text.chat_format(
        [{"role": "user", "content": "hi"}], tools.tool_use(TOOLS, {"type": "function", "function": {"name": "add"}})
    )
    assert named.prompt.startswith("<|im_start|>system\n# Tools") and json.dumps(ADD) in named.prompt and "get_weather" not in named.prompt
    assert tools.tool_use(TOOLS, "none") is None
    plain = pool.text.chat_format(_conversation()).prompt  # tool messages without tools (tool_choice "none"): still rendered
    assert "# Tools" not in plain and "<tool_response>\n3\n</tool_response>" in plain and '"name": "add"' in plain


def test_bad_tools_and_choices_are_refused_naming_the_field(pool):
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "grammar": 'root ::= "a"'}, "tool_choice"),
    ]
    for kwargs, param in cases:
        with pytest.raises(RequestError) as refused:
            pool.create_chat_completion(msgs, max_tokens=2, **kwargs)
        assert refused.value.param == param, (kwargs, refused.value)
    with pytest.raises(RequestError) as refused:
        PoolRequest(prompt="hi", tools=TOOLS)
    assert refused.value.param == "tools"
    # the tool grammar in sampling is the request's own: building the same request again keeps it
    req = PoolRequest(messages=msgs, tools=TOOLS, tool_choice="required", sampling=sampling_from({}, chat=True))
    again = PoolRequest(messages=msgs, tools=TOOLS, tool_choice="required", sampling=req.sampling)
    assert again.sampling.grammar == req.sampling.grammar and req.sampling.grammar.startswith('root ::= "<tool_call>\\n" tool-call')


def test_python_api_required_named_and_auto(pool):
    out = pool.create_chat_completion(
        [{"role": "user", "content": PROMPTS[0]}], tools=TOOLS, tool_choice="required", temperature=0, max_tokens=64
    )
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert [call_errors(c) for c in choice["message"]["tool_calls"]] == [[]]
    stream = pool.create_chat_completion(
        [{"role": "user", "content": PROMPTS[1]}], tools=TOOLS, tool_choice=CHOICES[2], temperature=0, max_tokens=64, stream=True
    )
    chunks = list(stream)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not any(d.get("content") for d in deltas) and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    (calls,) = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert call_errors({k: v for k, v in calls[0].items() if k != "index"}, "add") == []
    plain = pool.create_chat_completion([{"role": "user", "content": PLAIN_PROMPT}], tools=TOOLS, temperature=0, max_tokens=48)
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["choices"][0]["message"]["content"].strip()
    assert "tool_calls" not in plain["choices"][0]["message"]


def test_the_batch_call_reads_tool_calls_as_the_single_call_does(pool):
    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    batch = pool.create_chat_completions(convs, tools=TOOLS, tool_choice="required", max_tokens=64)
    alone = [pool.create_chat_completion(c, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=64) for c in convs]
    for b, a in zip(batch, alone):
        assert b["choices"][0]["finish_reason"] == "tool_calls" == a["choices"][0]["finish_reason"]
        strip = lambda calls: [c["function"] for c in calls]  # noqa: E731  (ids are fresh per answer)
        assert strip(b["choices"][0]["message"]["tool_calls"]) == strip(a["choices"][0]["message"]["tool_calls"])


# --- the server, through the official openai client -------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_model):
    folder = tmp_path_factory.mktemp("serve-tools")
    shutil.copytree(FIXTURES / "navigate", folder / "navigate")
    args = ["--base", str(base_model), "--adapters", str(folder), "--threads", "1", "--n-seq-max", "4", "--n-ctx", "1024"]
    with loramux_server(*args, log_dir=folder) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_required_and_named_choices_always_give_valid_calls(client):
    def ask(case):
        prompt, choice = case
        out = client.chat.completions.create(
            model="loramux", messages=[{"role": "user", "content": prompt}], tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=64
        )
        return case, out.choices[0]

    cases = [(p, c) for p in PROMPTS[:3] for c in CHOICES]  # p-major: each prompt's 4 choices decode together
    with ThreadPoolExecutor(4) as ex:
        answers = list(ex.map(ask, cases))
    for (prompt, choice), ans in answers:
        wanted = None if choice == "required" else choice["function"]["name"]
        assert ans.finish_reason == "tool_calls" and ans.message.tool_calls, (prompt, choice, ans)
        errors = [call_errors(c.model_dump(), wanted) for c in ans.message.tool_calls]
        assert errors == [[]] * len(errors), (prompt, choice, ans.message.tool_calls, errors)
    assert len({a.message.tool_calls[0].function.name for _, a in answers}) == len(SCHEMAS)  # every tool was called


def test_a_tool_round_trip_whole(client):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model="loramux", messages=msgs, tools=TOOLS, tool_choice=CHOICES[1], temperature=0, max_tokens=64
    ).choices[0]
    (call,) = first.message.tool_calls
    assert first.finish_reason == "tool_calls" and call_errors(call.model_dump(), "get_weather") == []
    msgs += [first.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'}]
    for choice in ("none", "auto"):
        second = client.chat.completions.create(
            model="loramux", messages=msgs, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=48
        )
        ans = second.choices[0]
        assert ans.message.content or ans.message.tool_calls, (choice, ans)
        assert choice == "auto" or (ans.message.content.strip() and not ans.message.tool_calls)


def test_a_tool_round_trip_streamed(client):
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    with client.chat.completions.stream(
        model="loramux", messages=msgs, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=64
    ) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_completion().choices[0]
    assert "content.delta" not in kinds and "tool_calls.function.arguments.done" in kinds
    assert final.finish_reason == "tool_calls" and final.message.content is None
    (call,) = final.message.tool_calls
    assert (
        call_errors(call.model_dump(exclude={"parsed_arguments"}) | {"function": call.function.model_dump(include={"name", "arguments"})})
        == []
    )
    msgs += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(include={"id", "type", "function"})]},
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    with client.chat.completions.stream(
        model="loramux", messages=msgs, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=48
    ) as stream:
        text = "".join(ev.delta for ev in stream if ev.type == "content.delta")
        final = stream.get_final_completion().choices[0]
    assert text.strip() and final.message.content == text and not final.message.tool_calls


def test_auto_streams_a_plain_answer_as_content(client, server):
    msgs = [{"role": "user", "content": PLAIN_PROMPT}]
    whole = client.chat.completions.create(model="loramux", messages=msgs, tools=TOOLS, temperature=0, max_tokens=48).choices[0]
    assert whole.finish_reason == "stop" and whole.message.content.strip() and not whole.message.tool_calls
    parts = []
    for chunk in client.chat.completions.create(model="loramux", messages=msgs, tools=TOOLS, temperature=0, max_tokens=48, stream=True):
        if chunk.choices:
            assert not chunk.choices[0].delta.tool_calls
            parts.append(chunk.choices[0].delta.content or "")
    assert "".join(parts) == whole.message.content
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": msgs, "functions": [WEATHER["function"]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "functions" and "tools" in r.json()["error"]["message"]
    body = {"messages": msgs, "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}
    r = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={**body, "response_format": None, "tool_choice": {"type": "function", "function": {"name": "x"}}},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
