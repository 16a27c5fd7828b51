"""What agents and apps do, against the embedded SmolLM2 over loopback: the tool loop with the
`openai` client (the model calls a tool, the client sends the result back as a `role: tool` message,
the model answers), the Responses and Messages APIs (greedy answers equal chat completions), and
embeddings (similar texts closer than unrelated ones)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import numpy as np
import pytest

from memlm.serve.launch import ServerProcess

pytestmark = pytest.mark.embedded

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--threads", "1") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


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


def test_responses_and_messages_equal_chat(server, client):
    question = [{"role": "user", "content": "Name a fruit."}]
    chat = client.chat.completions.create(model="smollm2-135m-instruct", messages=question, temperature=0,
                                          max_tokens=12).choices[0].message.content
    response = client.responses.create(model="smollm2-135m-instruct", input="Name a fruit.", temperature=0,
                                       max_output_tokens=12)
    assert response.output_text == chat
    message = httpx.post(server.url + "/v1/messages", timeout=300, json={
        "model": "smollm2-135m-instruct", "max_tokens": 12, "temperature": 0, "messages": question}).json()
    assert message["content"][0]["text"] == chat


def test_embeddings_place_similar_texts_closer(client):
    texts = ["The cat sleeps on the sofa.", "A kitten is napping on the couch.",
             "Quarterly revenue grew by four percent."]
    vectors = np.array([d.embedding for d in client.embeddings.create(model="smollm2-135m-instruct",
                                                                        input=texts).data])
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated
    again = client.embeddings.create(model="smollm2-135m-instruct", input=texts[0]).data[0].embedding
    assert np.allclose(again, vectors[0], atol=1e-5)  # alone or batched: the same vector
