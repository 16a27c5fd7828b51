"""The raw-block formats (Q5_0, Q5_1, Q2_K..Q6_K): dequantization against the gguf package bit for
bit, the kernels against the reference on random and odd shapes, memlm's K-quant quantizer, rows of
mixed formats, GGUF files of mixed types run on their own blocks (`auto`), conversions, and
`memlm quantize` writing files that read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memlm.kernels as kernels
import tests.test_gguf as gguf_tests
from conftest import assert_qlinear_matches_dequantized, hf_tiny
from memlm.formats.loading import load_model
from memlm.quant.kquants import quantize_blocks
from memlm.quant.mix import plan, scheme, use_more_bits
from memlm.quant.qlinear import QEmbedding, QLinear, quantize_model
from memlm.quant.qweight import FORMATS, QWeight, format_for_width, pack_quantized, unpack_quantized

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
lib = kernels.native()
can_build = kernels.cpu_supports_kernels() and kernels.compiler() is not None
needs_native = pytest.mark.skipif(not can_build, reason="native kernels need x86-64 AVX2/FMA/F16C and a compiler")

RAW = {name: fmt for name, fmt in FORMATS.items() if fmt.raw}
# Byte offsets of each block's f16 scales (the rest of a block is arbitrary codes and sub-scales).
F16_AT = {"q5_0": [0], "q5_1": [0, 2], "q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}


def random_blocks(name: str, out: int, inp: int, seed: int) -> np.ndarray:
    """Arbitrary blocks (every code and sub-scale pattern, not only a quantizer's): random bytes,
    with random finite f16 scales of both signs."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(out, inp // fmt.block_size, fmt.block_bytes), dtype=np.uint8)
    for at in F16_AT[name]:
        scales = (rng.standard_normal((out, inp // fmt.block_size, 1)) * 0.05).astype(np.float16)
        raw[..., at : at + 2] = scales.view(np.uint8)
    return raw.reshape(out, -1)


def _gguf_reference(raw: np.ndarray, name: str, shape) -> np.ndarray:
    return gguf.quants.dequantize(raw, FORMATS[name].gguf_type).reshape(shape)


@pytest.mark.parametrize("name", RAW)
@pytest.mark.parametrize("shape", [(1, 256), (3, 512), (7, 768)])
def test_dequantization_equals_gguf_bit_for_bit(name, shape):
    raw = random_blocks(name, *shape, seed=FORMATS[name].code * 100 + shape[0])
    q = QWeight.from_gguf_blocks(raw, FORMATS[name], shape)
    reference = _gguf_reference(raw, name, shape)
    assert np.array_equal(q.dequantize().numpy().view(np.uint32), reference.view(np.uint32))
    assert np.array_equal(q.to_gguf_blocks(), raw)
    rows = torch.tensor([shape[0] - 1, 0])
    assert torch.equal(q.dequantize(rows), q.dequantize()[rows])
    if lib is not None:  # the native decoding of the same bytes, with no fused multiply-add
        native = QLinear(q).dequantized_native(lib).numpy()
        assert np.array_equal(native.view(np.uint32), reference.view(np.uint32))
        assert torch.equal(QEmbedding(q)(rows[None])[0], q.dequantize(rows))


@needs_native
@pytest.mark.parametrize("name", RAW)
@pytest.mark.parametrize("shape", [(1, 256), (37, 512), (193, 1536)])
def test_kernel_matches_reference_on_random_and_odd_shapes(name, shape):
    out, inp = shape
    q = QWeight.from_gguf_blocks(random_blocks(name, out, inp, seed=out), FORMATS[name], shape)
    assert_qlinear_matches_dequantized(q)


def _rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded per 32-block to int8 (scale amax/127), as the kernels' q8_0 path does."""
    blocks = x.view(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks * (1 / scale)) * scale).view_as(x)


@needs_native
@pytest.mark.parametrize(
    ("name", "inp"),
    # 1536: whole groups of eight 32-value blocks; 640 (Gemma 3's width, 20 blocks) and 576
    # (SmolLM2's, 18) end with blocks the 32-value formats' kernels take one at a time in batches,
    # and walk in memory order, 2 or 4 rows per span, at batch 1
    [(name, 1536) for name in RAW] + [(name, w) for name in RAW if RAW[name].block_size == 32 for w in (640, 576)],
)
def test_quantized_activation_kernel_equals_its_reference(name, inp):
    out = 37
    q = QWeight.from_gguf_blocks(random_blocks(name, out, inp, seed=5), FORMATS[name], (out, inp))
    layer = QLinear(q, torch.randn(out))
    layer.activations = "q8_0"
    torch.manual_seed(7)
    for rows in (1, 3, 8, 9, 17, 40):  # from 6 rows on an AVX-512 build: its 16-row panels
        x = torch.randn(rows, inp)
        x[0, 5] = 300.0  # a massive activation stays inside its own block
        integer = layer.native_max_rows() is None or rows <= layer.native_max_rows()  # else the fp32 GEMM
        xin = _rounded_activations(x) if integer else x
        want = F.linear(xin.double(), q.dequantize().double(), layer.bias.double())
        got = layer(x).double()
        assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item() + 1e-4


# ---- memlm's quantizer --------------------------------------------------------------------------


def _relative_rmse(name: str, w: np.ndarray) -> float:
    blocks = quantize_blocks(w, name)
    back = QWeight.from_gguf_blocks(blocks, FORMATS[name], w.shape).dequantize().numpy()
    assert np.array_equal(back, _gguf_reference(blocks, name, w.shape))  # valid blocks, as gguf reads them
    return float(np.sqrt(np.mean((back - w) ** 2) / np.mean(w**2)))


def test_k_quantizer_is_more_accurate_than_the_32_value_formats_at_the_same_bits():
    """Q4_K (4.5 bits) beats Q4_0 (4.5 bits) on Gaussian weights, Q5_K beats Q5_0, and more bits
    are more accurate; a search that went wrong (a bad refit, a swapped scale) fails these."""
    w = (np.random.default_rng(0).standard_normal((64, 1024)) * 0.02).astype(np.float32)
    err = {name: _relative_rmse(name, w) for name in ("q4_0", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")}
    assert err["q4_k"] < 0.9 * err["q4_0"] and err["q5_k"] < 0.9 * err["q5_0"]
    assert err["q8_0"] < err["q6_k"] < err["q5_k"] < err["q4_k"] < 0.1


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k"])
def test_k_quantizer_edge_rows(name):
    """Zero rows, constant rows, one huge value, all-positive rows: finite, and zeros stay zero."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((5, 512)) * 0.02).astype(np.float32)
    w[0] = 0.0
    w[1] = 0.37
    w[2, 17] = 40.0
    w[3] = np.abs(w[3]) + 0.1
    blocks = quantize_blocks(w, name)
    back = QWeight.from_gguf_blocks(blocks, FORMATS[name], w.shape).dequantize().numpy()
    assert np.isfinite(back).all() and (back[0] == 0).all()
    assert np.abs(back[2, 17] - 40.0) < 0.05 * 40.0
    for row in (1, 3, 4):
        assert np.sqrt(np.mean((back[row] - w[row]) ** 2)) < 0.1 * np.sqrt(np.mean(w[row] ** 2))


def test_quantize_rejects_rows_that_are_not_super_blocks_and_models_fall_back():
    from memlm.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match="multiple of 256"):
        QWeight.quantize(torch.randn(4, 96), "q4_k")
    assert [format_for_width(f, 576) for f in ("q4_k", "q5_k", "q6_k", "q4_1")] == ["q5_0", "q5_1", "q8_0", "q4_1"]
    assert format_for_width("q4_k", 40) is None
    from conftest import tiny_memlm

    model = quantize_model(tiny_memlm(seed=2, intermediate_size=256), "q4_k")  # hidden 64, FFN 256
    assert model.layers[0].mlp.down_proj.qweight.format.name == "q4_k"
    assert model.layers[0].mlp.gate_up_proj.qweight.format.name == "q5_0"


# ---- rows of mixed formats ------------------------------------------------------------------------


def _mixed(inp=512):
    torch.manual_seed(3)
    parts = [
        QWeight.quantize(torch.randn(24, inp) * 0.05, "q4_k"),
        QWeight.quantize(torch.randn(8, inp) * 0.05, "q4_k"),
        QWeight.quantize(torch.randn(9, inp) * 0.05, "q6_k"),
        QWeight.quantize(torch.randn(7, inp) * 0.05, "q8_0"),
        QWeight.quantize(torch.randn(5, inp) * 0.05, "q5_0"),
    ]
    return parts, QWeight.cat(parts)


def test_mixed_rows_keep_each_format_and_dequantize_exactly():
    parts, mixed = _mixed()
    assert mixed.formats == ("q4_k", "q6_k", "q8_0", "q5_0")  # consecutive parts of one format join
    assert mixed.shape == (53, 512)
    assert torch.equal(mixed.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert [p.shape[0] for p in mixed.split_rows((32, 9, 7, 5))] == [32, 9, 7, 5]
    assert mixed.nbytes == sum(p.nbytes for p in parts)


@needs_native
@pytest.mark.parametrize("activations", ["float32", "q8_0"])
def test_mixed_rows_multiply_like_the_reference(activations):
    _, mixed = _mixed()
    bias = torch.randn(53)
    layer = QLinear(mixed, bias)
    layer.activations = activations
    reference = mixed.dequantize().double()
    for rows in (1, 4, 9, 40):  # 9 and 40 with int8 activations: each part's panels on AVX-512
        x = torch.randn(rows, 512)
        integer = activations == "q8_0" and (layer.native_max_rows() is None or rows <= layer.native_max_rows())
        xin = _rounded_activations(x) if integer else x
        want = F.linear(xin.double(), reference, bias.double())
        got = layer(x).double()
        assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item() + 1e-5
    rows = torch.tensor([52, 0, 33, 40])  # rows in every part
    assert torch.equal(layer.dequantized_native(lib)[rows], mixed.dequantize(rows))


def test_raw_formats_round_trip_through_safetensors_metadata():
    weights = {"a.weight": QWeight.quantize(torch.randn(4, 256), "q6_k"), "b": torch.randn(3)}
    tensors, metadata = pack_quantized(weights)
    back = unpack_quantized(tensors, metadata)
    assert back["a.weight"].shape == (4, 256) and back["a.weight"].format.name == "q6_k"
    assert torch.equal(back["a.weight"].dequantize(), weights["a.weight"].dequantize())


# ---- GGUF files of mixed types ------------------------------------------------------------------

# A Q4_K_M-like layout at widths where K-quants fit (hidden 256, FFN 512): q/k in Q4_K, v in Q6_K,
# o in Q5_0, gate in Q5_K, up in Q4_K, down in Q6_K, embeddings in Q8_0, output in Q6_K.
MIXED_STORAGE = {
    "attn_q": Q.Q4_K,
    "attn_k": Q.Q4_K,
    "attn_v": Q.Q6_K,
    "attn_output": Q.Q5_0,
    "ffn_gate": Q.Q5_K,
    "ffn_up": Q.Q4_K,
    "ffn_down": Q.Q6_K,
    "token_embd": Q.Q8_0,
    "output": Q.Q6_K,
}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    hf = hf_tiny("llama", vocab_size=257, hidden_size=256, intermediate_size=512, head_dim=64,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    path = tmp_path_factory.mktemp("kgguf") / "tiny-mixed.gguf"
    saved, saved_quantize = gguf_tests.STORAGE, gguf.quants.quantize

    def quantize_any(array, kind):  # the K-types are memlm's quantizer (gguf has none)
        k = kind.name.lower()
        return quantize_blocks(array, k) if k.endswith("_k") else saved_quantize(array, kind)

    gguf_tests.STORAGE = MIXED_STORAGE
    gguf.quants.quantize = quantize_any
    try:
        stored = gguf_tests.write_tiny_gguf(path, hf)
    finally:
        gguf_tests.STORAGE, gguf.quants.quantize = saved, saved_quantize
    return hf, path, stored


@needs_native
def test_auto_runs_a_mixed_file_on_its_own_blocks(mixed_gguf):
    import memlm

    _, path, stored = mixed_gguf
    engine = memlm.load(str(path))  # dtype auto, the default
    reference = load_model(str(path), dtype="float32").model
    model = engine.model
    layer = model.layers[1]
    assert layer.self_attn.qkv_proj.qweight.formats == ("q4_k", "q6_k")
    assert layer.mlp.gate_up_proj.qweight.formats == ("q5_k", "q4_k")
    assert layer.mlp.down_proj.qweight.format.name == "q6_k"
    assert np.array_equal(layer.mlp.down_proj.qweight.to_gguf_blocks(), stored["blk.1.ffn_down.weight"][0])
    assert model.lm_head.qweight.format.name == "q6_k" and model.embed_tokens.qweight.format.name == "q8_0"
    assert model.native_decoder is not None
    ids = torch.randint(0, 257, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    with torch.inference_mode():
        got = model.logits(model(model.embed(ids), positions))
        want = reference.logits(reference(reference.embed(ids), positions))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    params = memlm.SamplingParams(max_new_tokens=12, min_new_tokens=12)
    prompts = [[5, 9, 200, 3], [17, 1]]
    want_tokens = [c.token_ids for c in memlm.load(str(path), dtype="float32").generate_tokens(prompts, params)]
    assert [c.token_ids for c in engine.generate_tokens(prompts, params)] == want_tokens


def test_auto_is_float32_for_folders_and_named_formats_convert(mixed_gguf, tmp_path):
    _, path, _ = mixed_gguf
    converted = load_model(str(path), dtype="q4_k").model
    layer = converted.layers[0]
    assert layer.self_attn.qkv_proj.qweight.formats == ("q4_k",) and layer.mlp.down_proj.qweight.format.name == "q4_k"
    assert converted.embed_tokens.qweight.format.name == "q8_0"  # 8-bit embeddings are not rounded again
    q8 = load_model(str(path), dtype="q8_0").model
    assert q8.layers[0].mlp.down_proj.qweight.format.name == "q8_0"
    hf = hf_tiny("llama")
    hf.save_pretrained(tmp_path / "hf")
    from conftest import byte_tokenizer

    byte_tokenizer().save(tmp_path / "hf")
    assert load_model(str(tmp_path / "hf"), dtype="auto").dtype == "auto"
    assert not any(isinstance(m, QLinear) for m in load_model(str(tmp_path / "hf"), dtype="auto").model.modules())


# ---- memlm quantize ---------------------------------------------------------------------------


def test_type_mix_follows_llama_cpp():
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    tensors = [("token_embd.weight", (300, 256)), ("output.weight", (300, 256)), ("output_norm.weight", (256,))]
    for i in range(8):
        tensors += [(f"blk.{i}.attn_v.weight", (64, 256)), (f"blk.{i}.ffn_down.weight", (256, 512)),
                    (f"blk.{i}.attn_q.weight", (256, 576))]  # fmt: skip
    got = plan(tensors, scheme("q4_k_m"))
    assert got["output.weight"] == "q6_k" and got["token_embd.weight"] == "q4_k" and got["output_norm.weight"] == "f32"
    assert [i for i in range(8) if got[f"blk.{i}.attn_v.weight"] == "q6_k"] == [0, 3, 6, 7]
    assert [i for i in range(8) if got[f"blk.{i}.ffn_down.weight"] == "q6_k"] == [0, 3, 6, 7]
    assert got["blk.0.attn_q.weight"] == "q5_0"  # 576 is not a whole number of super-blocks
    tied = plan([t for t in tensors if t[0] != "output.weight"], scheme("Q8_0"))
    assert tied["token_embd.weight"] == "q8_0" and tied["blk.2.ffn_down.weight"] == "q8_0"
    assert plan(tensors, scheme("Q6_K"))["token_embd.weight"] == "q6_k"


def test_quantize_a_gguf_file_reads_back_with_each_tensors_format(mixed_gguf, tmp_path):
    from memlm.formats.gguf_writer import quantize_file

    _, path, _ = mixed_gguf
    out = tmp_path / "q4km.gguf"
    summary = quantize_file(str(path), out, scheme("Q4_K_M"))
    source, written = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(out))
    assert written.fields["general.file_type"].contents() == 15
    assert written.fields["tokenizer.ggml.tokens"].contents() == source.fields["tokenizer.ggml.tokens"].contents()
    types = {t.name: t.tensor_type.name.lower() for t in written.tensors}
    shapes = [(t.name, tuple(int(d) for d in reversed(t.shape))) for t in source.tensors]
    assert types == {n: ("f32" if f == "f32" else f) for n, f in plan(shapes, scheme("Q4_K_M")).items()}
    assert sum(summary["formats"].values()) == len(types)
    for t in written.tensors:  # the bytes dequantize (gguf's reference) near the source's values
        if t.tensor_type != Q.F32:
            src = next(s for s in source.tensors if s.name == t.name)
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            b = gguf.quants.dequantize(src.data, src.tensor_type)
            assert np.sqrt(np.mean((a - b) ** 2)) < 0.2 * np.sqrt(np.mean(b**2)), t.name
    model = load_model(str(out), dtype="auto").model
    assert model.layers[0].self_attn.qkv_proj.qweight.formats == ("q4_k",)
    assert model.layers[1].self_attn.qkv_proj.qweight.formats == ("q4_k", "q6_k")  # use_more_bits(1, 2)


def test_f32_file_holds_the_source_dequantized_exactly(mixed_gguf, tmp_path):
    """F32 (what llama.cpp's own quantizer reads): every tensor is float32 and equals the source's
    gguf dequantization bit for bit, so the model runs as the source dequantized."""
    from memlm.formats.gguf_writer import quantize_file

    _, path, _ = mixed_gguf
    out = tmp_path / "f32.gguf"
    quantize_file(str(path), out, scheme("F32"))
    source, written = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(out))
    assert written.fields["general.file_type"].contents() == 0
    for t in written.tensors:
        assert t.tensor_type == Q.F32, t.name
        src = next(s for s in source.tensors if s.name == t.name)
        assert np.array_equal(t.data.reshape(-1), gguf.quants.dequantize(src.data, src.tensor_type).reshape(-1)), t.name
    ids = torch.randint(0, 100, (1, 9))
    want, got = load_model(str(path), dtype="float32").model, load_model(str(out), dtype="auto").model
    with torch.no_grad():
        a = want.logits(want(want.embed(ids), torch.arange(9)[None]))
        b = got.logits(got(got.embed(ids), torch.arange(9)[None]))
    assert torch.equal(a, b)


def test_quantize_an_hf_folder_keeps_row_order_and_tokenizer(tmp_path):
    """Q8_0 from a Hugging Face folder: memlm reads back exactly gguf's Q8_0 rounding of each HF
    weight (rows quantize independently, so the Q/K permutation must round-trip exactly)."""
    from conftest import byte_tokenizer
    from memlm.formats.gguf_writer import quantize_file

    hf = hf_tiny("llama", vocab_size=257, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer().save(tmp_path / "hf")
    quantize_file(str(tmp_path / "hf"), tmp_path / "q8.gguf", scheme("Q8_0"))
    loaded = load_model(str(tmp_path / "q8.gguf"), dtype="float32")
    state = hf.state_dict()
    for hf_name, ours in [("model.layers.1.self_attn.q_proj.weight", loaded.model.layers[1].self_attn.qkv_proj)]:
        want = gguf.quants.dequantize(gguf.quants.quantize(state[hf_name].numpy(), Q.Q8_0), Q.Q8_0)
        got = ours.weight[: want.shape[0]].detach().numpy()
        assert np.array_equal(got, want.reshape(got.shape))
    assert loaded.tokenizer.encode("héllo wörld") == byte_tokenizer().encode("héllo wörld")
    ids = torch.randint(0, 257, (1, 10))
    with torch.no_grad():
        want = hf(ids).logits
        m = loaded.model
        got = m.logits(m(m.embed(ids), torch.arange(10)[None]))
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_quantize_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "memlm", "quantize", str(tmp_path / "missing.gguf"), str(tmp_path / "o.gguf"),
         "--type", "Q3_K_XL"], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "unknown quantization type" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "memlm", "quantize", str(tmp_path / "missing"), str(tmp_path / "o.gguf")],
        capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


@pytest.mark.embedded
@needs_native
def test_llama_cpp_loads_memlms_q4_k_m_file_and_agrees():
    """Optional (skipped without llama-cpp-python, never a CI dependency): the embedded model
    written as Q4_K_M by memlm loads in llama.cpp, and llama.cpp's greedy continuation (int8
    activations) agrees with memlm's on the same file (q8_0 activations too) for the first tokens
    of most prompts; exact agreement is not expected where two int8 roundings differ."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import memlm
    from memlm.bench.decode import PROMPTS, encode_prompts
    from memlm.bench.llama_cpp_runner import LlamaCppGreedy
    from memlm.bench.quantized_files import quantized_file

    path = quantized_file("smollm2-135m-instruct", "Q4_K_M")
    engine = memlm.load(str(path), dtype="auto:q8_0")
    prompts = encode_prompts(engine.tokenizer, PROMPTS[:4])
    params = memlm.SamplingParams(max_new_tokens=8, min_new_tokens=8)
    ours = [engine.generate_tokens([p], params)[0].token_ids for p in prompts]
    runner = LlamaCppGreedy(path, 2, 1, max(len(p) for p in prompts) + 16)
    theirs = [runner.generate([p], 8).outputs[0] for p in prompts]
    assert sum(a[:4] == b[:4] for a, b in zip(ours, theirs, strict=True)) >= 3, (ours, theirs)


@pytest.mark.embedded
@needs_native
def test_embedded_model_in_k_quants_decodes_as_its_dequantized_weights():
    """The embedded model converted to q4_k (Q4_K for the 1536-wide down projections, Q5_0 for the
    576-wide rest: llama.cpp's fallback) in exact mode against a float32 model holding exactly its
    dequantized weights: the same greedy tokens, logits within summation-order noise."""
    import memlm
    from memlm.generation.engine import Engine

    quantized = load_model("smollm2-135m-instruct", dtype="q4_k")
    model = quantized.model
    assert model.layers[0].mlp.down_proj.qweight.format.name == "q4_k"
    assert model.layers[0].self_attn.qkv_proj.qweight.format.name == "q5_0" and model.native_decoder is not None
    reference = load_model("smollm2-135m-instruct", dtype="float32").model
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QLinear | QEmbedding) and name != "lm_head":
                reference.get_submodule(name).weight.copy_(module.qweight.dequantize())
    fast, slow = Engine(model, quantized.tokenizer, name="k"), Engine(reference, quantized.tokenizer, name="f")
    params = memlm.SamplingParams(max_new_tokens=16, min_new_tokens=16)
    prompts = [quantized.tokenizer.encode(p) for p in ("The capital of France is", "def fibonacci(n):")]
    assert [c.token_ids for c in fast.generate_tokens(prompts, params)] == [
        c.token_ids for c in slow.generate_tokens(prompts, params)
    ]


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0", "q5_0", "q6_k"])
def test_reading_blocks_a_chunk_of_rows_at_a_time_gives_the_same_weight(name):
    """How a GGUF file's tensors are loaded (read_gguf_blocks, 3 rows a chunk here, so the last
    chunk is short) == the whole tensor's bytes converted at once, every field bit for bit."""
    fmt = FORMATS[name]
    width = 512
    values = np.random.default_rng(0).normal(size=(10, width)).astype(np.float32)
    # K-quants by memlm's quantizer, the 32-value formats by gguf's (as files hold them)
    kquant = name.endswith("_k")
    made = quantize_blocks(values, name) if kquant else gguf.quants.quantize(values, getattr(Q, name.upper()))
    raw_bytes = np.ascontiguousarray(made).reshape(10, -1)
    whole = QWeight.from_gguf_blocks(raw_bytes.copy(), fmt, (10, width))
    calls = []

    def read(first, rows):
        calls.append((first, rows))
        return raw_bytes[first : first + rows].copy()

    chunked = QWeight.read_gguf_blocks(read, fmt, (10, width), chunk_rows=3)
    for field in ("qs", "d", "m"):
        a, b = getattr(whole, field), getattr(chunked, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert calls == ([(0, 10)] if fmt.raw else [(0, 3), (3, 3), (6, 3), (9, 1)])
