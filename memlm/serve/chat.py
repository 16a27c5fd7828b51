"""A chat request's prompt, with its tools: which layout the model writes calls in, how tools, past
calls and tool results enter the chat template, and the grammar its answer is held to (a ToolPlan).

A template that renders `tools` itself (Qwen's and other Hermes-style templates: they write
`<tool_call>` blocks) gets them as they are, with past calls' arguments as objects. Any other
template gets the generic rendering, documented in the README: a tools section appended to the
system prompt (one is added when the chat has none), past calls written into the assistant's turn in
the model's layout, and tool results as `<tool_response>` turns (role "tool" for ChatML templates,
which print any role; "user" for the rest). SmolLM2's template gets SmolLM2's list layout.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from memlm.errors import InvalidRequestError
from memlm.generation.tool_calls import FORMATS, Call, Tool, ToolFormat, parse_tools
from memlm.serve.protocol import ChatCompletionRequest


@dataclass
class ToolPlan:
    """How one request's answer may call tools, and how to read the calls back."""

    tools: list[Tool]
    choice: str  # "auto", "none", "required" or a function's name
    parallel: bool
    format: ToolFormat

    @property
    def calls_possible(self) -> bool:
        return self.choice != "none"

    def response_format(self) -> dict:
        return {"type": "grammar", "grammar": self.format.grammar(self.tools, self.choice, self.parallel)}

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        """(content, calls): content is the text before the first call, None when there is none."""
        if not self.calls_possible:
            return text, []
        content, calls = self.format.parse(text)
        if len(content) < len(text):  # a call block opened: what precedes it, without the gap
            content = content.rstrip() or None
        return content, calls


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def render_chat(engine, body: ChatCompletionRequest, encode=None) -> tuple[list[int], ToolPlan | None]:
    """The prompt's token ids and the request's ToolPlan (None without tools). `encode`: text -> ids
    (default: the tokenizer's)."""
    tokenizer = engine.tokenizer
    plan = _plan(body, tokenizer)
    messages = body.chat()
    native = tokenizer.template_renders_tools
    tools = [t.spec() for t in plan.tools] if plan is not None else None
    if native:
        messages = [_native(m) for m in messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    else:
        layout = plan.format if plan is not None else _format_of(tokenizer)
        messages = _generic(messages, plan.tools if plan is not None else None, layout, tokenizer.chat_template or "")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if not text.strip():
        raise InvalidRequestError("prompt is empty")
    return (encode or tokenizer.encode)(text), plan


def _format_of(tokenizer) -> ToolFormat:
    template = tokenizer.chat_template or ""
    if not tokenizer.template_renders_tools and "SmolLM" in template:
        return FORMATS["smollm2"]
    return FORMATS["hermes"]


def _plan(body: ChatCompletionRequest, tokenizer) -> ToolPlan | None:
    choice = body.tool_choice
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise InvalidRequestError('tool_choice must be "auto", "none", "required" or '
                                      '{"type": "function", "function": {"name": ...}}')
        choice = name
    elif choice is not None and choice not in ("auto", "none", "required"):
        raise InvalidRequestError(f'tool_choice must be "auto", "none", "required" or a function, not {choice!r}')
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequestError(f"tool_choice {choice!r} needs tools")
        return None
    tools = parse_tools(body.tools)
    choice = choice or "auto"
    if choice not in ("auto", "none", "required") and choice not in {t.name for t in tools}:
        raise InvalidRequestError(f"tool_choice names function {choice!r}, which is not among the tools")
    return ToolPlan(tools, choice, body.parallel_tool_calls, _format_of(tokenizer))


def _native(message: dict) -> dict:
    """A message for a template that renders tool calls itself: arguments as objects, as templates expect."""
    if "tool_calls" not in message:
        return message
    calls = []
    for call in message["tool_calls"]:
        function = call["function"]
        calls.append({"id": call.get("id"), "type": "function",
                      "function": {"name": function["name"], "arguments": _arguments(function["arguments"])}})
    return {**message, "tool_calls": calls}


def _generic(messages: list[dict], tools: list[Tool] | None, layout: ToolFormat, template: str) -> list[dict]:
    """Messages for a template that knows no tools: everything becomes plain turns."""
    out = []
    tool_role = "tool" if "<|im_start|>" in template else "user"  # ChatML prints any role
    names = {}  # tool_call_id -> function name, to label results
    for m in messages:
        if m.get("tool_calls"):
            pairs = [(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            names.update({c.get("id"): c["function"]["name"] for c in m["tool_calls"]})
            written = layout.render_calls(pairs)
            content = f"{m['content']}\n{written}" if m["content"] else written
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id"))
            label = json.dumps({"name": name}) + "\n" if name else ""
            out.append({"role": tool_role, "content": f"<tool_response>\n{label}{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        section = layout.system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def _arguments(text: str):
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        raise InvalidRequestError(f"tool_calls: arguments are not valid JSON: {text[:60]!r}") from None
