"""The base model as llama-cpp-python loads it, and its text side: tokens, pieces, chat template.

:func:`load_model` loads a GGUF with llama-cpp-python's ``_internals.LlamaModel`` (the owner class
of a ``llama_model *`` that ``llama_cpp.Llama`` itself uses), after checking that the installed
llama-cpp-python is the version whose private layout loramux was written against.
:class:`BaseText` tokenizes, turns tokens into text, formats chat messages with the model's own
template exactly as ``llama_cpp.Llama.create_chat_completion`` does, and turns a
:class:`~loramux.pool_requests.PoolRequest`'s prompt or messages into prompt tokens and stops.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from loramux.errors import LoramuxError, RequestError, RuntimeLoadError
from loramux.llama_runtime import capture_llama_log
from loramux.tools import ToolUse, render

# the llama-cpp-python whose private members (_internals, _logger) loramux reads (pinned in pyproject.toml)
LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def check_llama_cpp_python() -> None:
    """Raise RuntimeLoadError unless the installed llama-cpp-python is the pinned version."""
    try:
        found = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        found = None
    if found != LLAMA_CPP_PYTHON_VERSION:
        raise RuntimeLoadError(
            f"loramux reads llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s internals, but {found or 'no llama-cpp-python'} "
            f"is installed; install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (scripts/setup.sh does)"
        )


def load_model(path: Path, *, n_gpu_layers: int, use_mmap: bool, verbose: bool):
    """The base GGUF at ``path`` as a ``llama_cpp._internals.LlamaModel`` (RuntimeLoadError with llama.cpp's reason)."""
    import llama_cpp

    check_llama_cpp_python()
    from llama_cpp import _internals, _logger

    _logger.set_verbose(verbose)  # what llama_cpp.Llama(verbose=...) does: llama.cpp's log at ERROR unless verbose
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.use_mmap = use_mmap
    try:
        with capture_llama_log(echo=verbose) as log:
            return _internals.LlamaModel(path_model=str(path), params=params, verbose=verbose)
    except (ValueError, RuntimeError) as exc:
        raise RuntimeLoadError(f"llama.cpp could not load the base model {path}: {exc}; {log.reason()}") from exc


@dataclass(frozen=True)
class ChatTurn:
    """How chat messages end the prompt: the assistant's turn opened (``generation_prompt``, the
    default), or the last (assistant) message continued (``continue_final``: an assistant prefill)."""

    generation_prompt: bool = True
    continue_final: bool = False


NEW_TURN = ChatTurn()


def continued(fmt, last: Mapping[str, Any]):
    """``fmt`` cut right after the last message's text, so that the model continues it (vLLM's and
    llama-server's assistant prefill): whatever the template puts after it (end of turn) goes."""
    content = last.get("content") or ""
    at = fmt.prompt.rfind(content) if isinstance(content, str) and content else -1
    if at < 0:
        raise RequestError("continue_final_message: the last message has no text that the chat template keeps", param="messages")
    return replace(fmt, prompt=fmt.prompt[: at + len(content)])


class BaseText:
    """Tokens and text of the base model ``model`` (a ``LlamaModel``) named ``name`` in messages."""

    def __init__(self, model, name: str) -> None:
        self.model = model
        self.name = name
        self._template: str | None = None  # a chat template used instead of the model's (use_template)

    def use_template(self, template: str) -> None:
        """Format chat messages with the Jinja ``template`` instead of the model's own."""
        self._template = template
        for cached in ("_chat_formatter", "_chat_formatter_no_prompt"):
            self.__dict__.pop(cached, None)

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        """Tokens of ``text`` with the base model's tokenizer."""
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.model.detokenize(list(tokens), special=True).decode("utf-8", errors="replace")

    def piece(self, token: int) -> str:
        """The text of one token (invalid UTF-8, part of a character, as U+FFFD)."""
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (llama-cpp-python's ``token_to_piece`` returns its whole buffer, NUL padding included)."""
        import llama_cpp

        buf = ctypes.create_string_buffer(64)
        vocab = llama_cpp.llama_model_get_vocab(self.model.model)
        n = llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, True)
        if n < 0:  # the buffer is too small: -n bytes are needed
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, True)
        if n < 0:
            raise LoramuxError(f"llama.cpp could not turn token {token} into text")
        return buf.raw[:n]

    @property
    def n_vocab(self) -> int:
        return int(self.model.n_vocab())

    @property
    def chat_template(self) -> str:
        """The chat template in use: the base model's (Jinja; empty when it has none), or the one given to use_template."""
        return self._template if self._template is not None else self.model.metadata().get("tokenizer.chat_template", "")

    @property
    def n_layer(self) -> int:
        """The base model's number of layers."""
        import llama_cpp

        return int(llama_cpp.llama_model_n_layer(self.model.model))

    def chat_format(self, messages: Sequence[Mapping[str, Any]], tool_use: ToolUse | None = None, turn: ChatTurn = NEW_TURN):
        """llama-cpp-python's formatting of ``messages`` with the base model's chat template
        (``.prompt``, ``.stop``, ``.added_special``), as its chat completion uses it; with the tools of
        ``tool_use``, and tool messages, natively or in the fallback format (:func:`loramux.tools.render`).
        ``turn``: whether the assistant's turn is opened (the generation prompt) or its last message continued."""
        try:
            formatter = self._chat_formatter if turn.generation_prompt and not turn.continue_final else self._chat_formatter_no_prompt
            fmt = render(formatter, [dict(m) for m in messages], tool_use)
            return continued(fmt, messages[-1]) if turn.continue_final else fmt
        except RequestError:
            raise
        except Exception as exc:  # jinja2 errors: a message without content, a role the template refuses
            raise RequestError(f"the chat template of {self.name} cannot format these messages: {exc}", param="messages") from exc

    @functools.cached_property
    def _chat_formatter(self):
        return self._formatter(add_generation_prompt=True)

    @functools.cached_property
    def _chat_formatter_no_prompt(self):
        return self._formatter(add_generation_prompt=False)

    def _formatter(self, *, add_generation_prompt: bool):
        from llama_cpp import llama_chat_format

        template = self.chat_template
        if not template:
            raise LoramuxError(f"base model {self.name} has no chat template (tokenizer.chat_template)")
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=self.detokenize([self.model.token_eos()]),
            bos_token=self.detokenize([self.model.token_bos()]),
            add_generation_prompt=add_generation_prompt,
        )

    def prompt_of(
        self,
        prompt: str | Sequence[int] | None,
        messages: Sequence[Mapping[str, Any]] | None,
        tool_use: ToolUse | None = None,
        turn: ChatTurn = NEW_TURN,
    ) -> tuple[list[int], tuple[str, ...]]:
        """Prompt tokens and extra stop strings of a request, tokenized as llama-cpp-python does:
        chat ``messages`` (and tools) through the template (its stop strings added), text with BOS, ids as given."""
        if messages is not None:
            fmt = self.chat_format(messages, tool_use, turn)
            extra = fmt.stop if isinstance(fmt.stop, list) else [fmt.stop] if fmt.stop else []
            return self.tokenize(fmt.prompt, add_bos=not fmt.added_special), tuple(s for s in extra if s)
        if isinstance(prompt, str):
            return (self.tokenize(prompt, add_bos=True) if prompt else [self.model.token_bos()]), ()
        return [int(t) for t in prompt or ()], ()


class TextSide:
    """The pool's text methods (a mixin of :class:`~loramux.AdapterPool`): its :class:`BaseText` ``self.text``."""

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        """Tokens of ``text`` with the base model's tokenizer."""
        self._check_open()
        return self.text.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.text.detokenize(tokens)

    def piece(self, token: int) -> str:
        """The text of one token."""
        return self.text.piece(token)

    def token_eos(self) -> int:
        return self.text.model.token_eos()

    n_layer = property(lambda self: self.text.n_layer, doc="The base model's number of layers.")

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text the base model's chat template makes of ``messages`` (with the generation prompt)."""
        return self.text.chat_format(messages).prompt

    def chat_format(self, messages: Sequence[Mapping[str, Any]]):
        """llama-cpp-python's formatting of ``messages`` (``.prompt``, ``.stop``, ``.added_special``)."""
        return self.text.chat_format(messages)


__all__ = ["LLAMA_CPP_PYTHON_VERSION", "NEW_TURN", "BaseText", "ChatTurn", "TextSide", "check_llama_cpp_python", "load_model"]
