"""End to end on the embedded SmolLM2-135M-Instruct: memlm against transformers on the same weights."""

import pytest
import torch

from memlm.formats.loading import EMBEDDED
from memlm.generation.params import SamplingParams

pytestmark = pytest.mark.embedded

CHATS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "List three uses of a paperclip.",
]


@pytest.fixture(scope="module")
def hf_model(embedded_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_folder, dtype=torch.float32).eval()


def _prompts(engine):
    return [engine.encode_prompt([{"role": "user", "content": c}]) for c in CHATS]


def test_logits_match_transformers(embedded_engine, hf_model):
    model = embedded_engine.model
    ids = torch.tensor([_prompts(embedded_engine)[0]])
    with torch.no_grad():
        expected = hf_model(ids).logits
    got = model.logits(model(model.embed(ids), torch.arange(ids.shape[1])[None]))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers_single_and_batched(embedded_engine, hf_model):
    prompts = _prompts(embedded_engine)
    n = 32
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n)
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    hf_batched = hf_model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=2
    )[:, longest:].tolist()
    hf_single = hf_model.generate(torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    assert embedded_engine.generate_tokens(prompts[:1], params)[0].token_ids == hf_single[0, len(prompts[0]) :].tolist()
    assert [c.token_ids for c in embedded_engine.generate_tokens(prompts, params)] == hf_batched


def test_chat_answer_is_sensible(embedded_engine):
    c = embedded_engine.generate([{"role": "user", "content": CHATS[0]}], SamplingParams(max_new_tokens=20))
    assert "Paris" in c.text and c.finish_reason == "stop"


def test_conversion_agrees_with_transformers_own_gguf_loader(embedded_engine):
    """An independent reading of the GGUF file (transformers' converter): dequantization, the Q/K
    un-permutation and the tokenizer must all agree with memlm's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = EMBEDDED["smollm2-135m-instruct"].path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [
        "Hello, world! It's 2026-11-22 and π ≈ 3.14159.",
        "  leading spaces\n\ttabs and\r\nnewlines  ",
        "<|im_start|>user\nnaïve café 日本語 🙂<|im_end|>",
        "def f(x):\n    return x ** 2  # comment",
    ]
    for text in texts:
        assert embedded_engine.tokenizer.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text
    ids = torch.tensor([embedded_engine.tokenizer.encode(texts[0] + " " + texts[3])])
    model = embedded_engine.model
    with torch.no_grad():
        expected = hf(ids).logits
    got = model.logits(model(model.embed(ids), torch.arange(ids.shape[1])[None]))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
