"""GGUF block formats run natively: dequantization against the gguf package, the kernels against
the reference on random and odd shapes, the native decode step against the layer-by-layer model,
loading GGUF blocks as they are, and the portable fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memlm.kernels as kernels
import tests.test_gguf as gguf_tests
from conftest import assert_qlinear_matches_dequantized, hf_tiny, tiny_memlm
from memlm.formats.loading import load_model
from memlm.models.native_decode import NativeDecoder
from memlm.quant.qlinear import QEmbedding, QLinear, quantize_model
from memlm.quant.qweight import FORMATS as ALL_FORMATS
from memlm.quant.qweight import QWeight, pack_quantized, unpack_quantized

# The 32-value formats split into columns; the raw-block formats (Q5_x, K-quants) are tests/test_kquants.py's.
FORMATS = {name: fmt for name, fmt in ALL_FORMATS.items() if not fmt.raw}

gguf = pytest.importorskip("gguf")
lib = kernels.native()
# Skipped only where the kernels cannot exist; where they can, a failed build fails these tests.
can_build = kernels.cpu_supports_kernels() and kernels.compiler() is not None
needs_native = pytest.mark.skipif(not can_build, reason="native kernels need x86-64 AVX2/FMA/F16C and a compiler")


def test_kernels_build_where_they_can():
    assert (lib is not None) == can_build


@needs_native
def test_the_richest_build_the_cpu_runs_is_the_one_loaded():
    """native() falls back to the AVX2 build when the richer one fails to compile: that must not
    hide a broken AVX-512 build (its panels are then the int8 path past NATIVE_MAX_ROWS)."""
    richest = kernels.best_variant()
    assert lib.mk_variant() == (1 if richest else 0)
    assert (lib.mk_panel_min_rows() > 0) == (richest == "avx512")


def _random_blocks(fmt, out: int, inp: int, seed: int) -> np.ndarray:
    """Arbitrary GGUF blocks (not only what a quantizer emits): random codes, random finite scales."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(out, inp // 32, fmt.block_bytes), dtype=np.uint8)
    scales = (rng.standard_normal((out, inp // 32, 2)) * 0.05).astype(np.float16).view(np.uint8)
    blocks[..., 0:2] = scales[..., 0:2]
    if fmt.has_min:
        blocks[..., 2:4] = scales[..., 2:4]
    return blocks.reshape(out, -1)


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS)
def test_dequantization_equals_gguf_bit_for_bit(fmt):
    raw = _random_blocks(fmt, 7, 96, seed=fmt.code)
    q = QWeight.from_gguf_blocks(raw, fmt, (7, 96))
    reference = gguf.quants.dequantize(raw, fmt.gguf_type).reshape(7, 96)
    assert np.array_equal(q.dequantize().numpy().view(np.uint32), reference.view(np.uint32))
    assert np.array_equal(q.to_gguf_blocks(), raw)  # the split layout holds the same bits
    rows = torch.tensor([6, 0, 3])
    assert torch.equal(q.dequantize(rows), q.dequantize()[rows])
    if lib is not None:  # the native dequantization too (no fused multiply-add)
        native = QLinear(q).dequantized_native(lib).numpy()
        assert np.array_equal(native.view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_is_the_gguf_quantizer_and_rows_fuse_exactly(fmt):
    w = torch.randn(10, 64)
    q = QWeight.quantize(w, fmt)
    assert np.array_equal(q.to_gguf_blocks(), gguf.quants.quantize(w.numpy(), FORMATS[fmt].gguf_type))
    a, b = q.split_rows((4, 6))
    fused = QWeight.cat([a, b])
    assert torch.equal(fused.dequantize(), q.dequantize())
    # Within a step of each block's scale: |max|/8 (Q4_0), range/15 (Q4_1), |max|/127 (Q8_0).
    step = w.view(10, 2, 32).abs().amax(-1, keepdim=True) * (2 / 15 if fmt.startswith("q4") else 1 / 127)
    assert ((q.dequantize() - w).view(10, 2, 32).abs() <= step * 1.01).all()


@needs_native
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 32), (37, 96), (576, 576), (193, 1536)])
def test_kernel_matches_reference_on_random_and_odd_shapes(fmt, shape):
    out, inp = shape
    q = QWeight.quantize(torch.randn(out, inp) * 0.1, fmt)
    assert_qlinear_matches_dequantized(q)


@needs_native
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("inp", [1536, 576, 96])
def test_quantized_activation_kernel_equals_its_reference(fmt, inp):
    """q8_0 activations: x rounded per 32-block to int8 (scale amax/127), then multiplied with the
    reference weights; the integer kernel must equal that product up to fp32 rounding. Rows of 48
    blocks run eight blocks at a time; at batch 1, rows of 18 (SmolLM2's width) and of 3 blocks
    run in memory order, 4 and 8 rows per span (37 rows leave a tail of 1 and 5), batches of them
    one block at a time. On an AVX-512 build 6 rows and more (16 for Q4_0 / Q4_1) run on 16-row
    panels: the 37 output rows are a pair of whole panels (tiles of 4 activation rows: 40 rows are
    ten, 17 four and a row) and a panel of 5 alone (tiles of 8, then the tail)."""
    out = 37
    torch.manual_seed(7)
    q = QWeight.quantize(torch.randn(out, inp) * 0.1, fmt)
    layer = QLinear(q, torch.randn(out))
    layer.activations = "q8_0"
    for rows in (1, 3, 8, 9, 16, 17, 40):
        x = torch.randn(rows, inp)
        x[0, 5] = 300.0  # a massive activation stays inside its own block
        blocks = x.view(rows, -1, 32)
        scale = blocks.abs().amax(-1, keepdim=True) / 127
        # x times the reciprocal scale, rounded half to even: the kernel's arithmetic exactly (a
        # division would round a few values near .5 the other way).
        rounded = (torch.round(blocks * (1 / scale)) * scale).view(rows, inp)
        integer = layer.native_max_rows() is None or rows <= layer.native_max_rows()  # else the fp32 GEMM
        want = F.linear((rounded if integer else x).double(), q.dequantize().double(), layer.bias.double())
        got = layer(x).double()
        assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item() + 1e-4


@needs_native
def test_long_chunks_with_int8_activations_stay_on_the_integer_kernels():
    """Past NATIVE_MAX_ROWS (a prefill), int8 activations keep Q4_0 / Q4_1 on the integer
    kernels, which beat dequantize + GEMM there, and so every format on an AVX-512 build (its
    16-row panels); elsewhere the other formats go to the fp32 GEMM: the output equals the
    rounded-activation product on one side and the exact one on the other."""
    panels = kernels.native().mk_panel_min_rows() > 0
    torch.manual_seed(3)
    x = torch.randn(100, 512)
    blocks = x.view(100, -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    rounded = (torch.round(blocks * (1 / scale)) * scale).view(100, 512).double()
    for name, native in (("q4_0", True), ("q4_1", True), ("q4_k", panels), ("q6_k", panels), ("q8_0", panels)):
        q = QWeight.quantize(torch.randn(24, 512) * 0.1, ALL_FORMATS[name])
        layer = QLinear(q)
        layer.activations = "q8_0"
        assert layer.native_max_rows() is None if native else layer.native_max_rows() == 32
        w = q.dequantize().double()
        exact, integer = F.linear(x.double(), w), F.linear(rounded, w)
        got = layer(x).double()
        want, other = (integer, exact) if native else (exact, integer)
        assert (got - want).abs().max() < 1e-4 * want.abs().max(), name
        assert (got - other).abs().max() > 1e-3 * want.abs().max(), name
        layer.activations = "float32"  # exact activations: the GEMM past 32 rows for every format
        assert layer.native_max_rows() == 32
        assert (layer(x).double() - exact).abs().max() < 1e-4 * exact.abs().max(), name


@needs_native
def test_embedding_lookup_dequantizes_the_rows_asked_for():
    q = QWeight.quantize(torch.randn(50, 64), "q8_0")
    ids = torch.tensor([[3, 49, 0], [3, 7, 7]])
    assert torch.equal(QEmbedding(q)(ids), q.dequantize()[ids])


def _quantized_twin(fmt: str, **overrides):
    """A tiny model quantized to `fmt`, and the fp32 model with exactly its dequantized weights."""
    model = tiny_memlm(seed=3, **overrides)
    reference = tiny_memlm(seed=3, **overrides)
    quantize_model(model, fmt)
    model.native_decoder = NativeDecoder.for_model(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QLinear | QEmbedding):
                reference.get_submodule(name).weight.copy_(module.qweight.dequantize())
    return model, reference


def _decode(model, prompts: list[list[int]], steps: int, track_attention=False):
    """Prefill ragged prompts (right-padded chunk), then greedy one-token steps -> (logits, cache)."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    cache = model.new_state(batch, 64, track_attention=track_attention)
    ids = torch.zeros(batch, longest, dtype=torch.long)
    positions = torch.full((batch, longest), -1)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], positions[i, : len(p)] = torch.tensor(p), torch.arange(len(p))
    hidden = model(model.embed(ids), positions, cache)
    last = torch.tensor([len(p) - 1 for p in prompts])
    logits = [model.logits(hidden[torch.arange(batch), last])]
    for _ in range(steps):
        token = logits[-1].argmax(-1)
        pos = cache.lengths.clone()[:, None]
        logits.append(model.logits(model(model.embed(token[:, None]), pos, cache)[:, 0]))
    return torch.stack(logits, 1), cache


@needs_native
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", [{}, {"arch": "qwen3", "qk_norm": True}, {"arch": "qwen2", "qkv_bias": True}])
def test_native_decode_matches_the_fp32_model_with_the_same_weights(fmt, arch):
    model, reference = _quantized_twin(fmt, **arch)
    assert model.native_decoder is not None
    prompts = [[5, 9, 2, 77, 31], [8, 1], [100, 3, 3, 3, 3, 3, 7]]  # rows of different lengths
    with torch.inference_mode():
        got, _ = _decode(model, prompts, steps=6)
        want, _ = _decode(reference, prompts, steps=6)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@needs_native
@pytest.mark.parametrize("activations", ["float32", "q8_0"])
def test_native_decode_batched_equals_one_by_one_and_records_attention(activations):
    from memlm.quant.qlinear import set_activations

    model, _ = _quantized_twin("q4_1")
    set_activations(model, activations)
    model.native_decoder = NativeDecoder.for_model(model)
    prompts = [[5, 9, 2, 77, 31], [8, 1], [100, 3, 3, 3, 3, 3, 7]]
    with torch.inference_mode():
        batched, cache = _decode(model, prompts, steps=5, track_attention=True)
        for i, p in enumerate(prompts):
            alone, _ = _decode(model, [p], steps=5)
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)
        # The layer-by-layer path (same quantized layers) records the same attention statistics.
        native = model.native_decoder
        model.native_decoder = None
        _, slow_cache = _decode(model, prompts, steps=5, track_attention=True)
        model.native_decoder = native
    torch.testing.assert_close(cache.attention_sum, slow_cache.attention_sum, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cache.attention_last, slow_cache.attention_last, atol=1e-5, rtol=1e-4)
    assert torch.equal(cache.lengths, slow_cache.lengths)


def test_portable_fallback_is_chosen_and_agrees(monkeypatch, capsys):
    model, reference = _quantized_twin("q8_0")
    prompts = [[5, 9, 2], [8, 1, 4, 4]]
    monkeypatch.setenv("MEMLM_NATIVE", "0")
    kernels.native.cache_clear()
    try:
        assert kernels.native() is None
        assert NativeDecoder.for_model(model) is None
        model.native_decoder = None
        with torch.inference_mode():
            got, _ = _decode(model, prompts, steps=4)
            want, _ = _decode(reference, prompts, steps=4)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        kernels.native.cache_clear()


def test_no_compiler_falls_back_with_a_one_line_notice(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MEMLM_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setattr(kernels, "cpu_supports_kernels", lambda: True)
    kernels.native.cache_clear()
    try:
        assert kernels.native() is None
    finally:
        kernels.native.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "portable quantized path" in err[0]
    assert not list(tmp_path.glob("kernels/*.so"))  # nothing half-written left behind


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory):
    """A tiny GGUF whose matrices are all stored in native formats (Q4_1 and Q8_0)."""
    storage = dict.fromkeys(gguf_tests.STORAGE, gguf.GGMLQuantizationType.Q4_1)
    storage.update(attn_output=gguf.GGMLQuantizationType.Q8_0, token_embd=gguf.GGMLQuantizationType.Q8_0)
    hf = hf_tiny("llama", vocab_size=257, hidden_size=64, intermediate_size=128, head_dim=16, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("qgguf") / "tiny-q.gguf"
    saved = gguf_tests.STORAGE
    gguf_tests.STORAGE = storage
    try:
        stored = gguf_tests.write_tiny_gguf(path, hf)
    finally:
        gguf_tests.STORAGE = saved
    return path, stored


def test_gguf_blocks_are_used_as_they_are(quantized_gguf):
    path, stored = quantized_gguf
    quantized = load_model(str(path), dtype="auto")  # each tensor in the file's own format
    reference = load_model(str(path), dtype="float32")
    model = quantized.model
    assert isinstance(model.embed_tokens, QEmbedding) and model.embed_tokens.qweight.format.name == "q8_0"
    assert np.array_equal(model.lm_head.qweight.to_gguf_blocks(), stored["output.weight"][0])
    down = model.layers[1].mlp.down_proj.qweight
    assert down.format.name == "q4_1"
    assert np.array_equal(down.to_gguf_blocks(), stored["blk.1.ffn_down.weight"][0])
    assert model.layers[0].self_attn.o_proj.qweight.format.name == "q8_0"
    assert quantized.num_parameters == reference.num_parameters
    ids = torch.randint(0, 257, (1, 12))
    with torch.inference_mode():
        got = model.logits(model(model.embed(ids), torch.arange(12)[None]))
        want = reference.model.logits(reference.model(reference.model.embed(ids), torch.arange(12)[None]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_quantized_weights_round_trip_through_safetensors_metadata():
    weights = {"a.weight": QWeight.quantize(torch.randn(4, 64), "q4_1"), "b": torch.randn(3)}
    tensors, metadata = pack_quantized(weights)
    back = unpack_quantized(tensors, metadata)
    assert torch.equal(back["b"], weights["b"])
    assert back["a.weight"].shape == (4, 64)
    assert torch.equal(back["a.weight"].dequantize(), weights["a.weight"].dequantize())


def test_bad_dtype_is_a_clear_error():
    from memlm.errors import MemlmError

    with pytest.raises(MemlmError, match="unknown dtype"):
        load_model("tiny-test", dtype="q7_k")


@needs_native
@pytest.mark.embedded
def test_embedded_q4_1_decodes_as_its_fp32_dequantized_model():
    """The embedded Q4_1 file run on its own blocks against the same file dequantized to fp32: the
    kernels multiply the reference weights exactly and differ from fp32 GEMM only in summation
    order, so logits agree to ~1e-4 (atol 1e-3 over 30 layers) and greedy output is identical."""
    import memlm

    fast, reference = memlm.load("smollm2-135m-instruct", dtype="q4_1"), memlm.load("smollm2-135m-instruct")
    assert fast.model.native_decoder is not None
    params = memlm.SamplingParams(max_new_tokens=24, min_new_tokens=24)
    prompts = [fast.tokenizer.encode(p) for p in ("The capital of France is", "def fibonacci(n):")]
    got = [c.token_ids for c in fast.generate_tokens(prompts, params)]
    want = [c.token_ids for c in reference.generate_tokens(prompts, params)]
    assert got == want
    ids = torch.tensor([prompts[0]])
    with torch.inference_mode():
        positions = torch.arange(ids.shape[1])[None]
        a, b = (e.model.logits(e.model(e.model.embed(ids), positions)) for e in (fast, reference))
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def _engines(fmt: str = "q4_1"):
    """An Engine on a tiny quantized model and one on the fp32 model with its dequantized weights."""
    from conftest import byte_tokenizer
    from memlm.generation.engine import Engine

    model, reference = _quantized_twin(fmt, vocab_size=257, eos_token_ids=(256,))
    return Engine(model, byte_tokenizer(), name="q"), Engine(reference, byte_tokenizer(), name="f")


@needs_native
@pytest.mark.parametrize("policy", ["window", "sinks", "h2o", "tova", "clear", "learned"])
def test_engine_with_eviction_policies_on_the_native_path(policy, monkeypatch):
    from memlm.cache import make_policy
    from memlm.generation.params import SamplingParams

    fast, reference = _engines()
    steps = _count_native_steps(monkeypatch)
    prompts = ["abc", "brown fox", "xyz xyz"]
    params = SamplingParams(max_new_tokens=24, min_new_tokens=24)
    options = {}
    if policy == "learned":  # DynTS: an importance predictor on the final hidden states
        from memlm.cache.importance import ImportancePredictor

        torch.manual_seed(0)
        options = {"predictor": ImportancePredictor(64), "window": 4}
    got = fast.generate(prompts, params, kv_policy=make_policy(policy, 16, **options))
    want = reference.generate(prompts, params, kv_policy=make_policy(policy, 16, **options))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert steps  # the native step served the decode steps


def _count_native_steps(monkeypatch) -> list:
    calls, step = [], NativeDecoder.step
    monkeypatch.setattr(NativeDecoder, "step", lambda self, *a: calls.append(1) or step(self, *a))
    return calls


@needs_native
def test_latent_memory_weaver_lora_runs_beside_quantized_weights(monkeypatch):
    """The weaver's LoRA wraps QLinear layers; the native step stands aside while an adapter is on."""
    from memlm.adapters.lora import lora_layers
    from memlm.generation.params import SamplingParams
    from tests.test_latent import _memory

    fast, reference = _engines()
    steps = _count_native_steps(monkeypatch)
    memories = [_memory(e, seed=1) for e in (fast, reference)]
    with torch.no_grad():  # the same adapters and projections in both
        for (_, a), (_, b) in zip(lora_layers(fast.model), lora_layers(reference.model), strict=True):
            a.lora_a.copy_(b.lora_a), a.lora_b.copy_(b.lora_b)
        for pa, pb in zip(memories[0].weaver.parameters(), memories[1].weaver.parameters(), strict=True):
            if pa.shape == pb.shape and pa is not pb:
                pa.copy_(pb)
    assert any(isinstance(layer.base, QLinear) for _, layer in lora_layers(fast.model))
    params = SamplingParams(max_new_tokens=20, min_new_tokens=20)
    prompts = ["12+34=", "a. b, c."]
    got = fast.generate(prompts, params, memory=memories[0])
    want = reference.generate(prompts, params, memory=memories[1])
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert steps and all(c.insertions for c in got)  # latents went in, and plain steps ran natively


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_an_adapter_runs_beside_quantized_weights(tmp_path, fmt):
    """A fine-tune's delta is small next to a 4-bit block's step: merged into the blocks it rounds
    away; beside them it stays, changing the quantized model's logits as it changes fp32's."""
    from conftest import byte_tokenizer, memlm_twin
    from memlm.adapters.lora import LoRALinear, add_lora, lora_layers, save_adapter
    from memlm.formats.loading import save_model

    hf = hf_tiny("llama", vocab_size=257, hidden_size=64, intermediate_size=128, head_dim=16)
    base = save_model(tmp_path / "base", memlm_twin(hf), byte_tokenizer())
    model = load_model(str(base)).model
    add_lora(model, rank=4)
    torch.manual_seed(0)
    for _, layer in lora_layers(model):
        layer.lora_b.data.normal_(std=0.002)  # a small, fine-tune-sized delta
    save_adapter(tmp_path / "adapter", model, {"base_model": str(base)}, dtype=torch.float32)
    quantized = load_model(str(tmp_path / "adapter"), dtype=fmt).model
    qkv = quantized.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, LoRALinear) and isinstance(qkv.base, QLinear) and qkv.rank == 12  # q, k, v: 3 x 4
    ids = torch.randint(0, 257, (2, 9))

    def logits(m):
        with torch.inference_mode():
            return m.logits(m(m.embed(ids), torch.arange(9).expand(2, 9)))

    quantized_base = logits(load_model(str(base), dtype=fmt).model)
    wanted = logits(load_model(str(tmp_path / "adapter")).model) - logits(load_model(str(base)).model)
    beside = logits(quantized) - quantized_base
    merged = logits(quantize_model(load_model(str(tmp_path / "adapter")).model, fmt)) - quantized_base
    error = (beside - wanted).abs().mean() / wanted.abs().mean()
    assert error < (0.3 if fmt == "q4_1" else 0.05)
    if fmt == "q4_1":  # what merging would have cost
        assert (merged - wanted).abs().mean() / wanted.abs().mean() > 0.5


def test_embedded_style_block_folder_is_written_once_and_loads_the_same(tmp_path, monkeypatch):
    from memlm.formats import loading
    from memlm.formats.loading import EmbeddedModel

    hf = hf_tiny("llama", vocab_size=257, hidden_size=64, intermediate_size=128, head_dim=16)
    path = tmp_path / "pkg" / "tiny.gguf"
    path.parent.mkdir()
    storage = dict.fromkeys(gguf_tests.STORAGE, gguf.GGMLQuantizationType.Q4_0)
    monkeypatch.setattr(gguf_tests, "STORAGE", storage)
    gguf_tests.write_tiny_gguf(path, hf)
    monkeypatch.setattr(EmbeddedModel, "path", lambda self: path)
    monkeypatch.setitem(loading.EMBEDDED, "tiny-q", EmbeddedModel("none", "none==0", "tiny.gguf"))
    monkeypatch.setenv("MEMLM_HOME", str(tmp_path / "home"))
    first = load_model("tiny-q", dtype="q4_0:q8_0")
    assert sorted(p.name for p in (tmp_path / "home" / "models").iterdir()) == ["tiny-q-gguf-blocks"]
    monkeypatch.setattr(loading, "read_gguf", lambda *a, **k: pytest.fail("the GGUF is parsed only once"))
    second = load_model("tiny-q", dtype="q4_0:q8_0")
    assert first.dtype == "q4_0:q8_0" and second.model.layers[0].mlp.down_proj.activations == "q8_0"
    ids = torch.randint(0, 257, (2, 9))
    with torch.inference_mode():
        a, b = (m.model.logits(m.model(m.model.embed(ids), torch.arange(9).expand(2, 9))) for m in (first, second))
    assert torch.equal(a, b)


@needs_native
@pytest.mark.skipif(kernels.best_variant() is None, reason="this CPU runs only the AVX2 build")
def test_the_avx512_build_equals_the_avx2_build_bit_for_bit_on_the_row_kernels():
    """Up to 5 rows (15 for Q4_0 / Q4_1) both builds run the same row kernels, vpdpbusd in place
    of maddubs + madd: identical results. From there the AVX-512 build's panels take over (their
    sums in another order), which the reference tests check."""
    import ctypes

    builds = []
    for variant in (None, kernels.best_variant()):
        path = kernels.library_path(variant)
        if not path.is_file():
            kernels.build(path, variant)
        lib_ = ctypes.CDLL(str(path))
        kernels._declare(lib_)
        builds.append(lib_)
    assert [b.mk_variant() for b in builds] == [0, 1]
    for fmt in FORMATS:
        layer = QLinear(QWeight.quantize(torch.randn(40, 320), fmt))
        x = torch.randn(8, 320)
        outs = []
        for b in builds:
            for rows in (1, 5):
                y = torch.empty(rows, 40)
                b.mk_matmul(ctypes.byref(layer._desc), x.data_ptr(), rows, 320, y.data_ptr(), 40, 1)
                outs.append(y)
        assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3]), fmt


@needs_native
def test_short_padded_chunks_run_natively_and_equal_the_layer_by_layer_path(monkeypatch):
    """A mixed step: one row feeds a token while another inserts six (right-padded chunk)."""
    model, _ = _quantized_twin("q4_1")
    steps = _count_native_steps(monkeypatch)

    def run(native: bool):
        saved, model.native_decoder = model.native_decoder, model.native_decoder if native else None
        try:
            cache = model.new_state(2, 32)
            with torch.inference_mode():
                model(model.embed(torch.tensor([[3, 4, 5], [6, 7, 0]])), torch.tensor([[0, 1, 2], [0, 1, -1]]), cache)
                embeds = model.embed(torch.tensor([[9, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]]))
                positions = torch.tensor([[3, -1, -1, -1, -1, -1], [2, 3, 4, 5, 6, 7]])
                return model(embeds, positions, cache), cache
        finally:
            model.native_decoder = saved

    (fast, fast_cache), (slow, slow_cache) = run(True), run(False)
    assert len(steps) == 2  # both chunks of the native run went through the native step
    real = torch.tensor([[1, 0, 0, 0, 0, 0], [1] * 6], dtype=torch.bool)
    torch.testing.assert_close(fast[real], slow[real], atol=1e-5, rtol=1e-4)
    assert fast[~real].abs().max() == 0
    assert torch.equal(fast_cache.lengths, slow_cache.lengths)
    for row, length in enumerate(fast_cache.lengths.tolist()):  # the live slots (padding is never kept)
        for a, b in ((fast_cache.k, slow_cache.k), (fast_cache.v, slow_cache.v)):
            torch.testing.assert_close(a[:, row, :, :length], b[:, row, :, :length], atol=1e-5, rtol=1e-4)
    assert fast_cache.lengths.tolist() == [4, 8]
