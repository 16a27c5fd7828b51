"""Shared fixtures: tiny random models (with their Hugging Face twins) and the embedded model."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

from memlm.formats.weights import build_model
from memlm.models.config import ModelConfig

# One cache for the whole run; CI may point MEMLM_HOME elsewhere.
os.environ.setdefault("MEMLM_HOME", str(Path.home() / ".cache" / "memlm"))
torch.set_num_threads(int(os.environ.get("MEMLM_TEST_THREADS", min(2, os.cpu_count() or 1))))

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def hf_tiny(arch: str = "llama", seed: int = 0, **overrides):
    """A random transformers model of the given architecture, in eval mode."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    defaults = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2) if arch == "phi3" else {}  # its ids are 32000+
    config = config_cls(**{**TINY, **defaults, **overrides})
    model = model_cls(config).eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so the test sees their use.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def memlm_twin(hf_model):
    """memlm's model built from a transformers model's config and weights."""
    cfg = ModelConfig.from_hf(hf_model.config.to_dict())
    return build_model(cfg, {k: v.clone() for k, v in hf_model.state_dict().items()})


def tiny_memlm(seed: int = 0, **overrides):
    """A random memlm model without transformers (fast unit tests)."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(ModelConfig.from_hf({"model_type": "llama", **TINY}), **overrides)
    from memlm.models.llama import LlamaModel

    model = LlamaModel(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def embedded_engine():
    import memlm

    return memlm.load()


@pytest.fixture(scope="session")
def embedded_folder(embedded_engine) -> Path:
    from memlm.formats.loading import resolve

    return resolve("smollm2-135m-instruct")[1]


@pytest.fixture(scope="session")
def memlm_cli():
    """The memlm console script of the environment running the tests."""
    exe = Path(sys.executable).with_name("memlm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "memlm"]


def byte_tokenizer():
    """A real byte-level BPE tokenizer with no merges: one token per UTF-8 byte (ids 0-255), plus
    <eos> = 256. Multi-byte characters span several tokens, which is what streaming must handle."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from memlm.tokenizer import Tokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<eos>", special=True)])
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    return Tokenizer(backend, chat_template=template, eos_token="<eos>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def lora_folders(root: Path, names=("a", "b", "c")) -> Path:
    """A tiny base model folder (root/base, byte tokenizer) and a LoRA adapter folder per name
    (PEFT format, B nonzero so each changes the answers). The last adapter has rank 2 on the
    attention only, the others rank 4 on every projection: ranks and targets differ."""
    from memlm.adapters.lora import add_lora, lora_layers, save_adapter
    from memlm.formats.loading import load_model, save_model

    hf = hf_tiny("llama", vocab_size=257, hidden_size=64, intermediate_size=128, head_dim=16)
    base = save_model(root / "base", memlm_twin(hf), byte_tokenizer())
    for i, name in enumerate(names):
        model = load_model(str(base)).model
        last = i == len(names) - 1
        targets = ("qkv_proj", "o_proj") if last else ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        rank = 2 if last else 4
        add_lora(model, rank=rank, alpha=2.0 * rank, targets=targets)
        torch.manual_seed(10 + i)
        for _, layer in lora_layers(model):
            layer.lora_b.data.normal_(std=0.1)
        save_adapter(root / name, model, {"base_model": str(base)}, dtype=torch.float32)
    return root


def tiny_engine(seed: int = 0, **overrides):
    """An Engine on a random 2-layer model with the byte tokenizer (vocab 257)."""
    from memlm.generation.engine import Engine

    model = tiny_memlm(seed, vocab_size=257, eos_token_ids=(256,), **overrides)
    return Engine(model, byte_tokenizer(), name="tiny")


def hf_engine_pair(arch: str = "llama", **overrides):
    """A tiny transformers model (byte vocabulary, EOS 256) and an Engine on its memlm twin."""
    from memlm.generation.engine import Engine

    hf = hf_tiny(arch, vocab_size=257, eos_token_id=256, **overrides)
    return hf, Engine(memlm_twin(hf), byte_tokenizer())


def hf_greedy(hf, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy generate on left-padded prompts -> `n` new tokens per prompt."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[:, longest:].tolist()


def assert_qlinear_matches_dequantized(q) -> None:
    """A QLinear over `q` (with a bias) equals the float64 matmul with q's reference dequantization,
    for every kernel width, a remainder group, and the GEMM path."""
    import torch.nn.functional as F

    from memlm.quant.qlinear import QLinear

    out, inp = q.shape
    bias = torch.randn(out)
    layer = QLinear(q, bias)
    reference = q.dequantize().double()
    for rows in (1, 2, 3, 5, 8, 9, 17, 40):
        x = torch.randn(rows, inp)
        got = layer(x).double()
        want = F.linear(x.double(), reference, bias.double())
        # fp32 accumulation over `inp` products, in another order than the float64 reference.
        tolerance = 1e-5 * inp**0.5 * (x.abs().max() * reference.abs().max()).item() + 1e-5
        assert (got - want).abs().max().item() < tolerance, (rows, (got - want).abs().max().item())
