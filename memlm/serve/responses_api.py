"""OpenAI's Responses API (`/v1/responses`) as a thin adapter over chat completions: the request
becomes a ChatCompletionRequest (same engine, same sampling parameters, same tool machinery), the
chat answer becomes a Response object, and chat stream chunks become Responses stream events.

Supported: text input or input items (messages, function_call, function_call_output), instructions,
max_output_tokens, temperature, top_p, function tools and tool_choice, text.format (json_schema,
json_object), streaming, and previous_response_id: stored responses (their conversation) are kept
in memory, the oldest dropped past a bound, and GET /v1/responses/{id} returns one. Not supported:
built-in tools (web search, files), images, reasoning, background mode.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any

from pydantic import Field

from memlm.errors import InvalidRequestError
from memlm.serve.protocol import ChatCompletionRequest, _Body

STORE_LIMIT = 1024  # responses kept for previous_response_id; the oldest go first


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_schema" | "json_object", ...}}
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    metadata: dict[str, Any] | None = None
    user: str | None = None
    seed: int | None = None  # memlm: reproducible sampling, as in chat completions


class ResponseStore:
    """Finished responses and the conversation each ends, for previous_response_id (thread-safe, bounded)."""

    def __init__(self, limit: int = STORE_LIMIT):
        self.limit, self._items, self._lock = limit, OrderedDict(), threading.Lock()

    def put(self, response: dict, conversation: list[dict]) -> None:
        with self._lock:
            self._items[response["id"]] = (response, conversation)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        with self._lock:
            return self._items.get(response_id)


def conversation_of(body: ResponsesRequest, previous: list[dict] | None) -> list[dict]:
    """The chat messages (without instructions) this request continues: the previous response's
    conversation, then this input's items."""
    messages = list(previous or [])
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"input[{i}].role must be user, assistant, system or developer")
            messages.append({"role": role, "content": _text(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise InvalidRequestError(f"input[{i}].type {kind!r} is not supported (message, function_call, "
                                      "function_call_output)")
    return messages


def chat_request(body: ResponsesRequest, conversation: list[dict]) -> ChatCompletionRequest:
    messages = list(conversation)
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    tools = None
    if body.tools:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.get("type") != "function":
                raise InvalidRequestError(f"tools[{i}]: only function tools are supported")
            tools.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                           if k in tool}})
    tool_choice = body.tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        tool_choice = {"type": "function", "function": {"name": tool_choice.get("name")}}
    return ChatCompletionRequest(
        model=body.model, messages=messages, max_tokens=body.max_output_tokens, temperature=body.temperature,
        top_p=body.top_p, tools=tools, tool_choice=tool_choice, parallel_tool_calls=body.parallel_tool_calls,
        response_format=_response_format(body.text), seed=body.seed, stream=body.stream,
    )


def _response_format(text: dict | None) -> dict | None:
    spec = (text or {}).get("format")
    if not spec or spec.get("type") == "text":
        return None
    if spec.get("type") == "json_schema":  # the Responses API flattens chat's json_schema object
        return {"type": "json_schema", "json_schema": {"name": spec.get("name"), "schema": spec.get("schema")}}
    return {"type": spec.get("type")}


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequestError(f"{where}: parts of type {kind!r} are not supported (text only)")
            parts.append(part.get("text") or "")
        return "".join(parts)
    raise InvalidRequestError(f"{where} must be text or a list of input_text parts")


class ResponseBuilder:
    """One response's id and fields, its output items from a chat answer, and its stream events."""

    def __init__(self, body: ResponsesRequest, model: str):
        self.body, self.model = body, model
        self.id = "resp_" + secrets.token_hex(16)
        self.created = int(time.time())
        self.message_id = "msg_" + secrets.token_hex(12)
        self.sequence = 0
        # streaming state
        self.text, self.calls = "", {}  # calls: chat tool-call index -> item
        self.open_message = False
        self.output: list[dict] = []

    def envelope(self, status: str, output: list[dict], usage: dict | None = None,
                 finish: str | None = None) -> dict:
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "parallel_tool_calls": body.parallel_tool_calls,
            "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
            "previous_response_id": body.previous_response_id, "store": body.store,
            "text": body.text or {"format": {"type": "text"}}, "metadata": body.metadata or {},
            "usage": usage,
        }

    @staticmethod
    def usage(chat_usage: dict | None) -> dict | None:
        if chat_usage is None:
            return None
        return {"input_tokens": chat_usage["prompt_tokens"], "output_tokens": chat_usage["completion_tokens"],
                "total_tokens": chat_usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}}

    def message_item(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}

    @staticmethod
    def call_item(call: dict, status: str = "completed") -> dict:
        return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}

    def from_chat(self, chat: dict) -> dict:
        """The whole Response from a whole chat completion (n = 1)."""
        choice = chat["choices"][0]
        message = choice["message"]
        output = []
        if message.get("content"):
            output.append(self.message_item(message["content"]))
        output += [self.call_item(c) for c in message.get("tool_calls") or []]
        status = "incomplete" if choice["finish_reason"] == "length" else "completed"
        return self.envelope(status, output, self.usage(chat["usage"]), choice["finish_reason"])

    # ---- streaming ----------------------------------------------------------------------------------------

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def opening(self) -> list[str]:
        started = self.envelope("in_progress", [])
        return [self.event("response.created", response=started), self.event("response.in_progress",
                                                                               response=started)]

    def on_chunk(self, chunk: dict) -> list[str]:
        """Events for one chat stream chunk (n = 1)."""
        events = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if not self.open_message:
                    self.open_message = True
                    self.output.append(None)  # the message's place among the output items
                    self.message_index = len(self.output) - 1
                    events.append(self.event("response.output_item.added", output_index=self.message_index,
                                             item=self.message_item("", "in_progress")))
                    events.append(self.event("response.content_part.added", item_id=self.message_id,
                                             output_index=self.message_index, content_index=0,
                                             part={"type": "output_text", "text": "", "annotations": []}))
                self.text += delta["content"]
                events.append(self.event("response.output_text.delta", item_id=self.message_id,
                                         output_index=self.message_index, content_index=0, delta=delta["content"]))
            for piece in delta.get("tool_calls") or []:
                if piece.get("id"):
                    if self.open_message:
                        events += self._close_message()
                    item = self.call_item({"id": piece["id"], "function": {"name": piece["function"]["name"],
                                                                           "arguments": ""}}, "in_progress")
                    self.output.append(item)
                    self.calls[piece["index"]] = (len(self.output) - 1, item)
                    events.append(self.event("response.output_item.added", output_index=len(self.output) - 1,
                                             item=item))
                arguments = (piece.get("function") or {}).get("arguments")
                if arguments:
                    index, item = self.calls[piece["index"]]
                    item["arguments"] += arguments
                    events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                             output_index=index, delta=arguments))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        if chunk.get("usage") and chunk.get("choices") == []:
            self.final_usage = chunk["usage"]
        return events

    def _close_message(self) -> list[str]:
        self.open_message = False
        item = self.message_item(self.text)
        self.output[self.message_index] = item
        part = item["content"][0]
        return [self.event("response.output_text.done", item_id=self.message_id, output_index=self.message_index,
                           content_index=0, text=self.text),
                self.event("response.content_part.done", item_id=self.message_id, output_index=self.message_index,
                           content_index=0, part=part),
                self.event("response.output_item.done", output_index=self.message_index, item=item)]

    def closing(self) -> tuple[list[str], dict]:
        """The last events, and the finished Response (to store)."""
        events = self._close_message() if self.open_message else []
        for index, item in self.calls.values():
            item["status"] = "completed"
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                     output_index=index, arguments=item["arguments"]))
            events.append(self.event("response.output_item.done", output_index=index, item=item))
        finish = getattr(self, "finish", "stop")
        status = "incomplete" if finish == "length" else "completed"
        response = self.envelope(status, [o for o in self.output if o is not None],
                                 self.usage(getattr(self, "final_usage", None)), finish)
        events.append(self.event(f"response.{status}", response=response))
        return events, response

    def conversation_after(self, conversation: list[dict], response: dict) -> list[dict]:
        """The conversation a later request continues: this one's plus the answer."""
        text = "".join(part["text"] for item in response["output"] if item["type"] == "message"
                       for part in item["content"])
        calls = [{"id": item["call_id"], "type": "function",
                  "function": {"name": item["name"], "arguments": item["arguments"]}}
                 for item in response["output"] if item["type"] == "function_call"]
        answer = {"role": "assistant", "content": text or None}
        if calls:
            answer["tool_calls"] = calls
        elif not text:
            answer["content"] = ""
        return [*conversation, answer]
