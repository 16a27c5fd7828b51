"""Anthropic's Messages API (`/v1/messages`, and `/v1/messages/count_tokens`) as a thin adapter over
chat completions, for clients and coding agents that speak it: the request becomes a
ChatCompletionRequest (same engine, sampling and tool machinery: `tool_use` blocks are constrained
tool calls, `tool_result` blocks are tool turns), the answer becomes a Message, and chat stream
chunks become Anthropic's stream events. Errors on these paths come in Anthropic's shape.

Supported: system (text or text blocks), messages with text, tool_use and tool_result blocks,
max_tokens, stop_sequences, temperature, top_p, top_k, tools and tool_choice (auto, any, tool, none,
disable_parallel_tool_use), streaming. Not supported: images, documents, thinking, cache_control
(accepted and ignored: every prompt is computed).
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from pydantic import Field

from memlm.errors import InvalidRequestError
from memlm.serve.protocol import ChatCompletionRequest, _Body

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


class MessagesRequest(_Body):
    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


class CountTokensRequest(_Body):
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


def chat_request(body: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    messages = []
    if body.system:
        messages.append({"role": "system", "content": _blocks_text(body.system, "system")})
    for i, message in enumerate(body.messages):
        messages += _turn(message, f"messages[{i}]")
    tools, choice, parallel = None, None, True
    if body.tools:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.get("type", "custom") != "custom" or "name" not in tool:
                raise InvalidRequestError(f"tools[{i}]: only client tools (name, description, input_schema)")
            tools.append({"type": "function", "function": {"name": tool["name"],
                                                           "description": tool.get("description", ""),
                                                           "parameters": tool.get("input_schema")}})
    if isinstance(body, MessagesRequest) and body.tool_choice:
        kind = body.tool_choice.get("type")
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
        if kind == "tool":
            choice = {"type": "function", "function": {"name": body.tool_choice.get("name")}}
        elif choice is None:
            raise InvalidRequestError(f"tool_choice.type must be auto, any, tool or none, not {kind!r}")
        parallel = not body.tool_choice.get("disable_parallel_tool_use", False)
    if isinstance(body, CountTokensRequest):
        return ChatCompletionRequest(messages=messages, tools=tools)
    return ChatCompletionRequest(
        model=body.model, messages=messages, max_tokens=body.max_tokens, temperature=body.temperature,
        top_p=body.top_p, top_k=body.top_k, stop=body.stop_sequences or None, tools=tools, tool_choice=choice,
        parallel_tool_calls=parallel, stream=body.stream,
    )


def _turn(message: dict, where: str) -> list[dict]:
    """One Anthropic message -> chat messages (a user turn's tool results become tool turns first)."""
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise InvalidRequestError(f"{where}.role must be user or assistant")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where}.content must be text or a list of content blocks")
    texts, calls, results = [], [], []
    for k, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input", {}))}})
        elif kind == "tool_result" and role == "user":
            output = block.get("content", "")
            text = output if isinstance(output, str) else _blocks_text(output, f"{where}.content[{k}].content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
        else:
            raise InvalidRequestError(f"{where}.content[{k}]: blocks of type {kind!r} are not supported here")
    text = "".join(texts)
    if role == "assistant":
        turn = {"role": "assistant", "content": text or None}
        if calls:
            turn["tool_calls"] = calls
        elif not text:
            turn["content"] = ""
        return [turn]
    return results + ([{"role": "user", "content": text}] if texts or not results else [])


def _blocks_text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    parts = []
    for block in value:
        if not isinstance(block, dict) or block.get("type") != "text":
            raise InvalidRequestError(f"{where}: only text blocks are supported")
        parts.append(block.get("text") or "")
    return "".join(parts)


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


def _stop(finish: str | None, stop_reason, stop_sequences: list[str] | None) -> tuple[StopReason, str | None]:
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str) and stop_reason in (stop_sequences or []):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


class MessageBuilder:
    """One Message: from a whole chat answer, or as stream events from chat chunks (n = 1)."""

    def __init__(self, body: MessagesRequest, model: str):
        self.body, self.model = body, model
        self.id = "msg_" + secrets.token_hex(12)
        self.blocks: list[dict] = []  # streaming: the blocks opened so far
        self.open: int | None = None  # the block being written (one at a time, as Anthropic streams)
        self.calls: dict[int, int] = {}  # chat tool-call index -> block index
        self.finish, self.stop_reason, self.output_tokens, self.input_tokens = None, None, 0, 0

    def from_chat(self, chat: dict) -> dict:
        choice = chat["choices"][0]
        message = choice["message"]
        content = []
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls") or []:
            content.append({"type": "tool_use", "id": _tool_use_id(call["id"]), "name": call["function"]["name"],
                            "input": json.loads(call["function"]["arguments"] or "{}")})
        reason, sequence = _stop(choice["finish_reason"], choice.get("stop_reason"), self.body.stop_sequences)
        usage = chat["usage"]
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": reason, "stop_sequence": sequence,
                "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}}

    # ---- streaming ------------------------------------------------------------------------------------

    @staticmethod
    def event(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"

    def opening(self, input_tokens: int) -> list[str]:
        self.input_tokens = input_tokens
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": input_tokens, "output_tokens": 0}}
        return [self.event("message_start", message=message), self.event("ping")]

    def on_chunk(self, chunk: dict) -> list[str]:
        events = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.open is None or self.blocks[self.open]["type"] != "text":
                    events += self._close_open_block()
                    self.blocks.append({"type": "text", "text": ""})
                    self.open = len(self.blocks) - 1
                    events.append(self.event("content_block_start", index=len(self.blocks) - 1,
                                             content_block={"type": "text", "text": ""}))
                events.append(self.event("content_block_delta", index=len(self.blocks) - 1,
                                         delta={"type": "text_delta", "text": delta["content"]}))
            for piece in delta.get("tool_calls") or []:
                if piece.get("id"):
                    events += self._close_open_block()
                    block = {"type": "tool_use", "id": _tool_use_id(piece["id"]), "name": piece["function"]["name"],
                             "input": {}}
                    self.blocks.append(block)
                    self.calls[piece["index"]] = self.open = len(self.blocks) - 1
                    events.append(self.event("content_block_start", index=len(self.blocks) - 1, content_block=block))
                arguments = (piece.get("function") or {}).get("arguments")
                if arguments:
                    events.append(self.event("content_block_delta", index=self.calls[piece["index"]],
                                             delta={"type": "input_json_delta", "partial_json": arguments}))
            if choice.get("finish_reason"):
                self.finish, self.stop_reason = choice["finish_reason"], choice.get("stop_reason")
        if chunk.get("usage") and chunk.get("choices") == []:
            self.output_tokens = chunk["usage"]["completion_tokens"]
        return events

    def _close_open_block(self) -> list[str]:
        if self.open is None:
            return []
        index, self.open = self.open, None
        return [self.event("content_block_stop", index=index)]

    def closing(self) -> list[str]:
        events = self._close_open_block()
        reason, sequence = _stop(self.finish, self.stop_reason, self.body.stop_sequences)
        events.append(self.event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                                 usage={"output_tokens": self.output_tokens}))
        events.append(self.event("message_stop"))
        return events
