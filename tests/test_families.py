"""Gemma 3 and Phi-3 beside the Llama family: logits, greedy generation, the cache, eviction and
batching against transformers on tiny random models; Hugging Face folders and GGUF files."""

import dataclasses

import numpy as np
import pytest
import torch
from test_quant import _decode, needs_native

from conftest import byte_tokenizer, hf_engine_pair, hf_greedy, hf_tiny, memlm_twin
from memlm.cache import make_policy
from memlm.formats.weights import build_model
from memlm.generation.params import SamplingParams
from memlm.models.config import FULL, SLIDING, ModelConfig
from memlm.models.native_decode import NativeDecoder

# Sequences of 40 tokens against a window of 8: most keys are outside a sliding layer's window.
GEMMA = dict(
    num_hidden_layers=3,
    sliding_window=8,
    sliding_window_pattern=2,  # sliding, global, sliding
    query_pre_attn_scalar=24,
    rope_scaling={"rope_type": "linear", "factor": 2.0},  # the global layers' only
)
PHI = {
    "partial": dict(partial_rotary_factor=0.75),
    "longrope": dict(
        partial_rotary_factor=0.5,
        original_max_position_embeddings=64,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.6, 1.9], "long_factor": [2.0, 3, 4, 5]},
    ),
    "window": dict(sliding_window=8),
}


def _logits(model, ids):
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    return model.logits(model(model.embed(ids), positions))


def _ids(length=40, batch=2, seed=1, vocab=128):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gemma3_logits_match_transformers(softcap):
    hf = hf_tiny("gemma3_text", final_logit_softcapping=softcap, **GEMMA)
    ours = memlm_twin(hf)
    assert ours.config.layer_types == (SLIDING, FULL, SLIDING) and ours.config.tie_word_embeddings
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(_logits(ours, ids), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", list(PHI))
def test_phi3_logits_match_transformers(variant):
    hf = hf_tiny("phi3", **PHI[variant])
    ours = memlm_twin(hf)
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(_logits(ours, ids), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "change",
    [
        dict(sliding_window=None),
        dict(local_rope_theta=None),
        dict(embed_scale=1.0),
        dict(query_pre_attn_scalar=None),
        dict(sandwich_norms=False),
        dict(hidden_act="silu"),
        dict(final_logit_softcapping=None),
    ],
)
def test_every_gemma_switch_matters(change):
    """Guard: parity must not hold with any one switch off (a switch silently ignored would pass)."""
    hf = hf_tiny("gemma3_text", final_logit_softcapping=3.0, **GEMMA)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    reference = _logits(build_model(cfg, dict(state)), _ids())
    if "sandwich_norms" in change:  # the extra norms' weights have no place to go: drop them
        state = {k: v for k, v in state.items() if "feedforward" not in k and "post_attention" not in k}
        state |= {
            f"model.layers.{i}.post_attention_layernorm.weight": hf.state_dict()[
                f"model.layers.{i}.pre_feedforward_layernorm.weight"
            ]
            for i in range(cfg.num_layers)
        }
    changed = build_model(dataclasses.replace(cfg, **change), state)
    assert not torch.allclose(_logits(changed, _ids()), reference, atol=1e-3)


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3"])
def test_config_round_trips_through_config_json(arch):
    hf = hf_tiny(arch, **(GEMMA if arch == "gemma3_text" else PHI["longrope"]))
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3"])
def test_greedy_generation_matches_transformers_alone_and_batched(arch):
    """Prompts and continuations run past the window: the cache, the window masks over it, ragged
    rows joining one batch."""
    hf, engine = hf_engine_pair(arch, **(GEMMA if arch == "gemma3_text" else PHI["window"]))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 17, 11)]
    params = SamplingParams(max_new_tokens=20, min_new_tokens=20)
    alone = [engine.generate_tokens([p], params)[0].token_ids for p in prompts]
    assert alone == [hf_greedy(hf, [p], 20)[0] for p in prompts]
    assert [c.token_ids for c in engine.generate_tokens(prompts, params)] == alone


def test_cache_equals_full_forward_past_the_window():
    model = memlm_twin(hf_tiny("gemma3_text", **GEMMA))
    ids = _ids(30, batch=1)
    full = _logits(model, ids)
    cache = model.new_state(1, 8)
    chunks = [ids[:, :11]] + [ids[:, i : i + 1] for i in range(11, 23)] + [ids[:, 23:]]  # prefill, steps, a chunk
    start, got = 0, []
    for chunk in chunks:
        positions = torch.arange(start, start + chunk.shape[1])[None]
        got.append(model.logits(model(model.embed(chunk), positions, cache)))
        start += chunk.shape[1]
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-4)


def test_sliding_layers_mask_by_position_after_eviction():
    """With every layer sliding, slots older than the window are dead weight: evicting them (the
    slots then start at position 13, not 0) must leave the next token's logits unchanged."""
    hf = hf_tiny("gemma3_text", **{**GEMMA, "layer_types": [SLIDING] * 3})
    model = memlm_twin(hf)
    ids = _ids(21, batch=1)
    full = _logits(model, ids)[:, -1]
    cache = model.new_state(1, 32)
    model(model.embed(ids[:, :20]), torch.arange(20)[None], cache)
    window = model.config.sliding_window
    cache.compact(0, torch.arange(20 - window + 1, 20))  # keep positions 13..19: what position 20 sees
    last = model.logits(model(model.embed(ids[:, 20:]), torch.tensor([[20]]), cache))[:, -1]
    torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-4)
    assert cache.lengths.tolist() == [window]


@pytest.mark.parametrize("name", ["window", "h2o"])
def test_eviction_budgets_hold_and_batches_equal_rows_on_gemma(name):
    """A recency policy and a scored one (h2o reads attention weights through the sliding masks) under
    a budget above the window: the budget holds, each row evicts alone as in a batch."""
    _, engine = hf_engine_pair("gemma3_text", **GEMMA)
    prompts = ["abcdefghijk", "xy", "0123456789"]  # up to the budget; longer than the window
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    policy = make_policy(name, 12)
    batched = engine.generate(prompts, params, kv_policy=policy)
    for prompt, got in zip(prompts, batched, strict=True):
        assert got.peak_kv_tokens <= 12 + 1
        assert engine.generate(prompt, params, kv_policy=policy).token_ids == got.token_ids


def _quantized(arch, **overrides):
    from memlm.quant.qlinear import quantize_model

    model = memlm_twin(hf_tiny(arch, **overrides))
    quantize_model(model, "q8_0")
    model.native_decoder = NativeDecoder.for_model(model)
    assert model.native_decoder is not None  # the kernels run these families' switches too
    return model


def _both_paths(model, run):
    """`run()` with the native layer step, then layer by layer in torch (same quantized weights)."""
    with torch.inference_mode():
        native = run()
        saved, model.native_decoder = model.native_decoder, None
        try:
            return native, run()
        finally:
            model.native_decoder = saved


@needs_native
@pytest.mark.parametrize("arch", ["gemma3_text", "phi3"])
def test_native_decode_equals_the_layer_by_layer_path(arch):
    """Windows, the local RoPE base, sandwich norms, gelu, the score scale (Gemma) and partial
    rotary (Phi) in the kernels: decode steps past the window, ragged rows, attention statistics."""
    overrides = GEMMA if arch == "gemma3_text" else {**PHI["partial"], "sliding_window": 8}
    model = _quantized(arch, **overrides)
    prompts = [[5, 9, 2, 77, 31], [8, 1], [100, 3, 3, 3, 3, 3, 7, 9, 11, 12]]
    (got, cache), (want, slow) = _both_paths(model, lambda: _decode(model, prompts, steps=12, track_attention=True))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(cache.attention_sum, slow.attention_sum, atol=1e-5, rtol=1e-4)


@needs_native
def test_native_window_masks_by_position_after_eviction():
    model = _quantized("gemma3_text", **{**GEMMA, "layer_types": [SLIDING, FULL, SLIDING]})
    ids = _ids(24, batch=1)

    def run():
        cache = model.new_state(1, 32)
        model(model.embed(ids[:, :20]), torch.arange(20)[None], cache)
        cache.compact(0, torch.tensor([0, 1, 2, *range(10, 20)]))  # sinks and the recent past, as a policy would
        return [model.logits(model(model.embed(ids[:, i : i + 1]), torch.tensor([[i]]), cache)) for i in range(20, 24)]

    native, layered = _both_paths(model, run)
    torch.testing.assert_close(torch.cat(native), torch.cat(layered), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3"])
def test_hf_folder_round_trip_with_transformers(tmp_path, arch):
    """memlm writes a folder transformers loads, and loads it back: the same logits all three ways."""
    import transformers

    from memlm.formats.loading import load_model, save_model

    hf = hf_tiny(arch, vocab_size=257, **(GEMMA if arch == "gemma3_text" else PHI["longrope"]))
    save_model(tmp_path / "m", memlm_twin(hf), byte_tokenizer())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ours = load_model(str(tmp_path / "m")).model
    ids = _ids(vocab=257)
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=1e-5, rtol=1e-4)


# ---- GGUF: files written as llama.cpp's converter writes them ------------------------------------

gguf = pytest.importorskip("gguf")

_GGUF_LAYER = {
    "gemma3_text": {
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_output",
        "self_attn.q_norm.weight": "attn_q_norm",
        "self_attn.k_norm.weight": "attn_k_norm",
        "input_layernorm.weight": "attn_norm",
        "post_attention_layernorm.weight": "post_attention_norm",
        "pre_feedforward_layernorm.weight": "ffn_norm",
        "post_feedforward_layernorm.weight": "post_ffw_norm",
        "mlp.gate_proj.weight": "ffn_gate",
        "mlp.up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down",
    },
    "phi3": {
        "self_attn.qkv_proj.weight": "attn_qkv",
        "self_attn.o_proj.weight": "attn_output",
        "input_layernorm.weight": "attn_norm",
        "post_attention_layernorm.weight": "ffn_norm",
        "mlp.gate_up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down",
    },
}


def _write_gguf(path, hf, arch):
    """As convert_hf_to_gguf.py: Gemma's norms stored as 1 + weight, Phi's LongRoPE factors as tensors."""
    from test_gguf import add_shape_and_byte_tokenizer

    cfg = hf.config
    name = {"gemma3_text": "gemma3", "phi3": "phi3"}[arch]
    w = gguf.GGUFWriter(str(path), name)
    rope = cfg.rope_parameters.get(FULL, cfg.rope_parameters)
    add_shape_and_byte_tokenizer(w, cfg, rope_theta=rope["rope_theta"])
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if arch == "gemma3_text":
        w.add_sliding_window(cfg.sliding_window)
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
    else:
        rotary = int(cfg.head_dim * rope.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(rotary)
        w.add_sliding_window(cfg.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            original = rope["original_max_position_embeddings"]
            scale = cfg.max_position_embeddings / original
            w.add_rope_scaling_orig_ctx_len(original)
            w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(original))))
            w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    for hf_name, tensor in hf.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if hf_name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            gguf_name = f"blk.{layer}.{_GGUF_LAYER[arch][rest]}.weight"
        if arch == "gemma3_text" and gguf_name.endswith("norm.weight"):
            array = array + 1.0
        w.add_tensor(gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "arch,overrides",
    [
        # llama.cpp fixes Gemma 3's pattern (every 6th layer global) and its local RoPE base (10k).
        ("gemma3_text", dict(num_hidden_layers=6, sliding_window=8, head_dim=16, query_pre_attn_scalar=16,
                             rope_scaling={"rope_type": "linear", "factor": 2.0})),
        ("phi3", dict(tie_word_embeddings=False, **PHI["longrope"])),
        ("phi3", dict(tie_word_embeddings=False, sliding_window=8)),
    ],
)  # fmt: skip
def test_gguf_file_matches_transformers(tmp_path, arch, overrides):
    from memlm.formats.loading import load_model

    hf = hf_tiny(arch, vocab_size=257, **overrides)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf, arch)
    loaded = load_model(str(path))
    assert loaded.model.config.arch == arch
    ids = _ids(vocab=257)
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(_logits(loaded.model, ids), expected, atol=1e-5, rtol=1e-4)
