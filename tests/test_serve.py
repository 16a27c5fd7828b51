"""memlm serve end to end: a real server process on a free loopback port, driven by the official
`openai` client and by raw HTTP. The embedded SmolLM2 answers the API tests (greedy answers must
equal `Engine.generate` for the same request); a saved tiny random model serves the load-shedding
and disconnect tests, where only the scheduling matters."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from conftest import byte_tokenizer, tiny_memlm
from memlm.generation.params import SamplingParams
from memlm.serve.launch import ServerProcess

MODELS = Path(__file__).parent.parent / "bench" / "models"
KEY = "test-key"
pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def server():
    memory = f"chain={MODELS / 'chain-sum-memgen'}"
    with ServerProcess("--threads", "1", "--api-key", KEY, "--public-metrics", "--memory", memory,
                       "--max-batch", "8") as s:
        yield s


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    from memlm.formats.loading import save_model

    model = tiny_memlm(vocab_size=257, eos_token_ids=(256,), max_position_embeddings=32768)
    folder = save_model(tmp_path_factory.mktemp("tiny") / "tiny", model, byte_tokenizer())
    with ServerProcess("--threads", "1", "--model", str(folder), "--max-batch", "1", "--max-queue", "1") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- the API through the official client ---------------------------------------------------------------


def test_models_health_and_tokenizer_endpoints(server, embedded_engine):
    assert server.saw_loading  # /health answered 503 with an error body while the model loaded
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed
    models = httpx.get(server.url + "/v1/models", headers=_auth()).json()["data"]
    assert models[0]["id"] == "smollm2-135m-instruct" and models[0]["memories"] == ["chain"]
    text = "Memory is first-class."
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": text}, headers=_auth()).json()
    assert tokens["tokens"] == embedded_engine.tokenizer.encode(text) and tokens["count"] == len(tokens["tokens"])
    back = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}, headers=_auth()).json()
    assert back["prompt"] == text
    chat = httpx.post(server.url + "/tokenize", json={"messages": _chat("hi")}, headers=_auth()).json()
    assert chat["tokens"] == embedded_engine.encode_prompt(_chat("hi"))


def test_chat_and_completions_equal_generate(client, embedded_engine):
    question = "Name three primary colors."
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=_chat(question),
                                           max_tokens=24, temperature=0)
    expected = embedded_engine.generate(_chat(question), SamplingParams(max_new_tokens=24))
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    out = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                    max_tokens=8, temperature=0, stop=["."])
    expected = embedded_engine.generate("The capital of France is", SamplingParams(max_new_tokens=8, stop=["."]))
    assert out.choices[0].text == expected.text and out.choices[0].finish_reason == expected.finish_reason
    batch = client.completions.create(model="smollm2-135m-instruct", prompt=["One,", "Two,"], max_tokens=4,
                                      temperature=0)
    assert [c.text for c in batch.choices] == [c.text for c in embedded_engine.generate(
        ["One,", "Two,"], SamplingParams(max_new_tokens=4))]


def test_seeded_sampling_repeats_and_n_choices_differ(client):
    kwargs = dict(model="smollm2-135m-instruct", messages=_chat("Write a word."), max_tokens=12,
                  temperature=1.0, top_p=0.95, seed=7, n=3)
    first, second = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1 and [c.index for c in first.choices] == [0, 1, 2]


def test_logprobs_in_both_shapes(client, embedded_engine):
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=_chat("Say yes."),
                                           max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    expected = embedded_engine.generate(_chat("Say yes."), SamplingParams(max_new_tokens=6, logprobs=3))
    assert [round(c.logprob, 4) for c in content] == [round(v, 4) for v in expected.logprobs]
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(c.top_logprobs[0].token == c.token for c in content)  # greedy: the chosen token is the best
    text = bytes(b for c in content for b in c.bytes).decode()
    assert text.startswith(reply.choices[0].message.content)

    out = client.completions.create(model="smollm2-135m-instruct", prompt="1, 2, 3,", max_tokens=4,
                                    temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == out.choices[0].text and lp.text_offset[0] == 0
    assert all(len(top) == 2 for top in lp.top_logprobs)


SCHEMAS = [
    {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
     "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                      "country": {"type": "string", "maxLength": 20}},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "minItems": 2, "maxItems": 3}},
     "required": ["colors"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0,
                                                                             "maximum": 1}},
     "required": ["ok", "score"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_structured_output_validates(client, schema):
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=_chat("Give an example as JSON."), max_tokens=80, temperature=0.7,
        seed=1, response_format={"type": "json_schema", "json_schema": {"name": "example", "schema": schema}},
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_json_object_mode(client):
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=_chat("A JSON object, please."),
                                           max_tokens=80, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


# ---- streaming ------------------------------------------------------------------------------------------


def _events(response: httpx.Response) -> list:
    """The SSE payloads of a response, checking the framing: `data: ...` events, [DONE] last."""
    body = response.read().decode()
    assert body.endswith("data: [DONE]\n\n")
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


def test_chat_stream_framing_and_usage(server, client):
    body = {"model": "smollm2-135m-instruct", "messages": _chat("Count to five."), "max_tokens": 16,
            "temperature": 0, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=_auth(), timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = _events(r)
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    for index in (0, 1):
        mine = [ch for c in chunks[:-1] for ch in c["choices"] if ch["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert sum(ch["finish_reason"] is not None for ch in mine) == 1 and mine[-1]["finish_reason"] == "length"
        streamed = "".join(ch["delta"].get("content") or "" for ch in mine)
        whole = client.chat.completions.create(model="smollm2-135m-instruct", messages=_chat("Count to five."),
                                               max_tokens=16, temperature=0)
        assert streamed == whole.choices[0].message.content

    # The official client reads the same stream.
    stream = client.completions.create(model="smollm2-135m-instruct", prompt="A, B, C,", max_tokens=6,
                                       temperature=0, stream=True)
    pieces = list(stream)
    assert sum(p.choices[0].finish_reason is not None for p in pieces) == 1
    plain = client.completions.create(model="smollm2-135m-instruct", prompt="A, B, C,", max_tokens=6, temperature=0)
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text


# ---- memory per request ---------------------------------------------------------------------------------


def test_memory_options_change_only_their_own_request(server, embedded_engine):
    """Three concurrent requests: plain, a KV budget, a latent memory. Each equals its request alone."""
    from memlm.cache.policies import make_policy
    from memlm.latent.memory import LatentMemory

    task = _chat("What is 3 + 4 + 5? Think step by step.")
    bodies = {
        "plain": {},
        "budget": {"kv_policy": "window", "kv_budget": 40},
        "memory": {"memory": "chain"},
    }
    results = {}

    def send(name):
        body = {"messages": task, "max_tokens": 40, "temperature": 0, "return_memory_trace": True, **bodies[name]}
        results[name] = httpx.post(server.url + "/v1/chat/completions", json=body, headers=_auth(), timeout=300).json()

    threads = [threading.Thread(target=send, args=(name,)) for name in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    choice = {name: results[name]["choices"][0] for name in bodies}
    params = SamplingParams(max_new_tokens=40)
    assert choice["plain"]["message"]["content"] == embedded_engine.generate(task, params).text
    windowed = embedded_engine.generate(task, params, kv_policy=make_policy("window", 40))
    assert choice["budget"]["message"]["content"] == windowed.text
    trace = choice["budget"]["memory_trace"]
    # The prompt is prefilled whole, then the row is brought back to the budget at every step.
    assert trace["evictions"] > 0 and trace["peak_kv_tokens"] <= max(41, len(trace["prompt_tokens"]))
    assert not all(t["in_cache"] for t in trace["prompt_tokens"])
    assert choice["plain"]["memory_trace"]["evictions"] == 0
    assert all(t["in_cache"] for t in choice["plain"]["memory_trace"]["prompt_tokens"])
    memory = LatentMemory.load(MODELS / "chain-sum-memgen", embedded_engine)
    woven = embedded_engine.generate(task, params, memory=memory)
    assert choice["memory"]["message"]["content"] == woven.text
    assert choice["memory"]["memory_trace"]["insertions"] == woven.insertions and woven.insertions[0] == 0
    assert choice["plain"]["memory_trace"]["insertions"] == []


def test_metrics_follow_the_requests(server, client):
    before = {name: server.metric(name) for name in ("memlm:generation_tokens_total", "memlm:prompt_tokens_total",
                                                     "memlm:e2e_request_latency_seconds_count",
                                                     "memlm:time_to_first_token_seconds_count")}
    done = server.metric("memlm:request_success_total", finished_reason="length")
    client.chat.completions.create(model="smollm2-135m-instruct", messages=_chat("Hello"), max_tokens=5,
                                   temperature=0)
    assert server.metric("memlm:generation_tokens_total") == before["memlm:generation_tokens_total"] + 5
    assert server.metric("memlm:prompt_tokens_total") > before["memlm:prompt_tokens_total"]
    assert server.metric("memlm:request_success_total", finished_reason="length") == done + 1
    for name in ("memlm:e2e_request_latency_seconds_count", "memlm:time_to_first_token_seconds_count"):
        assert server.metric(name) == before[name] + 1
    text = httpx.get(server.url + "/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "evictions_total",
                 "latent_insertions_total", "inter_token_latency_seconds", "request_queue_time_seconds"):
        assert f"memlm:{name}" in text
    evictions = server.metric("memlm:evictions_total")
    httpx.post(server.url + "/v1/chat/completions", headers=_auth(), timeout=120, json={
        "messages": _chat("Hello"), "max_tokens": 8, "temperature": 0, "kv_policy": "window", "kv_budget": 20})
    assert server.metric("memlm:evictions_total") > evictions


# ---- errors -------------------------------------------------------------------------------------------


def _post(server, path, body, headers=None, raw=None):
    return httpx.post(server.url + path, json=body if raw is None else None, content=raw,
                      headers=headers if headers is not None else _auth(), timeout=60)


@pytest.mark.parametrize(
    ("body", "status", "pattern"),
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": _chat("x"), "temperature": -1}, 400, "temperature"),
        ({"messages": _chat("x"), "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": _chat("x"), "n": "many"}, 400, "n"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({"messages": _chat("x"), "model": "gpt-9"}, 404, "gpt-9"),
        ({"messages": _chat("x"), "memory": "nope"}, 404, "nope"),
        ({"messages": _chat("x"), "kv_policy": "window"}, 400, "budget"),
        ({"messages": _chat("x"), "kv_policy": "lru", "kv_budget": 8}, 400, "unknown KV policy"),
        ({"messages": _chat("x"), "kv_budget": 8}, 400, "kv_policy"),
        ({"messages": _chat("x"), "kv_policy": "learned", "kv_budget": 8}, 400, "kv-predictor"),
        ({"messages": _chat("x"), "kv_policy": "tova", "kv_budget": 8, "kv_options": {"ratio": 0.5}}, 400,
         "options of --kv-policy learned"),
        ({"messages": _chat("x"), "kv_policy": "tova", "kv_budget": 8, "kv_options": {"depth": 2}}, 400,
         "unknown KV policy option 'depth'"),
        ({"messages": _chat("x"), "kv_policy": "tova", "kv_budget": 8, "kv_options": {"predictor": "/etc"}}, 400,
         "chosen at start"),
        ({"messages": _chat("x"), "kv_options": {"spans": True}}, 400, "kv_policy"),
        ({"messages": _chat("x"), "kv_policy": "window", "kv_budget": 8, "kv_options": {"sinks": 2}}, 400,
         "--kv-sinks is an option of --kv-policy sinks"),
        ({"messages": _chat("x"), "response_format": {"type": "json_schema",
                                                      "json_schema": {"schema": {"type": "nonsense"}}}}, 400, "schema"),
        ({"messages": _chat("x"), "response_format": {"type": "yaml"}}, 400, "response_format"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, pattern):
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and re.search(pattern, error["message"])


def test_invalid_json_long_prompts_and_auth(server):
    r = _post(server, "/v1/chat/completions", None, raw=b"{not json", headers={**_auth(), "content-type":
                                                                                 "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"prompt": "word " * 9000, "max_tokens": 4})
    assert r.status_code == 400 and re.search(r"\d+ tokens.*context is 8192", r.json()["error"]["message"])
    r = _post(server, "/v1/completions", {"prompt": [1, 2, 10**6]})
    assert r.status_code == 400
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = _post(server, "/v1/chat/completions", {"messages": _chat("x")}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.get(server.url + "/no/such/path")
    assert r.status_code == 404 and r.json()["error"]["code"] is None


# ---- scheduling under load: the tiny model ------------------------------------------------------------------


def _long_stream(server):
    body = {"prompt": "a", "max_tokens": 20000, "min_tokens": 20000, "stream": True, "temperature": 0}
    return httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60)


def _eventually(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_aborts_and_a_full_queue_answers_503(tiny_server):
    s = tiny_server
    aborted = s.metric("memlm:request_success_total", finished_reason="abort")
    with _long_stream(s) as running:
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")
        assert _eventually(lambda: s.metric("memlm:num_requests_running") == 1)
        with _long_stream(s) as waiting:  # max_batch 1: this one waits ...
            assert _eventually(lambda: s.metric("memlm:num_requests_waiting") == 1)
            # ... and fills the queue (max_queue 1): the next is shed with 503 + Retry-After.
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "b", "max_tokens": 4})
            assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] is None
            waiting.close()  # a waiting client leaves: its request leaves the queue
            assert _eventually(lambda: s.metric("memlm:num_requests_waiting") == 0)
    # The running client went away mid-stream: its row is freed at once, though it had 20000 tokens to go.
    assert _eventually(lambda: s.metric("memlm:num_requests_running") == 0, timeout=10)
    assert s.metric("memlm:request_success_total", finished_reason="abort") == aborted + 2
    ok = httpx.post(s.url + "/v1/completions", json={"prompt": "c", "max_tokens": 4, "min_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4  # the server is fine


# ---- the memory page in a real browser -------------------------------------------------------------------


def test_memory_page_streams_and_shades_evicted_tokens(server):
    """Headless Debian chromium: type a prompt, watch tokens stream in, see evicted ones shaded."""
    from playwright.sync_api import sync_playwright

    chromium = Path("/usr/bin/chromium")
    assert chromium.exists(), "the page test needs Debian's chromium (make test installs it: apt-get install chromium)"
    artifacts = Path(__file__).parent.parent / "runs" / "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(chromium),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(server.url + "/")
            page.fill("#api_key", KEY)
            page.wait_for_function("document.querySelector('#kv_policy').options.length > 1", timeout=30_000)
            page.select_option("#kv_policy", "window")
            page.fill("#kv_budget", "40")
            page.fill("#prompt", "List the days of the week, one per line.")
            page.fill("#max_tokens", "40")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.tok.output').length > 0", timeout=60_000)
            page.wait_for_function("document.querySelector('#status').textContent.includes('done')", timeout=120_000)
            outputs = page.locator(".tok.output").count()
            evicted = page.locator(".tok.evicted").count()
            shown_kv = int(page.text_content("#kv"))
            page.screenshot(path=str(artifacts / "memory-page.png"), full_page=True)
        finally:
            browser.close()
    assert outputs > 5 and evicted > 0  # tokens streamed in; the window policy's evictions are shaded
    assert shown_kv <= 41  # the gauge shows the row back under its budget
    assert (artifacts / "memory-page.png").stat().st_size > 10_000
