"""memlm serve under abuse: the probes that once failed (llama.cpp's server tests, schemathesis on
/openapi.json and hand-written ones), kept as tests. A saved tiny random model serves them: only the
server's handling matters, never what the model says."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from conftest import byte_tokenizer, tiny_memlm
from memlm.serve.launch import ServerProcess

KEY = "probe-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from memlm.formats.loading import save_model

    model = tiny_memlm(vocab_size=257, eos_token_ids=(256,), max_position_embeddings=32768)
    return save_model(tmp_path_factory.mktemp("tiny") / "tiny", model, byte_tokenizer())


@pytest.fixture(scope="module")
def server(tiny_folder):
    args = ("--threads", "1", "--model", str(tiny_folder), "--max-batch", "2", "--max-queue", "4",
            "--max-body-bytes", str(MAX_BODY), "--max-tokens-cap", "30000", "--max-tokens-default", "7",
            "--allowed-origins", "http://example.com")
    with ServerProcess(*args, api_key=KEY) as s:
        yield s


def _post(s, path, body=None, raw=None, headers=AUTH, timeout=60):
    return httpx.post(s.url + path, json=body if raw is None else None, content=raw,
                      headers={**headers, "content-type": "application/json"}, timeout=timeout)


def _error(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] is None or isinstance(error["code"], str)  # OpenAI's string codes, never the status
    return error["message"]


def _eventually(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# ---- text and numbers that used to reach the tokenizer or torch --------------------------------------


@pytest.mark.parametrize(("path", "field"), [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": "a", "stop": ["\\udfff"], "max_tokens": 2}'),
    ("/tokenize", '{"prompt": "\\ud800"}'),
])
def test_lone_surrogates_are_refused(server, path, field):
    assert "surrogate" in _error(_post(server, path, raw=field.encode()), 400)


def test_seed_out_of_range_and_wrapping_choices(server):
    assert "seed" in _error(_post(server, "/v1/completions", {"prompt": "a", "seed": 2**64}), 400)
    assert "seed" in _error(_post(server, "/v1/completions", {"prompt": "a", "seed": -(2**63) - 1}), 400)
    # The largest seed works, and n choices past it wrap instead of overflowing.
    r = _post(server, "/v1/completions", {"prompt": "a", "seed": 2**64 - 1, "n": 2, "max_tokens": 3,
                                          "temperature": 1.0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_token_ids_are_not_coerced(server):
    for tokens in ([True], ["5"], [1.5]):
        _error(_post(server, "/detokenize", {"tokens": tokens}), 400)
    _error(_post(server, "/v1/completions", {"prompt": [True, False]}), 400)
    assert _post(server, "/detokenize", {"tokens": [104, 105]}).json()["prompt"] == "hi"


# ---- limits ----------------------------------------------------------------------------------------------


def test_oversize_bodies_are_refused_before_parsing(server):
    big = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    assert "--max-body-bytes" in _error(_post(server, "/v1/completions", raw=big), 413)

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 16384):
            yield big[i:i + 16384]

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={**AUTH, "content-type":
                                                                              "application/json"}, timeout=60)
    assert "--max-body-bytes" in _error(r, 413)
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_request_that_can_never_be_queued_is_a_400(server):
    message = _error(_post(server, "/v1/completions", {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1}), 400)
    assert "--max-queue" in message and "4" in message


def test_max_tokens_default_and_cap(server):
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                               "min_tokens": 0, "temperature": 0, "logit_bias": {"256": -100}})
    assert r.json()["usage"]["completion_tokens"] == 7  # --max-tokens-default
    assert "--max-tokens-cap" in _error(_post(server, "/v1/completions", {"prompt": "a", "max_tokens": 40000}), 400)


# ---- parameters that were silently ignored -------------------------------------------------------------


def test_logit_bias_moves_the_answer(server):
    body = {"prompt": "abc", "max_tokens": 6, "min_tokens": 6, "temperature": 0}
    plain = _post(server, "/v1/completions", body).json()["choices"][0]["text"]
    forced = _post(server, "/v1/completions", {**body, "logit_bias": {str(ord("z")): 100}}).json()
    assert forced["choices"][0]["text"] == "z" * 6 != plain

    def chosen(bias):  # the byte tokenizer: a token's bytes are its id
        chat = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 6, "min_tokens": 6,
                "temperature": 0, "logprobs": True, "logit_bias": bias}
        return {c["bytes"][0] for c in _post(server, "/v1/chat/completions", chat).json()["choices"][0]
                ["logprobs"]["content"]}

    tokens = chosen({})
    assert not chosen({str(t): -100 for t in tokens}) & tokens
    for bias in ({"300": 1}, {"x": 1}, {"5": 101}):
        _error(_post(server, "/v1/completions", {**body, "logit_bias": bias}), 400)


@pytest.mark.parametrize(("messages", "extra", "pattern"), [
    ([{"role": "user", "content": "hi"}], {"top_logprobs": 2}, "logprobs"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}], {}, "not supported"),
    ([{"role": "user", "content": None}], {}, "null"),
    ([{"role": "user"}], {}, "null"),
])
def test_unsupported_content_is_refused(server, messages, extra, pattern):
    assert pattern in _error(_post(server, "/v1/chat/completions", {"messages": messages, **extra}), 400)


# ---- HTTP shape ----------------------------------------------------------------------------------------


def test_http_shape_openapi_auth_and_cors(server):
    r = httpx.get(server.url + "/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    r = httpx.get(server.url + "/v1/models")
    assert _error(r, 401) and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/metrics").status_code == 401  # closed without --public-metrics
    assert "memlm:num_requests_running" in httpx.get(server.url + "/metrics", headers=AUTH).text
    assert httpx.get(server.url + "/health").status_code == 200

    spec = httpx.get(server.url + "/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert "422" not in chat["responses"] and {"400", "401", "404", "413", "503"} <= set(chat["responses"])
    assert chat["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "application/json" not in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "security" not in spec["paths"]["/health"]["get"]

    preflight = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.headers["access-control-allow-origin"] == "http://example.com"
    other = httpx.get(server.url + "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# ---- clients that go away ---------------------------------------------------------------------------------


def test_a_non_streaming_client_that_leaves_aborts_its_request(server):
    aborted = server.metric("memlm:request_success_total", finished_reason="abort")
    body = json.dumps({"prompt": "a", "max_tokens": 20000, "min_tokens": 20000}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(head + body)
        assert _eventually(lambda: server.metric("memlm:num_requests_running") == 1)
    # The socket closed with 20000 tokens to go: the row is freed at once.
    assert _eventually(lambda: server.metric("memlm:num_requests_running") == 0, timeout=10)
    assert server.metric("memlm:request_success_total", finished_reason="abort") == aborted + 1


def test_huge_prompts_do_not_stall_other_requests(server):
    """Tokenizing runs off the event loop: /health answers while a big prompt is tokenized. A prompt
    that cannot fit however it tokenizes (more bytes than context x the longest token) is refused
    without tokenizing."""
    import threading

    result = {}
    big = {"prompt": "word " * 30_000, "max_tokens": 1}  # 150 kB: tokenized (150k tokens), then refused
    thread = threading.Thread(target=lambda: result.update(r=_post(server, "/v1/completions", big)))
    thread.start()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    thread.join()
    assert "150000 tokens" in _error(result["r"], 400)
    huger = {"prompt": "word " * 38_000, "max_tokens": 1}  # 190 kB > 32768 x 5 bytes ("<eos>")
    assert "at least" in _error(_post(server, "/v1/completions", huger), 400)


@pytest.mark.parametrize("stream", [False, True])
def test_shutdown_is_quiet_with_requests_in_flight(tiny_folder, stream):
    """SIGTERM while a request generates: its client gets a 503 (or an error event) at once, and the
    log shows no CancelledError trace from uvicorn cancelling a handler after its grace period."""
    import threading

    s = ServerProcess("--threads", "1", "--model", str(tiny_folder)).wait_ready()
    body = {"prompt": "a", "max_tokens": 20000, "min_tokens": 20000, "stream": stream}
    answer = {}

    def send():
        try:
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
            answer.update(status=r.status_code, text=r.text)
        except httpx.TransportError as e:
            answer.update(status=None, text=str(e))

    thread = threading.Thread(target=send)
    thread.start()
    assert _eventually(lambda: s.metric("memlm:num_requests_running") == 1)
    s.process.terminate()
    s.process.wait(timeout=30)
    thread.join()
    output = s.process.stdout.read()
    assert "Traceback" not in output and "CancelledError" not in output, output
    if stream:
        assert "shutting down" in answer["text"]
    else:
        assert answer["status"] == 503 and "shutting down" in answer["text"]


@pytest.mark.parametrize(("flags", "pattern"), [
    (["--max-queue", "0"], "--max-queue"),
    (["--max-tokens-cap", "0"], "--max-tokens-cap"),
    (["--max-body-bytes", "0"], "--max-body-bytes"),
])
def test_serve_flags_are_checked(flags, pattern):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "memlm", "serve", *flags], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and pattern in done.stderr and "Traceback" not in done.stderr
