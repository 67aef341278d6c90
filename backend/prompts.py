"""Every request's prompt measured and checked before the model is touched, off its lock.

A request that llama.cpp cannot serve must never reach it: a grammar it cannot parse makes
llama-cpp-python hand a NULL sampler to llama.cpp and the process dies; a prompt longer than the
context, a token id outside the vocabulary, an empty prompt or a template that fails on the
messages end in an exception half-way through a stream. So each model's vocabulary (its
tokenizer, chat template and grammar parser, but no weights: `vocab_only`, ~0.1 s and a few MB)
is loaded once, and every chat, text or embedding request is rendered and tokenized with it
exactly as a completion would be, in a worker thread, while the model keeps generating for
someone else. What comes out is the prompt's length in tokens (what llama-gate's proxy charges
before a request takes its turn, and what `count_tokens` answers) or a `PromptError` naming the
field, which the backend answers with a 400.

A chat is rendered by the model's own chat handler, given a stand-in for `Llama` whose
`create_completion` stops it with the prompt's tokens and the grammar it would sample with: the
count is the completion's to the token, and a `response_format` schema's grammar is checked by
the parser llama.cpp itself would use.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import llama_cpp
from llama_cpp import Llama, llama_chat_format

from backend import tools

# A prompt of more bytes than this many tokens could hold is refused before it is tokenized:
# tokenizing costs time too (~0.5 s for a few MB), and no token is longer than its vocabulary's
# longest (`Limits.max_token_bytes`).
_PIECE = 256


class PromptError(ValueError):
    """The request cannot be served as sent; `param` names the field, `code` is OpenAI's."""

    def __init__(
        self,
        message: str,
        param: str | None,
        code: str = "invalid_request",
        **details: int,
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        self.details = details  # numbers the proxy words its own message with


@dataclass(frozen=True)
class Limits:
    """What the proxy may know of a model without asking: sizes that bound its prompts."""

    n_ctx: int
    n_vocab: int
    max_token_bytes: int  # the longest token's text: a prompt of n bytes has >= n / this tokens
    overhead: int  # tokens a chat template adds to a conversation beyond its text, at most

    def as_json(self) -> dict[str, int]:
        return {
            "n_ctx": self.n_ctx,
            "n_vocab": self.n_vocab,
            "max_token_bytes": self.max_token_bytes,
            "overhead": self.overhead,
        }


class _Rendered(Exception):
    """Not an error: how the stand-in stops a chat handler, with what it rendered."""

    def __init__(self, tokens: list[int], grammar: Any) -> None:
        super().__init__(len(tokens))
        self.tokens = tokens
        self.grammar = grammar


class _StandIn:
    """What a chat handler sees as `llama`: the vocabulary's, up to `create_completion`."""

    def __init__(self, llama: Llama) -> None:
        self._llama = llama
        self.verbose = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._llama.tokenize(text, add_bos=add_bos, special=special)

    def create_completion(self, prompt: Any, grammar: Any = None, **_: Any) -> Any:
        tokens = (
            prompt
            if isinstance(prompt, list)
            else self._llama.tokenize(str(prompt).encode("utf-8"), special=True)
        )
        raise _Rendered(list(tokens), grammar)


class Vocabulary:
    """One model's tokenizer, chat template and grammar parser (no weights)."""

    def __init__(self, path: str, n_ctx: int, chat_format: str | None) -> None:
        self._llama = Llama(
            model_path=path, vocab_only=True, n_ctx=8, chat_format=chat_format, verbose=False
        )
        self._n_ctx = n_ctx
        self._vocab = llama_cpp.llama_model_get_vocab(self._llama.model)
        self._lock = threading.Lock()  # llama.cpp's grammar parser logs through shared state
        self.limits = Limits(n_ctx, self._llama.n_vocab(), self._longest_token(), 0)
        self.limits = replace(self.limits, overhead=self._template_overhead())

    # -- what the handlers of each kind of request ask -----------------------------------------

    def chat(self, body: Mapping[str, Any], grammar: str | None = None) -> int:
        """The prompt tokens of a chat request (tools already written into its messages, their
        grammar in `grammar`); `PromptError` when it cannot be served."""
        messages = body.get("messages")
        self._bound(_text_bytes(messages), "messages")
        self._check_bias(body.get("logit_bias"))
        if grammar is not None:
            self.check_grammar(grammar, "tools")
        if isinstance(body.get("grammar"), str):
            self.check_grammar(body["grammar"], "grammar")
        kwargs = {k: v for k, v in body.items() if k in _RENDER_FIELDS}
        # The handler Llama.create_chat_completion would choose.
        chat_format = self._llama.chat_format or ""
        handler = (
            self._llama.chat_handler
            or self._llama._chat_handlers.get(chat_format)
            or llama_chat_format.get_chat_completion_handler(chat_format)
        )
        stand_in = cast(Llama, _StandIn(self._llama))
        try:
            handler(llama=stand_in, **kwargs)
        except _Rendered as rendered:
            made = getattr(rendered.grammar, "_grammar", None)
            if isinstance(made, str):
                self.check_grammar(made, "response_format")
            return self._fits(len(rendered.tokens), "messages")
        except PromptError:
            raise
        except UnicodeEncodeError:
            raise PromptError(
                "the messages hold a lone surrogate, which is not text", "messages", "invalid_text"
            ) from None
        except Exception as exc:  # the template failed on these messages
            raise PromptError(
                f"the model's chat template cannot render these messages ({_short(exc)})",
                "messages",
                "template_error",
            ) from None
        raise PromptError("the chat template produced no prompt", "messages", "template_error")

    def text(self, body: Mapping[str, Any]) -> int:
        """The prompt tokens of a text completion: one prompt, as text (llama_cpp.server takes
        no token ids: it answers them with a 500)."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]  # a batch of one
        self._check_bias(body.get("logit_bias"))
        if isinstance(body.get("grammar"), str):
            self.check_grammar(body["grammar"], "grammar")
        if not isinstance(prompt, str):
            raise PromptError(
                "'prompt' must be one text (token ids are not served)", "prompt", "invalid_prompt"
            )
        self._bound(len(prompt.encode("utf-8", "surrogatepass")), "prompt")
        tokens = self._tokens(prompt, "prompt", bos=False)
        if tokens and self._llama._model.add_bos_token():
            tokens = [self._llama.token_bos(), *tokens]
        if not tokens:
            raise PromptError("'prompt' is empty: send some text", "prompt", "empty_prompt")
        return self._fits(len(tokens), "prompt")

    def embeddings(self, inputs: Sequence[Any]) -> list[int]:
        """The tokens of each input of an embeddings request."""
        counts = []
        for index, item in enumerate(inputs):
            param = f"input.{index}" if len(inputs) > 1 else "input"
            if not isinstance(item, str):
                raise PromptError(
                    "each input must be a text (token ids are not served)", param, "invalid_prompt"
                )
            self._bound(len(item.encode("utf-8", "surrogatepass")), param)
            count = len(self._tokens(item, param, bos=True))
            if count == 0:
                raise PromptError("an input is empty", param, "empty_prompt")
            counts.append(self._fits(count, param))
        return counts

    def _tokens(self, text: str, param: str, bos: bool) -> list[int]:
        try:
            encoded = text.encode("utf-8")
        except UnicodeEncodeError:
            raise PromptError(
                "the text holds a lone surrogate, which is not text", param, "invalid_text"
            ) from None
        return self._llama.tokenize(encoded, add_bos=bos, special=True)

    # -- checks ----------------------------------------------------------------------------------

    def check_grammar(self, gbnf: str, param: str) -> None:
        """`PromptError` unless llama.cpp's parser takes `gbnf` (a NULL sampler kills the
        process once llama-cpp-python adds it to its chain)."""
        try:
            encoded = gbnf.encode("utf-8")
        except UnicodeEncodeError:
            raise PromptError("the grammar is not text", param, "invalid_text") from None
        with self._lock:
            sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, encoded, b"root")
            if not sampler:
                raise PromptError(
                    "the grammar cannot be parsed (llama.cpp refused it)", param, "invalid_grammar"
                )
            llama_cpp.llama_sampler_free(sampler)

    def _check_bias(self, bias: Any) -> None:
        if not isinstance(bias, Mapping):
            return
        n_vocab = self.limits.n_vocab
        for key in bias:
            try:
                token = int(key)
            except (TypeError, ValueError):
                token = -1
            if not 0 <= token < n_vocab:
                raise PromptError(
                    f"logit_bias keys must be token ids from 0 to {n_vocab - 1}",
                    "logit_bias",
                    "invalid_logit_bias",
                )

    def _bound(self, size: int, param: str) -> None:
        """Refuse, untokenized, a text too long to fit the context however it is tokenized."""
        least = size // self.limits.max_token_bytes
        if least >= self._n_ctx:
            raise _too_long(least, self._n_ctx, param, at_least=True)

    def _fits(self, tokens: int, param: str) -> int:
        if tokens >= self._n_ctx:  # llama_cpp needs room for one token of answer at least
            raise _too_long(tokens, self._n_ctx, param)
        return tokens

    # -- the model's sizes, found once ------------------------------------------------------------

    def _longest_token(self) -> int:
        buffer = ctypes.create_string_buffer(_PIECE)
        longest = 1
        for token in range(self._llama.n_vocab()):
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, _PIECE, 0, True)
            longest = max(longest, size)
        return longest

    def _template_overhead(self) -> int:
        """Tokens a conversation's prompt has beyond the bytes of its JSON body, at most: what
        the template adds around the messages (its default system prompt too) and what
        `backend.tools` tells the model about tools. Each message's JSON (`{"role": ...,
        "content": ...}`, 28 bytes or more) outweighs the few tokens a template puts around
        it, so only the fixed part counts."""
        fixed = 0
        for messages in (
            [{"role": "user", "content": ""}],
            [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
        ):
            try:
                fixed = max(fixed, self.chat({"messages": messages}))
            except PromptError:
                continue
        instructions = tools.system_prompt([])
        told = len(self._llama.tokenize(instructions.encode(), add_bos=False, special=True))
        return fixed + told + 16


def _too_long(tokens: int, n_ctx: int, param: str, at_least: bool = False) -> PromptError:
    more = "at least " if at_least else ""
    return PromptError(
        f"the prompt is {more}{tokens} tokens, and the model's context holds {n_ctx}",
        param,
        "context_length_exceeded",
        prompt_tokens=tokens,
        n_ctx=n_ctx,
    )


# What a chat handler renders a prompt (and its grammar) from; the rest only matters to sampling.
_RENDER_FIELDS = frozenset(
    {"messages", "functions", "function_call", "tools", "tool_choice", "response_format"}
)


def _text_bytes(value: Any) -> int:
    """The UTF-8 bytes of every string in a JSON value (at least what a prompt of it holds)."""
    total, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return total


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
