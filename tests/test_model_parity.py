"""memlm's model against the Hugging Face implementation on the same weights."""

import pytest
import torch

from conftest import hf_tiny, memlm_twin
from memlm.models.config import ModelConfig

ROPE_VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


def _memlm_logits(model, ids):
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    return model.logits(model(model.embed(ids), positions))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(arch, tied):
    hf = hf_tiny(arch, tie_word_embeddings=tied)
    ours = memlm_twin(hf)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(_memlm_logits(ours, ids), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_scaling_variants_match_transformers(variant):
    params = ROPE_VARIANTS[variant]
    overrides = {"rope_parameters": {"rope_theta": 10000.0, **params}} if params else {}
    hf = hf_tiny("llama", **overrides)
    ours = memlm_twin(hf)
    assert (ours.config.rope_scaling or {}).get("rope_type", "default") == variant
    # Long enough to pass original_max_position_embeddings, where the variants differ.
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(_memlm_logits(ours, ids), expected, atol=2e-5, rtol=1e-4)


def test_qk_norm_and_bias_are_used():
    """Guard against a parity test passing because a feature is silently a no-op."""
    hf = hf_tiny("qwen3")
    ours = memlm_twin(hf)
    ids = torch.randint(0, 128, (1, 12))
    before = _memlm_logits(ours, ids)
    ours.layers[0].self_attn.q_norm.weight.mul_(3.0)
    assert not torch.allclose(before, _memlm_logits(ours, ids))


def test_legacy_config_dialect():
    legacy = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    cfg = ModelConfig.from_hf(legacy)
    assert cfg.rope_theta == 5e5
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
