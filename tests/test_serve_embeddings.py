"""/v1/embeddings: mean-pooled, normalised last hidden states. The pooling is checked against a
transformers twin; the endpoint over loopback with the `openai` client on a tiny random model."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

from conftest import byte_tokenizer, hf_tiny, memlm_twin, tiny_memlm
from memlm.errors import InvalidRequestError
from memlm.generation.embedding import embed_token_lists
from memlm.serve.launch import ServerProcess


def test_pooling_equals_transformers_mean_of_last_hidden_states():
    hf = hf_tiny("llama", seed=3)
    model = memlm_twin(hf)
    inputs = [[5, 9, 2, 77, 31, 8, 1], [4], [100, 3, 3], [12, 44, 90, 6, 7, 8, 9, 10, 11, 12, 13]]
    ours = embed_token_lists(model, inputs, max_tokens=16)  # several batches, padded rows
    for row, ids in enumerate(inputs):
        with torch.no_grad():
            hidden = hf.model(torch.tensor([ids])).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
        torch.testing.assert_close(ours[row], expected, atol=2e-5, rtol=1e-4)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(inputs)))
    with pytest.raises(InvalidRequestError):
        embed_token_lists(model, [[1], []])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from memlm.formats.loading import save_model

    model = tiny_memlm(vocab_size=257, eos_token_ids=(256,), max_position_embeddings=64)
    folder = save_model(tmp_path_factory.mktemp("tiny") / "tiny", model, byte_tokenizer())
    with ServerProcess("--threads", "1", "--model", str(folder)) as s:
        yield s


def test_embeddings_api_shapes(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    texts = ["memory", "a longer sentence about memory and caches", "memory"]
    out = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    vectors = np.array([d.embedding for d in out.data])
    assert [d.index for d in out.data] == [0, 1, 2] and vectors.shape == (3, 64)
    assert np.allclose(vectors[0], vectors[2], atol=1e-6)  # the same text, batched with a longer one
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert out.usage.prompt_tokens == sum(len(t.encode()) for t in texts) == out.usage.total_tokens

    # The openai client asks for base64 by default and decodes it: the same vectors.
    default = client.embeddings.create(model="tiny", input=texts)
    assert np.allclose(np.array([d.embedding for d in default.data]), vectors, atol=1e-6)
    raw = httpx.post(server.url + "/v1/embeddings", json={"input": "memory", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-6)
    ids = httpx.post(server.url + "/v1/embeddings", json={"input": list(b"memory")}).json()
    assert np.allclose(ids["data"][0]["embedding"], vectors[0], atol=1e-6)  # token ids = the same text
    assert client.embeddings.create(model="tiny", input="memory", dimensions=64).data[0].embedding


@pytest.mark.parametrize(("body", "pattern"), [
    ({"input": ""}, "empty"),
    ({"input": []}, "input"),
    ({"input": "x" * 100}, "context"),
    ({"input": [1, 300]}, "token ids"),
    ({"input": [True]}, "input"),
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "model": "other"}, "other"),
])
def test_embeddings_errors(server, body, pattern):
    r = httpx.post(server.url + "/v1/embeddings", json=body)
    assert r.status_code in (400, 404) and pattern in r.json()["error"]["message"], r.text
