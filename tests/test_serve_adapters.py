"""/v1/responses (OpenAI's Responses API, through the `openai` client) and /v1/messages (Anthropic's,
raw HTTP) over loopback on a tiny random model: each must give what the same chat completion gives,
whole and streamed, with tools mapped onto the same constrained calls."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from conftest import byte_tokenizer, tiny_memlm
from memlm.serve.launch import ServerProcess

KEY = "adapter-key"
ADD = {"name": "add", "description": "Add two integers",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                       "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                      "required": ["a", "b"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from memlm.formats.loading import save_model

    model = tiny_memlm(vocab_size=257, eos_token_ids=(256,), max_position_embeddings=4096)
    folder = save_model(tmp_path_factory.mktemp("tiny") / "tiny", model, byte_tokenizer())
    with ServerProcess("--threads", "1", "--model", str(folder), api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client, messages, **kwargs):
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kwargs).choices[0]


def _sse(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, payload) pairs of a named-event SSE stream."""
    out = []
    for block in response.read().decode().split("\n\n"):
        if block.strip():
            head, data = block.split("\n", 1)
            assert head.startswith("event: ") and data.startswith("data: ")
            out.append((head[7:], json.loads(data[6:])))
    return out


# ---- Responses ----------------------------------------------------------------------------------------------


def test_responses_equal_chat_and_chain_by_previous_id(client):
    first = client.responses.create(model="tiny", input="hello", instructions="Be brief.", max_output_tokens=9,
                                    temperature=0)
    chat = _chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
                 max_tokens=9)
    assert first.output_text == chat.message.content and first.id.startswith("resp_")
    assert first.status == ("incomplete" if chat.finish_reason == "length" else "completed")
    assert first.usage.output_tokens == 9 or chat.finish_reason == "stop"

    second = client.responses.create(model="tiny", input="and again", previous_response_id=first.id,
                                     max_output_tokens=5, temperature=0)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": chat.message.content},
               {"role": "user", "content": "and again"}]
    expected = _chat(client, history, max_tokens=5)
    assert second.output_text == expected.message.content  # instructions are not carried over, as OpenAI
    assert client.responses.retrieve(second.id).output_text == second.output_text

    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client.responses.create(model="tiny", input="x", previous_response_id="resp_missing")


def test_responses_stream_events_add_up(client):
    whole = client.responses.create(model="tiny", input="stream me", max_output_tokens=12, temperature=0)
    events = list(client.responses.create(model="tiny", input="stream me", max_output_tokens=12, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == f"response.{whole.status}"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == next(e.text for e in events if e.type == "response.output_text.done")
    assert events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_responses_function_calls_round_trip(client):
    tool = {"type": "function", **ADD}
    first = client.responses.create(model="tiny", input="add 2 and 3", tools=[tool], tool_choice="required",
                                    temperature=0, max_output_tokens=200)
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and all(c.name == "add" and c.call_id.startswith("call_") for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), ADD["parameters"])
    results = [{"type": "function_call_output", "call_id": c.call_id, "output": "5"} for c in calls]
    final = client.responses.create(model="tiny", input=results, previous_response_id=first.id, tools=[tool],
                                    tool_choice="none", temperature=0, max_output_tokens=6)
    assert final.output and all(item.type == "message" for item in final.output)

    streamed = list(client.responses.create(model="tiny", input="add 2 and 3", tools=[tool], tool_choice="required",
                                            temperature=0, max_output_tokens=200, stream=True))
    done = [e.item for e in streamed if e.type == "response.output_item.done"]
    assert [(d.name, d.arguments) for d in done] == [(c.name, c.arguments) for c in calls]
    pieces = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert pieces == "".join(c.arguments for c in calls)


# ---- Messages ----------------------------------------------------------------------------------------------


def _messages(server, body, stream=False):
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    if stream:
        return httpx.stream("POST", server.url + "/v1/messages", json={**body, "stream": True}, headers=headers,
                            timeout=120)
    return httpx.post(server.url + "/v1/messages", json=body, headers=headers, timeout=120)


def test_messages_equal_chat_whole_and_streamed(server, client):
    body = {"model": "tiny", "max_tokens": 10, "temperature": 0, "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    message = _messages(server, body).json()
    chat = _chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
                 max_tokens=10)
    assert message["type"] == "message" and message["role"] == "assistant" and message["id"].startswith("msg_")
    assert message["content"] == ([{"type": "text", "text": chat.message.content}] if chat.message.content else [])
    assert message["stop_reason"] == {"length": "max_tokens", "stop": "end_turn"}[chat.finish_reason]
    with _messages(server, body, stream=True) as r:
        events = _sse(r)
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    text = "".join(p["delta"]["text"] for k, p in events if k == "content_block_delta")
    assert text == chat.message.content
    assert events[-2][1]["delta"]["stop_reason"] == message["stop_reason"]
    assert events[-2][1]["usage"]["output_tokens"] == message["usage"]["output_tokens"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop")


def test_messages_stop_sequences_and_tool_use(server):
    body = {"model": "tiny", "max_tokens": 30, "temperature": 0, "messages": [{"role": "user", "content": "go"}]}
    plain = _messages(server, body).json()["content"][0]["text"]
    stop = plain[3:5]
    cut = _messages(server, {**body, "stop_sequences": [stop]}).json()
    assert cut["stop_reason"] == "stop_sequence" and cut["stop_sequence"] == stop
    assert cut["content"][0]["text"] == plain[: plain.index(stop)]

    tool = {"name": ADD["name"], "description": ADD["description"], "input_schema": ADD["parameters"]}
    use = {**body, "max_tokens": 200, "tools": [tool], "tool_choice": {"type": "any",
                                                                       "disable_parallel_tool_use": True}}
    reply = _messages(server, use).json()
    assert reply["stop_reason"] == "tool_use" and len(reply["content"]) == 1
    block = reply["content"][0]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    jsonschema.validate(block["input"], ADD["parameters"])
    with _messages(server, use, stream=True) as r:
        events = _sse(r)
    partial = "".join(p["delta"]["partial_json"] for k, p in events if k == "content_block_delta")
    assert json.loads(partial) == block["input"]

    # The tool's result goes back as a tool_result block; the model answers (in text: tool_choice none).
    history = [{"role": "user", "content": "go"}, {"role": "assistant", "content": reply["content"]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "5"}]}]
    final = _messages(server, {**body, "max_tokens": 5, "messages": history, "tools": [tool],
                               "tool_choice": {"type": "none"}}).json()
    assert final["type"] == "message" and all(b["type"] == "text" for b in final["content"])
    count = httpx.post(server.url + "/v1/messages/count_tokens", headers={"x-api-key": KEY},
                       json={"messages": history, "tools": [tool]}).json()
    assert count["input_tokens"] > 100  # the tools section and the history


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),  # no max_tokens
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "invalid_request_error"),
    ({"max_tokens": 5, "model": "claude-x", "messages": [{"role": "user", "content": "x"}]}, 404, "not_found_error"),
])
def test_messages_errors_in_anthropic_shape(server, body, status, kind):
    r = _messages(server, body)
    assert r.status_code == status and r.json()["type"] == "error" and r.json()["error"]["type"] == kind
    unauthorized = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": "wrong"})
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["type"] == "authentication_error"
