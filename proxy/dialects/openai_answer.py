"""One non-streamed OpenAI answer, assembled from the chunks of the stream the backend sent.

What an unstreamed chat or text completion would have answered: the text of each choice joined,
tool calls merged by index (ids, names, and their arguments pieced together), logprobs joined,
the finish reason and the usage of the stream's end.
"""

from __future__ import annotations

from typing import Any

from proxy.dialects.reasoning import Reasoning, split_text


class Answer:
    """One non-streamed answer, assembled from the chunks of its stream."""

    def __init__(self, kind: str) -> None:
        self._chat = kind == "chat"
        self._top: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.usage: Any = None
        self.stop_sequence: str | None = None  # the one that ended it, when the backend says

    def add(self, chunk: dict[str, Any]) -> None:
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in chunk and key not in self._top:
                self._top[key] = chunk[key]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                self._add_choice(choice)

    def _add_choice(self, piece: dict[str, Any]) -> None:
        index = piece.get("index", 0) if isinstance(piece.get("index"), int) else 0
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = self._new_choice(index)
        if piece.get("finish_reason") is not None:
            choice["finish_reason"] = piece["finish_reason"]
        if self._chat:
            _merge_delta(choice["message"], piece.get("delta"))
            _merge_chat_logprobs(choice, piece.get("logprobs"))
        else:
            if isinstance(piece.get("text"), str):
                choice["text"] += piece["text"]
            _merge_text_logprobs(choice, piece.get("logprobs"))

    def _new_choice(self, index: int) -> dict[str, Any]:
        if self._chat:
            message = {"role": "assistant", "content": None}
            return {"index": index, "message": message, "logprobs": None, "finish_reason": None}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": None}

    def document(self, reasoning: Reasoning = Reasoning.KEEP) -> dict[str, Any]:
        choices = [self._choices[i] for i in sorted(self._choices)]
        for choice in choices:
            message = choice.get("message")
            if message is None:
                continue
            if reasoning is not Reasoning.KEEP and isinstance(message["content"], str):
                thoughts, message["content"] = split_text(message["content"])
                if thoughts and reasoning is Reasoning.SPLIT:
                    message["reasoning_content"] = message.get("reasoning_content", "") + thoughts
            if message["content"] is None and "tool_calls" not in message:
                message["content"] = ""
        document = {
            "id": self._top.get("id", ""),
            "object": "chat.completion" if self._chat else "text_completion",
            "created": self._top.get("created", 0),
            "model": self._top.get("model", ""),
            "choices": choices,
        }
        if "system_fingerprint" in self._top:
            document["system_fingerprint"] = self._top["system_fingerprint"]
        if self.usage is not None:
            document["usage"] = self.usage
        return document


def _merge_delta(message: dict[str, Any], delta: Any) -> None:
    if not isinstance(delta, dict):
        return
    if isinstance(delta.get("role"), str):
        message["role"] = delta["role"]
    for key in ("content", "reasoning_content"):
        if isinstance(delta.get(key), str):
            message[key] = (message.get(key) or "") + delta[key]
    if isinstance(delta.get("function_call"), dict):
        _merge_call(message.setdefault("function_call", {}), delta["function_call"])
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        calls: list[dict[str, Any]] = message.setdefault("tool_calls", [])
        index = call.get("index", len(calls)) if isinstance(call.get("index"), int) else len(calls)
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        target = calls[index]
        for key in ("id", "type"):
            if isinstance(call.get(key), str) and call[key]:
                target[key] = call[key]
        if isinstance(call.get("function"), dict):
            _merge_call(target["function"], call["function"])


def _merge_call(target: dict[str, Any], piece: dict[str, Any]) -> None:
    if isinstance(piece.get("name"), str) and piece["name"]:
        target["name"] = piece["name"]
    if isinstance(piece.get("arguments"), str):
        target["arguments"] = target.get("arguments", "") + piece["arguments"]


def _merge_chat_logprobs(choice: dict[str, Any], logprobs: Any) -> None:
    if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
        if choice["logprobs"] is None:
            choice["logprobs"] = {"content": []}
        choice["logprobs"]["content"].extend(logprobs["content"])


def _merge_text_logprobs(choice: dict[str, Any], logprobs: Any) -> None:
    if not isinstance(logprobs, dict):
        return
    keys = ("text_offset", "token_logprobs", "tokens", "top_logprobs")
    merged: dict[str, list[Any]] = choice["logprobs"] or {key: [] for key in keys}
    choice["logprobs"] = merged
    for key in keys:
        if isinstance(logprobs.get(key), list):
            merged[key].extend(logprobs[key])
