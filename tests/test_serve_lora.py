"""`memlm serve --lora NAME=DIR`: a request's `model` (NAME or BASE:NAME) picks an adapter; concurrent
requests over three adapters and the base (batched together by the engine) each equal the same
request alone and the library's answer; /v1/models lists the adapters; an unknown one is a 404."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import lora_folders
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams
from memlm.serve.launch import ServerProcess

BASE = "tiny"
# 8 requests over 3 adapters + the base, named every way a client may name them.
REQUESTS = [
    ("a", "the cat sat"), ("b", "the cat sat"), ("c", "hello"), (BASE, "hello"),
    (f"{BASE}:a", "one two three"), ("b", "xyz xyz"), (f"{BASE}:c", "the cat sat"), (None, "one two three"),
]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return lora_folders(tmp_path_factory.mktemp("serve-lora"))


@pytest.fixture(scope="module", params=["float32", "q8_0"])
def server(folders, request):
    loras = [arg for name in "abc" for arg in ("--lora", f"{name}={folders / name}")]
    args = ("--threads", "1", "--model", str(folders / "base"), "--served-model-name", BASE, "--max-batch", "8")
    with ServerProcess(*args, "--dtype", request.param, *loras) as s:
        s.dtype = request.param
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _complete(client, model, prompt):
    reply = client.completions.create(model=model or BASE, prompt=prompt, max_tokens=16, temperature=0)
    return reply.model, reply.choices[0].text


def test_concurrent_requests_over_adapters_equal_each_alone_and_the_library(client, server, folders):
    alone = [_complete(client, model, prompt) for model, prompt in REQUESTS]
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(lambda r: _complete(client, *r), REQUESTS))
    assert together == alone
    assert [model for model, _ in alone] == [m or BASE for m, _ in REQUESTS]  # the name the client sent
    engine = Engine.load(str(folders / "base"), dtype=server.dtype)
    for name in "abc":
        engine.add_adapter(name, folders / name)
    params = SamplingParams(max_new_tokens=16)
    for (model, prompt), (_, text) in zip(REQUESTS, alone, strict=True):
        adapter = None if model in (None, BASE) else model.removeprefix(f"{BASE}:")
        assert text == engine.generate(prompt, params, adapter=adapter).text
    # The adapters answer differently from the base and from each other (the test can fail).
    cat = {text for (_, prompt), (_, text) in zip(REQUESTS, alone, strict=True) if prompt == "the cat sat"}
    assert len(cat) == 3  # a, b and c on the same prompt


def test_models_lists_the_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert sorted(models) == ["a", "b", "c", BASE]
    assert all(models[name].model_extra["parent"] == BASE for name in "abc")


def test_an_unknown_adapter_is_a_404_model_not_found(client, server):
    for name in ("nope", f"{BASE}:nope", f"{BASE}:"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert caught.value.code == "model_not_found" and name in caught.value.message
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert chat.model == "a"
    embeddings = httpx.post(server.url + "/v1/embeddings", json={"model": "a", "input": "hi"})
    assert embeddings.status_code == 400 and "base model" in embeddings.json()["error"]["message"]
