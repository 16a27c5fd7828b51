"""Many LoRA adapters in one batch (memlm.adapters.bank): rows with different adapters, and rows
with none, decode together and each equals its request run alone; the stacked forward equals the
adapter merged into the weights, on fp32 and on quantized weights (the native step included);
prefix blocks are never shared across adapters."""

import pytest
import torch

from conftest import lora_folders
from memlm.adapters.bank import AdapterBank, UnknownAdapterError
from memlm.adapters.lora import add_lora
from memlm.errors import MemlmError
from memlm.formats.loading import load_model
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams

NAMES = ("a", "b", "c")
PROMPTS = ["hello there", "the cat sat on", "one two three four five", "xyz"]
ROUTES = ["a", "b", "c", None]  # three adapters and the base, one row each


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny base model and adapters a, b (rank 4, every projection) and c (rank 2, attention only)."""
    return lora_folders(tmp_path_factory.mktemp("lora"), NAMES)


def _engine(folders, dtype="float32", **options) -> Engine:
    engine = Engine.load(str(folders / "base"), dtype=dtype, **options)
    for name in NAMES:
        engine.add_adapter(name, folders / name)
    return engine


def _together(engine, prompts, routes, params):
    requests = [engine.add_request(p, params, adapter=a) for p, a in zip(prompts, routes, strict=True)]
    while engine.has_unfinished:
        engine.step()
    return [r.completion() for r in requests]


@pytest.mark.parametrize("dtype", ["float32", "q8_0", "q4_1"])
def test_rows_with_different_adapters_batched_equal_each_alone(folders, dtype):
    engine = _engine(folders, dtype)
    if dtype != "float32":
        assert engine.model.native_decoder is not None  # the decode steps run natively
    params = SamplingParams(max_new_tokens=12, logprobs=0)
    alone = [engine.generate(p, params, adapter=a) for p, a in zip(PROMPTS, ROUTES, strict=True)]
    together = _together(engine, PROMPTS, ROUTES, params)
    for one, batched in zip(alone, together, strict=True):
        assert batched.token_ids == one.token_ids
        torch.testing.assert_close(torch.tensor(batched.logprobs), torch.tensor(one.logprobs), atol=1e-4, rtol=0)
    # Each adapter says something else than the base on the same prompt (the test can fail).
    answers = {a: engine.generate(PROMPTS[0], params, adapter=a).token_ids for a in ROUTES}
    assert len({tuple(ids) for ids in answers.values()}) == len(ROUTES)


@pytest.mark.parametrize("dtype", ["float32", "q4_1"])
def test_rows_joining_a_running_batch_with_other_adapters_equal_alone(folders, dtype):
    """Mixed steps: rows decoding while another joins, one per step (on q4_1 such short chunks run
    in the native step too)."""
    engine = _engine(folders, dtype)
    params = SamplingParams(max_new_tokens=10)
    alone = [engine.generate(p, params, adapter=a).token_ids for p, a in zip(PROMPTS, ROUTES, strict=True)]
    requests = []
    for prompt, adapter in zip(PROMPTS, ROUTES, strict=True):
        requests.append(engine.add_request(prompt, params, adapter=adapter))
        engine.step()
    while engine.has_unfinished:
        engine.step()
    assert [r.output_ids for r in requests] == alone


def _logits(model, ids, positions, cache):
    with torch.inference_mode():
        return model.logits(model.forward_tokens(ids, positions, cache))


@pytest.mark.parametrize("dtype", ["float32", "q8_0"])
def test_the_stacked_forward_equals_each_adapter_merged_for_its_row(folders, dtype):
    """Prefill (layer by layer) and two decode steps (native for q8_0) of four rows, adapters a, b, c
    and none, against a model with that row's adapter in its weights (merged in fp32; beside the
    quantized weights, unstacked, for q8_0: merging into blocks would round it away)."""
    engine = _engine(folders, dtype)
    model = engine.model
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (4, 7))
    steps = torch.randint(0, 256, (4, 2))
    cache = model.new_state(4, 16, adapters=[AdapterBank.of(model).index(a) for a in ROUTES])
    got = [_logits(model, ids, torch.arange(7).expand(4, 7), cache)[:, -1]]
    for t in range(2):
        got.append(_logits(model, steps[:, t : t + 1], torch.full((4, 1), 7 + t), cache)[:, -1])
    for row, name in enumerate(ROUTES):
        single = load_model(str(folders / name) if name else str(folders / "base"), dtype=dtype).model
        one = single.new_state(1, 16)
        want = [_logits(single, ids[row : row + 1], torch.arange(7)[None], one)[:, -1]]
        for t in range(2):
            want.append(_logits(single, steps[row : row + 1, t : t + 1], torch.full((1, 1), 7 + t), one)[:, -1])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g[row : row + 1], w, atol=2e-4, rtol=1e-4)


def test_the_native_step_equals_the_layer_by_layer_path_with_stacked_adapters(folders):
    engine = _engine(folders, "q4_1")
    model, native = engine.model, engine.model.native_decoder
    assert native is not None
    calls = []
    original = native.step
    native.step = lambda *a: calls.append(1) or original(*a)
    ids, step = torch.randint(0, 256, (4, 5)), torch.randint(0, 256, (4, 1))
    adapters = [AdapterBank.of(model).index(a) for a in ROUTES]
    results = []
    for decoder in (native, None):
        model.native_decoder = decoder
        cache = model.new_state(4, 16, adapters=adapters)
        _logits(model, ids, torch.arange(5).expand(4, 5), cache)
        results.append(_logits(model, step, torch.full((4, 1), 5), cache))
    model.native_decoder = native
    assert calls  # the native step ran the decode steps
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


def test_prefix_blocks_are_not_shared_across_adapters(folders):
    engine = _engine(folders)
    prompt = "a long shared prompt: " + "the quick brown fox jumps over the lazy dog. " * 3
    params = SamplingParams(max_new_tokens=4)
    fresh = {a: _engine(folders).generate(prompt, params, adapter=a).token_ids for a in ("a", "b", None)}
    first = engine.generate(prompt, params, adapter="a")
    assert first.cached_tokens == 0
    other = engine.generate(prompt, params, adapter="b")
    base = engine.generate(prompt, params)
    again = engine.generate(prompt, params, adapter="a")
    assert other.cached_tokens == 0 and base.cached_tokens == 0  # a's blocks were published, not shared
    assert again.cached_tokens >= engine.kv_pool.block_size  # the same adapter does reuse them
    assert (first.token_ids, other.token_ids, base.token_ids, again.token_ids) == (
        fresh["a"], fresh["b"], fresh[None], fresh["a"])


def test_unknown_and_bad_adapters_are_clear_errors(folders, tmp_path):
    engine = _engine(folders)
    assert sorted(engine.adapters) == list(NAMES)
    with pytest.raises(UnknownAdapterError, match="adapter 'nope' not found; registered: a, b, c"):
        engine.generate("hi", adapter="nope")
    with pytest.raises(MemlmError, match="registered already"):
        engine.add_adapter("a", folders / "a")
    with pytest.raises(MemlmError, match="without ':'"):
        engine.add_adapter("x:y", folders / "a")
    with pytest.raises(MemlmError, match="a LoRA of its own beside them"):  # a weaver's, say
        add_lora(engine.model, rank=2)
    plain = Engine.load(str(folders / "base"))
    add_lora(plain.model, rank=2)
    with pytest.raises(MemlmError, match="already carries a LoRA adapter"):
        plain.add_adapter("a", folders / "a")
    with pytest.raises(MemlmError, match="cannot read"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "adapter_config.json").write_text("{")
        engine.add_adapter("d", tmp_path / "empty")


def test_memlm_load_registers_adapters(folders):
    import memlm

    engine = memlm.load(str(folders / "base"), dtype="float32", adapters={"a": folders / "a"})
    assert list(engine.adapters) == ["a"]
    assert engine.generate("hi", SamplingParams(max_new_tokens=3), adapter="a").finish_reason == "length"


def test_the_bench_lora_pool_spreads_requests_over_the_adapters():
    from memlm.bench.serve import SERVED, request_pool

    pool = request_pool(None, "lora", ["x", "y", "z", "w"], max_tokens=8)
    assert len(pool) == 16 and [s.model for s in pool[:5]] == ["x", "y", "z", "w", "x"]
    assert all(s.extra == {"temperature": 0, "min_tokens": 8} for s in pool)
    assert {s.model for s in request_pool(None, "lora", None, 8)} == {SERVED}  # the base run: same requests


def test_stacked_peft_adapters_equal_transformers_with_peft(tmp_path):
    """Adapters made by `peft` itself (each of q, k, v, ... with its own A; one with rsLoRA): rows with
    adapter a, b and none in one forward equal transformers + peft running each alone."""
    import json

    import peft

    from conftest import byte_tokenizer, hf_tiny, memlm_twin
    from memlm.formats.loading import save_model

    hf = hf_tiny("llama", vocab_size=257)
    base = save_model(tmp_path / "base", memlm_twin(hf), byte_tokenizer())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 257, (3, 9))
    expected = []
    for i, (name, rslora) in enumerate((("a", False), ("b", True))):
        adapted = peft.get_peft_model(hf_tiny("llama", vocab_size=257), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, lora_dropout=0.0))
        torch.manual_seed(i)
        with torch.no_grad():
            for key, p in adapted.named_parameters():
                if "lora_" in key:
                    p.normal_(std=0.1)
        adapted.eval().save_pretrained(tmp_path / name)
        config = tmp_path / name / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(base)}))
        with torch.no_grad():
            expected.append(adapted(ids[i : i + 1]).logits)
    with torch.no_grad():
        expected.append(hf(ids[2:]).logits)
    engine = Engine.load(str(base))
    engine.add_adapter("a", tmp_path / "a")
    engine.add_adapter("b", tmp_path / "b")
    cache = engine.model.new_state(3, 16, adapters=[1, 2, 0])
    got = _logits(engine.model, ids, torch.arange(9).expand(3, 9), cache)
    torch.testing.assert_close(got, torch.cat(expected), atol=2e-5, rtol=1e-4)
