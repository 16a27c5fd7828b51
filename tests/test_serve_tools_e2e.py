"""The agent loop with the `openai` client against the embedded SmolLM2: the model calls a tool, the
client runs it and sends the result back as a `role: tool` message, the model answers in text."""

from __future__ import annotations

import json

import jsonschema
import pytest

from memlm.serve.launch import ServerProcess

pytestmark = pytest.mark.embedded

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client():
    from openai import OpenAI

    with ServerProcess("--threads", "1") as server:
        yield OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_tool_round_trip(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, tools=[WEATHER], temperature=0, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert call.function.name == "get_weather" and "paris" in arguments["city"].lower()

    messages.append(choice.message)  # the client's own message object, sent back as it is
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees C"})
    final = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, tools=[WEATHER],
                                           tool_choice="none", temperature=0, max_tokens=30)
    answer = final.choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
    assert answer.message.content and "<tool_call>" not in answer.message.content
