"""The server's KV storage: a bounded pool with q8_0 blocks, prefix reuse seen in usage and /metrics,
and the 400 for a request that can never fit. A saved tiny random model serves it: only the cache's
bookkeeping matters here."""

from __future__ import annotations

import httpx
import pytest

from conftest import byte_tokenizer, tiny_memlm
from memlm.serve.launch import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from memlm.formats.loading import save_model

    model = tiny_memlm(vocab_size=257, eos_token_ids=(256,), max_position_embeddings=4096, head_dim=32)
    folder = save_model(tmp_path_factory.mktemp("tiny") / "tiny", model, byte_tokenizer())
    args = ("--threads", "1", "--model", str(folder), "--kv-memory", "512", "--kv-cache-type", "q8_0", "--kv-rotate")
    with ServerProcess(*args) as s:
        yield s


def _complete(server, prompt: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", timeout=120,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})  # fmt: skip


def test_a_shared_prefix_is_reused_and_counted(server):
    prefix = "A long shared instruction that many requests start with. " * 3
    queries, hits = server.metric("memlm:prefix_cache_queries_total"), server.metric("memlm:prefix_cache_hits_total")
    first = _complete(server, prefix + "First?").json()
    second = _complete(server, prefix + "Second?").json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    shared = second["usage"]["prompt_tokens"] - len("Second?")  # the byte tokenizer: one token per byte
    assert cached == shared // 16 * 16  # every whole block of the shared prefix
    assert server.metric("memlm:prefix_cache_hits_total") == hits + cached
    prompts = first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
    assert server.metric("memlm:prefix_cache_queries_total") == queries + prompts
    assert server.metric("memlm:kv_blocks_total") == 512 // 16
    assert server.metric("memlm:kv_blocks_used") == 0  # idle: cached blocks are free to reuse


def test_a_request_that_can_never_fit_is_a_400_naming_both_sizes(server):
    response = _complete(server, "x" * 100, max_tokens=1000)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "KV blocks" in message and "holds 32 blocks (512 tokens)" in message


def test_a_pressed_request_computes_its_whole_prompt_and_bad_presses_are_400s(server):
    prefix = "Another shared instruction that pressed requests start with. " * 3
    _complete(server, prefix + "Warm the cache.")
    body = {"prompt": prefix + "Pressed?", "max_tokens": 4, "temperature": 0}
    for press in ("snapkv", "expected_attention", "pyramid:knorm"):  # q8_0 keys, rotated: the press reads them decoded
        response = httpx.post(server.url + "/v1/completions", timeout=120,
                              json=body | {"kv_press": press, "kv_press_ratio": 0.5})  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # a press reads every query
    for extra, message in (
        ({"kv_press": "zip"}, "unknown KV press 'zip'"),
        ({"kv_press": "knorm", "kv_press_ratio": 1.5}, "the share removed, in [0, 1)"),
        ({"kv_press": "learned"}, "needs a server started with --kv-predictor"),
        ({"kv_options": {"press": "knorm"}}, "kv_options.press: use the request's kv_press"),
    ):
        response = httpx.post(server.url + "/v1/completions", timeout=120, json=body | extra)
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
