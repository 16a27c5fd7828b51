"""Mixture-of-experts families (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE) against
transformers on tiny random configs, the router, and the three dispatch strategies."""

import pytest
import torch
import transformers

from conftest import TINY, byte_tokenizer, memlm_twin
from memlm.generation.engine import Engine
from memlm.generation.params import SamplingParams
from memlm.models.moe import DISPATCHES, MoEBlock, route

FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                       shared_expert_intermediate_size=80, norm_topk_prob=False)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True)),
}


def hf_moe(arch: str, seed: int = 0, **overrides):
    config_cls, model_cls, moe = FAMILIES[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **moe, **overrides})).eval()
    with torch.no_grad():  # random init leaves routers at zero and norms at one: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif "experts" in name or "gate" in name:
                p.normal_(std=0.1)
    return model


def _logits(model, ids):
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        return model.logits(model.forward_tokens(ids, positions))


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_transformers(arch, tied):
    hf = hf_moe(arch, tie_word_embeddings=tied)
    model = memlm_twin(hf)
    assert model.config.num_experts == FAMILIES[arch][2].get("num_experts", 4)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(_logits(model, ids), expected, atol=2e-5, rtol=1e-4)


def test_dense_and_sparse_layers_mix_as_the_config_says():
    hf = hf_moe("qwen2_moe", num_hidden_layers=3, mlp_only_layers=[0], decoder_sparse_step=1)
    model = memlm_twin(hf)
    assert model.config.moe_layers == (1, 2)
    assert not isinstance(model.layers[0].mlp, MoEBlock) and isinstance(model.layers[2].mlp, MoEBlock)
    ids = torch.randint(0, TINY["vocab_size"], (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, ids), hf(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", FAMILIES)
def test_saved_folder_loads_in_transformers_and_memlm(arch, tmp_path):
    from memlm.formats.loading import load_model, save_model

    hf = hf_moe(arch, vocab_size=257)
    model = memlm_twin(hf)
    folder = save_model(tmp_path / arch, model, byte_tokenizer())  # checkpoints' per-expert tensor names
    ids = torch.randint(0, 257, (1, 9))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=2e-5, rtol=1e-4)
    again = load_model(str(folder)).model
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), atol=1e-6, rtol=0)


def test_cached_decoding_and_batching_equal_the_full_pass():
    model = memlm_twin(hf_moe("qwen2_moe", vocab_size=257, eos_token_id=256))
    engine = Engine(model, byte_tokenizer(), name="tiny-moe")
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = ["one expert, two", "a longer prompt for the mixture of experts", "x"]
    batched = engine.generate(prompts, params)
    for prompt, got in zip(prompts, batched, strict=True):
        alone = engine.generate(prompt, params)
        assert got.token_ids == alone.token_ids
        ids = torch.tensor([got.prompt_token_ids + got.token_ids])
        full = _logits(model, ids)[0, len(got.prompt_token_ids) - 1 : -1].argmax(-1)
        assert full.tolist() == got.token_ids  # the cache and decode-time dispatch change nothing


def test_router_takes_the_top_k_and_renormalises_when_asked():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 0.0, 3.0, 3.0]])
    weights, ids = route(logits, 2, normalize=False)
    probs = logits.softmax(-1)
    assert ids[0].tolist() == [0, 2] and sorted(ids[1].tolist()) == [2, 3]
    torch.testing.assert_close(weights[0], probs[0, [0, 2]])
    weights, _ = route(logits, 2, normalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    torch.testing.assert_close(weights[0], probs[0, [0, 2]] / probs[0, [0, 2]].sum())


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_dispatch_strategies_agree(tokens):
    torch.manual_seed(tokens)
    block = MoEBlock(32, 24, experts=8, top_k=3, normalize=True, shared_intermediate=16).eval()
    x = torch.randn(tokens, 32)
    outputs = {}
    with torch.no_grad():
        for mode in DISPATCHES:
            block.dispatch = mode
            outputs[mode] = block(x)
    for mode in DISPATCHES:
        torch.testing.assert_close(outputs[mode], outputs["loop"], atol=1e-5, rtol=1e-5)


def test_load_balancing_loss_matches_transformers_and_z_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from memlm.models.moe import expert_load, load_balancing_loss, router_z_loss

    torch.manual_seed(0)
    logits = [torch.randn(12, 6) * 2, torch.randn(12, 6)]
    expected = load_balancing_loss_func(tuple(logits), num_experts=6, top_k=2)
    torch.testing.assert_close(load_balancing_loss(logits, top_k=2), expected)
    balanced = [torch.zeros(6, 6).fill_diagonal_(5.0)]  # each expert first for exactly one token
    assert load_balancing_loss(balanced, top_k=1).item() == pytest.approx(1.0, abs=0.05)
    torch.testing.assert_close(expert_load(balanced, 1), torch.full((6,), 1 / 6))
    z = router_z_loss(logits)
    assert z.item() == pytest.approx(sum(torch.logsumexp(x, -1).pow(2).mean().item() for x in logits) / 2, rel=1e-5)


def test_the_auxiliary_loss_keeps_the_experts_in_use():
    """A router that starts out preferring one expert: without the auxiliary loss it stays collapsed,
    with it the load spreads over the experts (same data, same steps)."""
    from memlm.models.moe import expert_load, load_balancing_loss, router_logits_of

    def train(aux: float) -> torch.Tensor:
        torch.manual_seed(0)
        block = MoEBlock(16, 16, experts=4, top_k=1, normalize=False)
        with torch.no_grad():
            block.gate.weight.zero_()
            block.gate.weight[0, 0] = 3.0  # every input has x[0] = 1: expert 0 wins everywhere
        optimizer = torch.optim.Adam(block.parameters(), lr=3e-2)
        data = torch.randn(256, 16)
        data[:, 0] = 1.0
        target = torch.sin(data[:, 1:2] * 3).expand(-1, 16)
        for _ in range(150):
            out = block(data)
            loss = (out - target).pow(2).mean() + aux * load_balancing_loss(router_logits_of(block), top_k=1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            block(data)
        return expert_load(router_logits_of(block), top_k=1)

    collapsed, balanced = train(0.0), train(0.1)
    entropy = lambda load: -(load * load.clamp_min(1e-9).log()).sum().item()
    assert collapsed.max() > 0.9  # one expert takes nearly everything
    assert balanced.max() < 0.5 and entropy(balanced) > entropy(collapsed) + 0.5


def _write_moe_gguf(path, hf):
    """Write a transformers MoE model as llama.cpp's converter names it (Mixtral under the llama
    architecture with permuted Q/K rows; experts as [E, out, in] tensors, gate and up apart)."""
    import gguf
    import numpy as np

    from tests.test_gguf import add_shape_and_byte_tokenizer

    cfg, arch = hf.config, {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[hf.config.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    rope = getattr(cfg, "rope_parameters", None) or {}
    add_shape_and_byte_tokenizer(w, cfg, float(rope.get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)))
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_expert_count(getattr(cfg, "num_local_experts", None) or cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch != "llama":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
             "mlp.experts.down_proj": "ffn_down_exps.weight",
             "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
             "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
             "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
             "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
             "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
    names |= {f"self_attn.{p}_proj.{k}": f"attn_{p}.{k}" for p in "qkv" for k in ("weight", "bias")}
    state = hf.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        array = tensor.numpy().astype(np.float32)
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}[name]
            w.add_tensor(out, array)
            continue
        _, _, layer, rest = name.split(".", 3)
        if rest == "mlp.experts.gate_up_proj":  # [E, 2I, H] -> gate and up, Q8_0 blocks
            gate, up = np.split(array, 2, axis=1)
            for part, data in (("gate", gate), ("up", up)):
                quantized = gguf.quants.quantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(f"blk.{layer}.ffn_{part}_exps.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            continue
        if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = cfg.num_attention_heads if "q_proj" in rest else cfg.num_key_value_heads
            rows = array.shape[0]
            array = array.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(rows, -1)
        if rest == "mlp.shared_expert_gate.weight":
            array = array.reshape(-1)  # llama.cpp stores this gate as a vector
        w.add_tensor(f"blk.{layer}.{names[rest]}", array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", FAMILIES)
def test_gguf_files_of_each_family_load_with_logits_equal_to_transformers(arch, tmp_path):
    import gguf

    from memlm.formats.gguf_file import read_gguf
    from memlm.formats.weights import build_model

    hf = hf_moe(arch, vocab_size=257, tie_word_embeddings=arch == "qwen3_moe")
    path = tmp_path / f"{arch}.gguf"
    _write_moe_gguf(path, hf)
    config, weights, _ = read_gguf(path)
    assert (config.arch, config.moe_layers) == (arch, (0, 1))
    # transformers with exactly what the file holds: its experts went through Q8_0 blocks.
    reference = {k: v.clone() for k, v in hf.state_dict().items()}
    for name, tensor in weights.items():
        if name.endswith("experts.gate_up_proj"):
            reference[name] = tensor
            blocks = gguf.quants.quantize(hf.state_dict()[name].numpy(), gguf.GGMLQuantizationType.Q8_0)
            expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
            assert torch.equal(tensor, torch.from_numpy(expected.reshape(tensor.shape)))
    hf.load_state_dict(reference)
    model = build_model(config, weights)
    ids = torch.randint(0, 257, (2, 11))
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(_logits(model, ids), expected, atol=2e-5, rtol=1e-4)


def test_a_quantized_moe_model_keeps_its_experts_and_router_in_float(tmp_path):
    from memlm.formats.loading import load_model
    from memlm.quant.qlinear import QLinear

    hf = hf_moe("qwen2_moe", vocab_size=257)
    path = tmp_path / "moe.gguf"
    _write_moe_gguf(path, hf)
    reference, quantized = load_model(str(path)).model, load_model(str(path), dtype="q8_0").model
    block = quantized.layers[0].mlp
    assert isinstance(quantized.layers[0].self_attn.qkv_proj, QLinear)
    assert isinstance(block.shared.gate_up_proj, QLinear) and block.experts_gate_up.dtype == torch.float32
    assert quantized.native_decoder is None  # MoE layers take the layer-by-layer path
    ids = torch.randint(0, 257, (2, 11))
    torch.testing.assert_close(_logits(quantized, ids), _logits(reference, ids), atol=2e-2, rtol=0)
