"""Tool calling: the grammar that keeps calls valid, reading calls back, rendering tools into chat
templates, and the server's tool calls over loopback with the `openai` client and raw HTTP.

A saved tiny random model (byte tokenizer, a template that knows no tools) serves the validity tests:
its calls are constrained, so they must parse and validate whatever the weights say. The embedded
SmolLM2 plays the multi-turn round in test_serve_tools_e2e.py."""

from __future__ import annotations

import json
import random
import threading
from types import SimpleNamespace

import httpx
import jsonschema
import pytest

from conftest import byte_tokenizer, tiny_memlm
from memlm.errors import InvalidRequestError
from memlm.generation.structured import StructuredOutput
from memlm.generation.tool_calls import FORMATS, ToolFormat, parse_tools
from memlm.serve.chat import render_chat
from memlm.serve.launch import ServerProcess
from memlm.serve.protocol import ChatCompletionRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]


# ---- the grammar, token by token (no server) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def compiler():
    tokenizer = byte_tokenizer()
    return tokenizer, StructuredOutput(tokenizer, 257, [256])


def _accepts(compiler, layout: ToolFormat, choice: str, parallel: bool, text: str) -> bool:
    tokenizer, structured = compiler
    grammar = structured.constraint({"type": "grammar", "grammar": layout.grammar(parse_tools(TOOLS), choice,
                                                                                  parallel)})
    for token in tokenizer.encode(text):
        if not grammar.matcher.consume_token(token):
            return False
    return grammar.matcher.is_accepting()


@pytest.mark.parametrize("layout", list(FORMATS.values()), ids=list(FORMATS))
def test_grammar_admits_exactly_valid_calls(compiler, layout):
    one = layout.render_calls([("get_weather", '{"city": "Oslo", "unit": "c"}')])
    two = layout.render_calls([("get_weather", '{"city": "Oslo", "unit": "c"}'), ("add", '{"a": 1, "b": 2}')])
    accepts = lambda choice, parallel, text: _accepts(compiler, layout, choice, parallel, text)  # noqa: E731
    assert accepts("required", False, one) and accepts("required", True, two)
    assert not accepts("required", False, two)  # parallel_tool_calls false: one call
    assert accepts("auto", True, "Let me check.\n" + one) and accepts("auto", True, "No call needed.")
    assert accepts("get_weather", False, one) and not accepts("add", False, one)  # a named function only
    assert not accepts("none", True, one) and accepts("none", True, "plain text <tool without the tag")
    assert not accepts("required", False, "I will not call.")
    bad = [("get_weather", '{"city": "Oslo", "unit": "k"}'), ("get_weather", '{"city": "Oslo"}'),
           ("add", '{"a": 1, "b": 2, "c": 3}'), ("add", '{"a": "1", "b": 2}'), ("nope", "{}")]
    for name, arguments in bad:
        assert not accepts("required", True, layout.render_calls([(name, arguments)])), (name, arguments)


def test_auto_constrains_a_call_once_its_tag_is_written(compiler):
    tokenizer, structured = compiler
    layout = FORMATS["hermes"]
    grammar = structured.constraint({"type": "grammar", "grammar": layout.grammar(parse_tools(TOOLS), "auto", True)})
    from memlm.generation.structured import allowed_tokens

    free = allowed_tokens([grammar], 257)[0]
    assert free[:128].all()  # free text: any ASCII byte (and the lead bytes of longer UTF-8 characters)
    for token in tokenizer.encode("Sure. <tool_call>\n"):
        assert grammar.matcher.consume_token(token)
    allowed = allowed_tokens([grammar], 257)[0].nonzero().flatten().tolist()
    assert allowed == [ord("{")]  # inside the block: only the call's JSON may follow


def test_parse_reads_complete_partial_and_unconstrained_calls():
    hermes, smol = FORMATS["hermes"], FORMATS["smollm2"]
    content, calls = hermes.parse('Hi <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": {"c": "}"}}}\n'
                                  '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "R')
    assert content == "Hi " and [c.name for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[0].arguments) == {"a": 1, "b": {"c": "}"}} and calls[0].complete
    assert calls[1].arguments == '{"city": "R' and not calls[1].complete
    content, calls = smol.parse('<tool_call>[{"name":"add","arguments":{"a":1,"b":2}}, '
                                '{"name": "add", "arguments": {}}]</tool_call>')
    assert content == "" and [json.loads(c.arguments) for c in calls] == [{"a": 1, "b": 2}, {}]
    assert hermes.parse("no calls at all") == ("no calls at all", [])
    assert ToolFormat.safe_content_length("Hello <tool_") == len("Hello ")
    assert ToolFormat.safe_content_length("a < b") == len("a < b")


def test_parse_tools_refuses_bad_declarations():
    bad = [[], [{"type": "retrieval"}], [{"type": "function", "function": {"name": "has space"}}],
           [{"type": "function", "function": {"name": "f", "parameters": "x"}}], [ADD, ADD]]
    for tools in bad:
        with pytest.raises(InvalidRequestError):
            parse_tools(tools)


# ---- chat templates -------------------------------------------------------------------------------------


def _history():
    return [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
    ]


QWEN_LIKE = (  # a Hermes-style template that renders tools, calls and results itself (as Qwen's does)
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}"
    "{% endif %}{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_templates_render_tools_calls_and_results():
    tokenizer = byte_tokenizer()
    engine = SimpleNamespace(tokenizer=tokenizer)
    body = ChatCompletionRequest(messages=_history(), tools=TOOLS)
    ids, plan = render_chat(engine, body)
    generic = tokenizer.decode(ids)
    assert plan.format.name == "hermes" and plan.choice == "auto"
    assert generic.startswith("<system>You can call functions") and '"name": "add"' in generic
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>' in generic
    assert '<user><tool_response>\n{"name": "get_weather"}\n-3 C, snow\n</tool_response>' in generic

    tokenizer.chat_template = QWEN_LIKE
    native = tokenizer.decode(render_chat(engine, body)[0])
    assert native.startswith("<|im_start|>system\n# Tools\n<tools>{\"type\": \"function\"")
    assert '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}' in native
    assert "<|im_start|>tool\n-3 C, snow<|im_end|>" in native

    smol = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}SmolLM"
    tokenizer.chat_template = smol
    ids, plan = render_chat(engine, body)
    text = tokenizer.decode(ids)
    assert plan.format.name == "smollm2"
    assert '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]</tool_call>' in text
    assert "<|im_start|>tool\n<tool_response>" in text  # ChatML prints the tool role


# ---- over loopback: a tiny random model, constrained --------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from memlm.formats.loading import save_model

    model = tiny_memlm(vocab_size=257, eos_token_ids=(256,), max_position_embeddings=32768)
    folder = save_model(tmp_path_factory.mktemp("tiny") / "tiny", model, byte_tokenizer())
    with ServerProcess("--threads", "1", "--model", str(folder), "--max-batch", "24") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema whose every value is bounded (a random model must finish writing it)."""
    kinds = ["string", "integer", "boolean", "enum", "array"] + (["object"] if depth == 0 else [])
    properties = {}
    for k in range(rng.randint(1, 3)):
        kind = rng.choice(kinds)
        if kind == "string":
            prop = {"type": "string", "maxLength": rng.randint(1, 6)}
        elif kind == "integer":
            low = rng.randint(-20, 20)
            prop = {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
        elif kind == "boolean":
            prop = {"type": "boolean"}
        elif kind == "enum":
            prop = {"enum": rng.sample(["red", "green", 3, None, True, "x y"], rng.randint(1, 3))}
        elif kind == "array":
            prop = {"type": "array", "items": {"type": "boolean"}, "maxItems": rng.randint(0, 3)}
        else:
            prop = _random_schema(rng, depth + 1)
        properties[f"p{k}_{kind}"] = prop
    required = rng.sample(sorted(properties), rng.randint(0, len(properties)))
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def test_constrained_calls_validate_on_20_random_schemas(client):
    """tool_choice required and named, on 20 random schemas: every call parses, names a declared
    function and its arguments validate against that function's schema."""
    rng = random.Random(33)
    cases = []
    for i in range(20):
        tools = [{"type": "function", "function": {"name": f"f{i}_{j}", "parameters": _random_schema(rng)}}
                 for j in range(rng.randint(1, 3))]
        named = i % 4 == 3
        choice = {"type": "function", "function": {"name": tools[-1]["function"]["name"]}} if named else "required"
        cases.append((tools, choice))
    replies = [None] * len(cases)

    def send(i):
        tools, choice = cases[i]
        replies[i] = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "go"}], tools=tools, tool_choice=choice,
            parallel_tool_calls=False, temperature=1.0, seed=i, max_tokens=600)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (tools, choice), reply in zip(cases, replies, strict=True):
        choice_out = reply.choices[0]
        assert choice_out.finish_reason == "tool_calls", choice_out
        calls = choice_out.message.tool_calls
        assert len(calls) == 1 and calls[0].id.startswith("call_") and calls[0].type == "function"
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        if isinstance(choice, dict):
            assert calls[0].function.name == choice["function"]["name"]
        jsonschema.validate(json.loads(calls[0].function.arguments), schemas[calls[0].function.name])


def test_parallel_calls_and_stream_deltas_reassemble(server, client):
    """Streamed tool-call deltas (id and name once, arguments in pieces) add up to the non-streamed
    answer for the same seed; parallel calls come with indexes 0, 1, ..."""
    body = dict(model="tiny", messages=[{"role": "user", "content": "go"}], tools=TOOLS, tool_choice="required",
                temperature=1.0, max_tokens=400, logit_bias={"256": -100})  # no end token: more calls come
    for seed in range(12):  # a seed whose answer holds at least two calls
        whole = client.chat.completions.create(**body, seed=seed)
        if whole.choices[0].finish_reason == "length" and len(whole.choices[0].message.tool_calls or []) >= 3:
            break
    calls = whole.choices[0].message.tool_calls
    assert len(calls) >= 3 and [c.function.name for c in calls[:2]] and calls[0].id != calls[1].id
    for call in calls[:-1]:  # every call but the one max_tokens cut is complete and valid
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)

    stream = client.chat.completions.create(**body, seed=seed, stream=True)
    assembled: dict[int, dict] = {}
    content, finishes = "", []
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finishes.append(chunk.choices[0].finish_reason)
        for piece in delta.tool_calls or []:
            entry = assembled.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            if piece.id:
                assert entry["id"] is None  # id and name come once
                entry["id"], entry["name"] = piece.id, piece.function.name
            entry["arguments"] += piece.function.arguments or ""
    assert content == "" and [f for f in finishes if f] == ["length"]
    assert sorted(assembled) == list(range(len(calls)))
    assert [(e["name"], e["arguments"]) for e in assembled.values()] == \
        [(c.function.name, c.function.arguments) for c in calls]
    assert all(e["id"].startswith("call_") for e in assembled.values())


def test_auto_stream_content_then_finish(server):
    """tool_choice auto on a random model: free text (maybe a call); the stream's content and calls
    equal the non-streamed answer, and finish_reason says which it was."""
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "temperature": 1.0, "seed": 5,
            "max_tokens": 40}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == (whole["message"]["content"] or "")
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


@pytest.mark.parametrize(("extra", "pattern"), [
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "missing"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
                                                                                 {"a": {"type": "nonsense"}}}}}]},
     "grammar"),
])
def test_bad_tool_requests_are_400s(server, extra, pattern):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "x"}], **extra})
    assert r.status_code == 400 and pattern in r.json()["error"]["message"], r.text


def test_tokenize_renders_tools(server):
    r = httpx.post(server.url + "/tokenize", json={"messages": _history(), "tools": TOOLS}).json()
    text = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert "<tools>" in text and "<tool_response>" in text
