"""Tool calling: OpenAI's ``tools`` / ``tool_choice`` in the prompt, in the grammar, and back out of the answer.

Rendering (:func:`render`): a chat template whose source mentions ``tools`` (Qwen2.5, Llama 3.1,
Hermes, ... as llama-server's ``--jinja`` renders them) gets the request's ``tools`` and
``tool_choice`` and the messages in OpenAI's shape (``role: "tool"`` messages, assistant
``tool_calls``, their ``arguments`` as objects, as Hugging Face templates expect). Any other
template gets the FALLBACK: the tools listed in a system message (merged into an existing first
system message) in the Hermes / Qwen2.5 words (:data:`FALLBACK_TOOLS_HEAD`, one JSON tool per
line, :data:`FALLBACK_TOOLS_TAIL`), assistant calls written back as ``<tool_call>`` text and tool
results as ``<tool_response>`` blocks in a user turn.

Parsing (:meth:`ToolUse.parse`): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks (one or several; a last unclosed one counts), or a whole answer that is one JSON object
with ``name`` and ``arguments`` (or ``parameters``), become OpenAI ``tool_calls``; the content is
the text before the first call (None when blank). A call to a function not in ``tools``, or
arguments that are not a JSON object, leaves the whole answer as plain content.

``tool_choice: "required"`` or a named function constrains the answer with a grammar made by
llama-cpp-python's JSON-schema converter (:func:`loramux.structured.schema_grammar`):
``<tool_call>\\n{"name": <the name>, "arguments": <its parameters' schema>}\\n</tool_call>``,
any of the tools for ``"required"``. ``"none"``: no tools in the prompt, no parsing.
:class:`CallHolder` holds back, in a stream, the text that may turn into a call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from loramux.errors import RequestError
from loramux.structured import schema_grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FALLBACK_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
FALLBACK_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)


def _tool(t: Any, i: int) -> dict[str, Any]:
    """One OpenAI tool ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``, checked."""
    fn = t.get("function") if isinstance(t, Mapping) and t.get("type", "function") == "function" else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not _NAME.fullmatch(fn["name"]):
        raise RequestError(
            f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": {{...}}}}}} '
            "with a name of 1 to 64 letters, digits, _ . -",
            param="tools",
        )
    params = fn.get("parameters")
    if params is not None and not isinstance(params, Mapping):
        raise RequestError(f"tools[{i}].function.parameters must be a JSON schema (an object)", param="tools")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise RequestError(f"tools[{i}].function.description must be a string", param="tools")
    return {"type": "function", "function": dict(fn)}


def _choice(choice: Any, names: Sequence[str]) -> str | None:
    """``"auto"``, ``"required"``, ``"none"``, or the named function's name (else RequestError naming tool_choice)."""
    if choice in ("auto", "required", "none"):
        return choice
    fn = choice.get("function") if isinstance(choice, Mapping) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str):
        raise RequestError(
            'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}', param="tool_choice"
        )
    if name not in names:
        raise RequestError(
            f"tool_choice names function {name!r}, which is not in tools ({', '.join(names) or 'none given'})", param="tool_choice"
        )
    return name


@dataclass(frozen=True)
class ToolUse:
    """The tools of one request and how they may be used (``choice``: ``"auto"``, ``"required"`` or a
    function's name); made by :func:`tool_use`, which returns None where nothing is to be called."""

    tools: tuple[dict[str, Any], ...]
    choice: str

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def offered(self) -> list[dict[str, Any]]:
        """The tools the prompt lists: all of them, or only the named one."""
        if self.choice in ("auto", "required"):
            return list(self.tools)
        return [t for t in self.tools if t["function"]["name"] == self.choice]

    @property
    def template_choice(self) -> Any:
        """``tool_choice`` as a template receives it (OpenAI's shape)."""
        return self.choice if self.choice in ("auto", "required") else {"type": "function", "function": {"name": self.choice}}

    def grammar(self) -> str | None:
        """GBNF that only lets a call through (``"required"``, named), else None."""
        return None if self.choice == "auto" else call_grammar(self.offered)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]] | None:
        """``(content, tool_calls)`` of an answer that calls tools, else None (the answer is content)."""
        return parse_calls(text, self.names)

    def holder(self) -> "CallHolder":
        return CallHolder(self)


def tool_use(tools: Any, tool_choice: Any, *, chat: bool = True) -> ToolUse | None:
    """Check a request's ``tools`` and ``tool_choice`` (RequestError naming the field) and return
    its :class:`ToolUse`, or None when the answer is plain text (no tools, or ``"none"``)."""
    if tools is None and tool_choice is None:
        return None
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise RequestError("tools must be a list of functions", param="tools")
    if tools and not chat:
        raise RequestError("tools take chat messages: use the chat completion", param="tools")
    checked = tuple(_tool(t, i) for i, t in enumerate(tools or ()))
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise RequestError(f"tools name the same function twice: {', '.join(names)}", param="tools")
    choice = _choice("auto" if tool_choice is None else tool_choice, names)
    if not checked:
        if choice in ("auto", "none"):
            return None
        raise RequestError(f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
    return None if choice == "none" else ToolUse(checked, choice)


def constrain(grammar: str | None, use: ToolUse | None) -> str | None:
    """The request's grammar with the tool grammar of ``use`` (one of them; RequestError if both)."""
    wanted = use.grammar() if use is not None else None
    if wanted is None or grammar == wanted:
        return grammar
    if grammar is not None:
        raise RequestError(
            "tool_choice 'required' or a named function constrains the answer with its own grammar: "
            "it cannot be combined with response_format, json_schema or grammar",
            param="tool_choice",
        )
    return wanted


def call_grammar(tools: Sequence[Mapping[str, Any]]) -> str:
    """GBNF of ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` for any of ``tools``: the
    converter's grammar of the JSON object, its ``root`` rule renamed, inside the tags."""
    calls = [call_schema(t["function"]) for t in tools]
    gbnf = schema_grammar(calls[0] if len(calls) == 1 else {"anyOf": calls}, param="tools")
    body, n = re.subn(r"^root ::=", "tool-call ::=", gbnf, count=1, flags=re.M)
    assert n == 1, "llama-cpp-python's converter wrote no root rule"
    return 'root ::= "<tool_call>\\n" tool-call "\\n</tool_call>"\n' + body


def call_schema(fn: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema of a call of ``fn``: ``{"name": <const>, "arguments": <parameters>}``."""
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _call(obj: Any, names: Sequence[str]) -> dict[str, Any] | None:
    """OpenAI's tool call of a parsed ``{"name", "arguments" | "parameters"}``, or None if it is not a valid one."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):  # arguments written as a JSON string
        try:
            args = json.loads(args, strict=False)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    fn = {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": fn}


def _json(text: str) -> Any:
    try:
        return json.loads(text, strict=False)  # strict=False: control characters in strings (a grammar allows them)
    except (ValueError, RecursionError):  # RecursionError: an answer of deeply nested brackets
        return None


def parse_calls(text: str, names: Sequence[str]) -> tuple[str | None, list[dict[str, Any]]] | None:
    """``(content, tool_calls)`` if ``text`` calls functions of ``names`` (see the module docstring), else None."""
    start = text.find(OPEN)
    if start >= 0:
        calls = [_call(_json(body.strip()), names) for body in _BLOCK.findall(text, start)]
        before = text[:start].rstrip()
        return None if None in calls else (before if before.strip() else None, calls)
    call = _call(_json(text.strip()), names) if text.strip().startswith("{") else None
    return None if call is None else (None, [call])


class CallHolder:
    """A stream's text, held back where it may still turn into a tool call.

    :meth:`feed` returns the text that can be shown now: text before a ``<tool_call>`` tag (less
    trailing whitespace and a partial tag); nothing once a tag is seen, or when the answer starts
    with ``{`` (it may be one JSON call). :meth:`finish` parses the whole text: the rest of the
    content and the calls (``[]``: a plain answer, all of it content)."""

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self.text = ""
        self.sent = 0
        self.holding = False  # from now on nothing more is released before the end

    def feed(self, text: str) -> str:
        self.text += text
        if self.holding or not self.text.strip():
            return ""
        if self.text.lstrip().startswith("{"):
            self.holding = True
            return ""
        tag = self.text.find(OPEN, max(0, self.sent - len(OPEN)))
        if tag >= 0:
            self.holding, limit = True, tag
        else:
            limit = len(self.text) - _partial_tag(self.text)
        limit = len(self.text[:limit].rstrip())
        out, self.sent = self.text[self.sent : limit], max(self.sent, limit)
        return out

    def finish(self, tail: str) -> tuple[str, list[dict[str, Any]]]:
        """The text still to show and the tool calls (with their stream ``index``), at the end of the answer."""
        self.text += tail
        parsed = self.use.parse(self.text)
        if parsed is None:
            return self.text[self.sent :], []
        content, calls = parsed
        return (content or "")[self.sent :], [{"index": i, **c} for i, c in enumerate(calls)]


def _partial_tag(text: str) -> int:
    """How many characters at the end of ``text`` begin ``<tool_call>`` (0 if none)."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


# --- rendering -----------------------------------------------------------------------------


def template_takes_tools(template: str) -> bool:
    """Whether a chat template renders tools itself (its source mentions ``tools``)."""
    return re.search(r"\btools\b", template) is not None


def render(formatter: Any, messages: Sequence[Mapping[str, Any]], use: ToolUse | None = None):
    """``formatter`` (llama-cpp-python's ``Jinja2ChatFormatter`` of a chat template) applied to ``messages``
    and the tools of ``use``: natively when the template takes tools, else in the fallback format."""
    if template_takes_tools(formatter.template):
        extra = {"tools": use.offered, "tool_choice": use.template_choice} if use is not None else {}
        return formatter(messages=[_native_message(m) for m in messages], **extra)
    msgs = fallback_messages(messages)
    return formatter(messages=with_tools_system(msgs, use.offered) if use is not None else msgs)


def _calls_of(m: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(name, arguments)`` of an assistant message's ``tool_calls`` (arguments parsed from their JSON string)."""
    out = []
    for c in m.get("tool_calls") or ():
        fn = c.get("function") if isinstance(c, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise RequestError(
                'messages[].tool_calls[] must be {"id", "type": "function", "function": {"name", "arguments"}}', param="messages"
            )
        args = fn.get("arguments")
        parsed = _json(args) if isinstance(args, str) else args
        out.append((fn["name"], args if parsed is None else parsed))
    return out


def _native_message(m: Mapping[str, Any]) -> dict[str, Any]:
    msg = dict(m)
    if m.get("tool_calls"):
        calls = _calls_of(m)
        msg["tool_calls"] = [dict(c, function=dict(c["function"], arguments=a)) for c, (_, a) in zip(m["tool_calls"], calls)]
    return msg


def fallback_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` for a template that knows no tools: assistant calls as ``<tool_call>`` text, tool
    results as ``<tool_response>`` blocks in one user turn (per run of consecutive tool messages)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("role") == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        elif m.get("tool_calls"):
            calls = [f"{OPEN}\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n{CLOSE}" for n, a in _calls_of(m)]
            out.append({"role": m.get("role", "assistant"), "content": "\n".join(filter(None, [m.get("content") or "", *calls]))})
        else:
            out.append(dict(m))
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]


def with_tools_system(messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with the fallback's tool list in the first system message (a new one if there is none)."""
    listing = FALLBACK_TOOLS_HEAD + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + FALLBACK_TOOLS_TAIL
    if messages and messages[0].get("role") == "system":
        first = messages[0].get("content") or ""
        return [dict(messages[0], content=f"{first}\n\n{listing}" if first else listing), *messages[1:]]
    return [{"role": "system", "content": listing}, *messages]


__all__ = [
    "CLOSE",
    "CallHolder",
    "FALLBACK_TOOLS_HEAD",
    "FALLBACK_TOOLS_TAIL",
    "OPEN",
    "ToolUse",
    "call_grammar",
    "call_schema",
    "constrain",
    "fallback_messages",
    "parse_calls",
    "render",
    "template_takes_tools",
    "tool_use",
    "with_tools_system",
]
