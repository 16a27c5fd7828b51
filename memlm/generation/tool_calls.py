"""Tool calls: how a model writes them, the grammar that keeps them valid, and reading them back.

A call is written as JSON `{"name": NAME, "arguments": {...}}` inside `<tool_call>` tags, in one of
two layouts (a `ToolFormat`):

- "hermes": one call per block, `<tool_call>\n{...}\n</tool_call>`, blocks one per line (Qwen 2.5/3,
  Hermes, and the generic layout memlm uses for a chat template that knows no tools);
- "smollm2": every call in one JSON list, `<tool_call>[{...}, {...}]</tool_call>` (SmolLM2's).

Calls are *constrained*, not parsed and hoped: the request's grammar (llguidance's Lark dialect,
with each function's JSON schema embedded via `%json`) only lets the model write calls of the
declared functions whose arguments validate against their schemas. Under tool_choice "auto" the
model writes free text that may open a call block; from the `<tool_call>` tag on, it is
constrained. "none" forbids the tag; "required" and a named function start with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from memlm.errors import InvalidRequestError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
# What compact JSON looks like inside a call (the same choice as structured output: no padding).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema for the arguments object

    def spec(self) -> dict:
        """OpenAI's shape, as chat templates and the tools prompt show it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def parse_tools(tools: list) -> list[Tool]:
    """OpenAI's `tools` list -> Tools, or InvalidRequestError naming what is wrong."""
    out, seen = [], set()
    for i, entry in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(entry, dict) or entry.get("type", "function") != "function":
            raise InvalidRequestError(f"{where}: only tools of type 'function' are supported")
        function = entry.get("function")
        if not isinstance(function, dict):
            raise InvalidRequestError(f"{where}.function must be an object with a name")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(f"{where}.function.name must match [A-Za-z0-9_-]{{1,64}}, got {name!r}")
        if name in seen:
            raise InvalidRequestError(f"{where}: function {name!r} is declared twice")
        seen.add(name)
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise InvalidRequestError(f"{where}.function.parameters must be a JSON schema object")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise InvalidRequestError(f"{where}.function.description must be a string")
        out.append(Tool(name, description, parameters))
    if not out:
        raise InvalidRequestError("tools must not be empty")
    return out


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # the JSON text of the arguments object, as OpenAI sends it
    complete: bool = True  # False: the text ended inside it (cut by max_tokens, or still streaming)


class ToolFormat:
    """One layout of tool calls in text: its grammar, its parser and how past calls are rendered."""

    name = "hermes"
    list_layout = False  # smollm2: all calls in one JSON list inside one block

    # ---- writing ------------------------------------------------------------------------------------

    def render_calls(self, calls: list[tuple[str, str]]) -> str:
        """An assistant turn's past calls (name, arguments JSON) as the model would have written them."""
        objects = [f'{{"name": {json.dumps(name)}, "arguments": {_compact(arguments)}}}' for name, arguments in calls]
        if self.list_layout:
            return f"{OPEN}[{', '.join(objects)}]{CLOSE}"
        return "\n".join(f"{OPEN}\n{o}\n{CLOSE}" for o in objects)

    def system_prompt(self, tools: list[Tool]) -> str:
        """The tools section of the system prompt, for a chat template that does not render tools."""
        listing = "\n".join(json.dumps(t.spec(), ensure_ascii=False) for t in tools)
        if self.list_layout:
            how = (f'{OPEN}[{{"name": "function_name", "arguments": {{"argument": "value"}}}}, ...]{CLOSE}\n'
                   "with every call in the one list.")
        else:
            how = (f'{OPEN}\n{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n{CLOSE}\n'
                   "with one block per call.")
        return ("You can call functions (tools). They are described as JSON schemas in <tools></tools>:\n"
                f"<tools>\n{listing}\n</tools>\n"
                f"To call functions, write\n{how}\n"
                "A function's result comes back in a message from the tool; then answer the user.")

    # ---- the grammar ----------------------------------------------------------------------------------

    def grammar(self, tools: list[Tool], choice: str, parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) for the assistant's turn. `choice`: "auto", "none",
        "required", or the name of the one function to call."""
        if choice == "none":
            return f"start: TEXT\n{_TEXT}\n"
        chosen = tools if choice in ("auto", "required") else [t for t in tools if t.name == choice]
        lines = [f"call: {' | '.join(f'call_{i}' for i in range(len(chosen)))}"]
        for i, tool in enumerate(chosen):
            head = json.dumps(f'{{"name": {json.dumps(tool.name)}, "arguments": ')
            schema = dict(tool.parameters)
            schema["x-guidance"] = {**_JSON_STYLE, **schema.get("x-guidance", {})}
            lines += [f'call_{i}: {head} args_{i} "}}"', f"args_{i}: %json{json.dumps(schema)}"]
        if self.list_layout:
            more = ' (", " call)*' if parallel else ""
            lines.append(f'calls: "[" call{more} "]" {json.dumps(CLOSE)}')
            opened = "calls"
        else:
            more = f' ("\\n" {json.dumps(OPEN + chr(10))} call {json.dumps(chr(10) + CLOSE)})*' if parallel else ""
            lines.append(f'calls: "\\n" call {json.dumps(chr(10) + CLOSE)}{more}')
            opened = "calls"
        if choice == "auto":
            start = f"start: TEXT | INTRO {opened}\n{_TEXT}\n{_INTRO}"
        else:
            start = f"start: {json.dumps(OPEN)} {opened}"
        return start + "\n" + "\n".join(lines) + "\n"

    # ---- reading ----------------------------------------------------------------------------------------

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """text -> (the content before the first call block, the calls in it, complete or not).
        Lenient about whitespace, so it also reads calls a model wrote without a grammar."""
        start = text.find(OPEN)
        if start < 0:
            return text, []
        calls, pos, rest = [], 0, text[start + len(OPEN):]
        while True:
            head = _CALL_HEAD.search(rest, pos)
            if head is None:
                break
            try:
                name = json.loads(f'"{head.group(1)}"')
            except json.JSONDecodeError:
                break
            end = _object_end(rest, head.end())
            arguments = rest[head.end(): end if end is not None else len(rest)]
            calls.append(Call(name, arguments, complete=end is not None))
            if end is None:
                break
            pos = end
        return text[:start], calls

    @staticmethod
    def safe_content_length(text: str) -> int:
        """How much of text (with no call block yet) may be streamed as content: all but a tail that
        could be the start of the `<tool_call>` tag."""
        for keep in range(min(len(OPEN) - 1, len(text)), 0, -1):
            if OPEN.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


class SmolLM2Format(ToolFormat):
    name = "smollm2"
    list_layout = True


FORMATS = {f.name: f for f in (ToolFormat(), SmolLM2Format())}

# Free text: anything without the call tag. The intro: free text that ends at the first tag (the lexer
# sees TEXT die and INTRO complete on the same byte, so the two never compete).
_TEXT = r"TEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/"
_INTRO = r"INTRO: /(?s:.*)<tool_call>/ & ~/(?s:.*)<tool_call>(?s:.+)/"
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def _object_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at text[start] ends (exclusive), or None if the text ends first."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _compact(arguments: str) -> str:
    """Arguments JSON as compact text; a client's text that is not JSON is refused."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        raise InvalidRequestError(f"tool_calls: arguments are not valid JSON: {arguments[:60]!r}") from None
    return json.dumps(value, ensure_ascii=False)
