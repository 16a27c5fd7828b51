"""Read a GGUF file (llama.cpp's format): config, weights (dequantized, or as the file's blocks), tokenizer.

The header (fields, tensor table) is parsed by gguf_header.py, not by the gguf package's reader
(45 s on a 262k vocabulary).

Dequantization is the `gguf` package's (Q4_0/Q4_1/Q5_x/Q8_0/K-quants, F16, BF16, F32); blocks
memlm runs natively stay blocks when asked (`keep_quantized`). Weights are
returned under Hugging Face names so that the rest of memlm, and transformers in the tests, see
exactly what they would see from a safetensors checkpoint.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memlm.errors import ModelFormatError
from memlm.formats.gguf_header import read_header
from memlm.heap import release_freed_memory
from memlm.models.config import FULL, SLIDING, ModelConfig
from memlm.quant.qweight import QWeight, format_of_gguf_type
from memlm.tokenizer import Tokenizer

_SUPPORTED = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma3", "phi3")
# GGUF architecture -> memlm's (Hugging Face's model_type) where the names differ.
_ARCH_NAMES = {"gemma3": "gemma3_text"}
# GGUF architecture -> memlm's MoE family. Mixtral files say "llama" and carry an expert count.
_MOE_FAMILIES = {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# Renormalise the chosen experts' weights when the file does not say (transformers' defaults).
_NORM_TOPK = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}

# GGUF tensor suffix -> Hugging Face name (inside model.layers.N.)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # Mixture of experts: the router, the experts as [E, out, in] tensors, Qwen2-MoE's shared expert.
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",  # joined with up into gate_up_proj below
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
# Per architecture, the tensors whose names mean something else there. Gemma 3's four layer norms
# (llama.cpp's converter stores each as 1 + weight); Phi-3's fused projections.
_ARCH_LAYER_NAMES = {
    "gemma3": {
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
    "phi3": {
        "attn_qkv.weight": "self_attn.qkv_proj.weight",
        "ffn_up.weight": "mlp.gate_up_proj.weight",  # gate and up rows in one tensor, as transformers'
    },
}
# llama.cpp's Gemma 3 (llama-model.cpp): every sixth layer global, sliding layers on RoPE base 10k.
_GEMMA3_PATTERN, _GEMMA3_LOCAL_THETA = 6, 10000.0
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def read_fields(reader) -> dict[str, Any]:
    fields = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except Exception:  # a field type this gguf version cannot decode: not one memlm reads
            continue
    return fields


def open_gguf(path: str | Path):
    """The gguf package's reader (slow on large vocabularies: loading uses gguf_header.read_header)."""
    import gguf  # lazy: gguf (numpy's block tables) loads only when a GGUF file is read

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def config_from_gguf(
    fields: dict[str, Any],
    tokenizer: Tokenizer,
    has_output: bool,
    moe_layers: tuple[int, ...] = (),
    rope_factors: dict[str, list[float]] | None = None,
) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch not in _SUPPORTED:
        raise ModelFormatError(f"GGUF architecture {arch!r} is not supported ({', '.join(_SUPPORTED)})")

    def get(key: str, default: Any = None) -> Any:
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFormatError(f"GGUF file lacks {arch}.{key}")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    scaling = None
    scaling_type = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type in ("linear", "yarn"):
        scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor"))}
        if scaling_type == "yarn":
            scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    elif scaling_type != "none":
        raise ModelFormatError(f"GGUF rope scaling {scaling_type!r} is not supported")
    # Ends of generation: EOS, the end-of-turn tokens a file names, and Gemma's <end_of_turn>, which
    # llama.cpp recognises by its text (Gemma files name only <eos>, which chat turns never emit).
    ends = [
        tokenizer.eos_token_id,
        fields.get("tokenizer.ggml.eot_token_id"),
        fields.get("tokenizer.ggml.eom_token_id"),
    ]
    if arch == "gemma3":
        ends.append(tokenizer.token_to_id("<end_of_turn>"))
    eos = list(dict.fromkeys(int(i) for i in ends if i is not None))
    moe: dict[str, Any] = {}
    experts = int(fields.get(f"{arch}.expert_count") or 0)
    if experts and arch in _MOE_FAMILIES:
        family = _MOE_FAMILIES[arch]
        moe = dict(
            num_experts=experts,
            experts_per_token=int(get("expert_used_count")),
            expert_intermediate_size=int(
                fields.get(f"{arch}.expert_feed_forward_length") or get("feed_forward_length")
            ),
            shared_expert_intermediate_size=int(fields.get(f"{arch}.expert_shared_feed_forward_length") or 0),
            norm_topk_prob=bool(fields.get(f"{arch}.expert_weights_norm", _NORM_TOPK[family])),
            moe_layers=moe_layers,
        )
    elif arch in ("qwen2moe", "qwen3moe"):
        raise ModelFormatError(f"GGUF file of architecture {arch} lacks {arch}.expert_count")
    head_dim = int(get("attention.key_length", hidden // heads))
    layers = int(get("block_count"))
    switches = _gemma_phi_from_gguf(arch, fields, hidden, heads, head_dim, layers, rope_factors or {})
    if "rope_scaling" in switches:
        scaling = switches.pop("rope_scaling")
    return ModelConfig(
        arch=_MOE_FAMILIES[arch] if moe else _ARCH_NAMES.get(arch, arch),
        vocab_size=int(fields.get(f"{arch}.vocab_size") or len(fields["tokenizer.ggml.tokens"])),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        # GGUF stores float32; keep the shortest decimal that round-trips (9.99999975e-06 -> 1e-05).
        rms_norm_eps=float(str(np.float32(get("attention.layer_norm_rms_epsilon")))),
        rope_theta=float(str(np.float32(get("rope.freq_base", 10000.0)))),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=not has_output,
        qkv_bias=arch in ("qwen2", "qwen2moe"),
        qk_norm=arch in ("qwen3", "qwen3moe", "gemma3"),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tuple(eos),
        **moe,
        **switches,
    )


def _gemma_phi_from_gguf(
    arch: str, fields: dict[str, Any], hidden: int, heads: int, head_dim: int, layers: int, factors: dict
) -> dict[str, Any]:
    """Gemma 3's and Phi-3's switches as llama.cpp reads them (what it fixes in code, fixed here too)."""
    if arch == "gemma3":
        window = fields.get("gemma3.attention.sliding_window")
        cap = fields.get("gemma3.final_logit_softcapping")
        pattern = [SLIDING if (i + 1) % _GEMMA3_PATTERN else FULL for i in range(layers)]
        return dict(
            hidden_act="gelu_tanh",
            embed_scale=float(hidden**0.5),
            # llama.cpp: 1/sqrt(head_dim), but hidden/heads for the 27B (62 layers), as Google's configs say
            query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim),
            sandwich_norms=True,
            sliding_window=int(window) if window else None,
            layer_types=tuple(pattern),
            local_rope_theta=_GEMMA3_LOCAL_THETA,
            final_logit_softcapping=float(cap) if cap else None,
        )
    if arch == "phi3":
        rotary = int(fields.get("phi3.rope.dimension_count") or head_dim)
        window = fields.get("phi3.attention.sliding_window")  # 0: none (Phi-4)
        out: dict[str, Any] = dict(
            partial_rotary_factor=rotary / head_dim, sliding_window=int(window) if window else None
        )
        if "short" in factors:
            out["rope_scaling"] = {
                "rope_type": "longrope",
                "short_factor": factors["short"],
                "long_factor": factors.get("long", factors["short"]),
                "original_max_position_embeddings": int(fields["phi3.rope.scaling.original_context_length"]),
                "attention_factor": float(fields.get("phi3.rope.scaling.attn_factor", 1.0)),
            }
        return out
    return {}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of Q/K weights (llama arch only)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def dequantize(tensor) -> np.ndarray:
    """One GGUF tensor -> float32 array in PyTorch (row-major, [out, in]) order."""
    from gguf.quants import dequantize as gguf_dequantize  # lazy: gguf's block tables load only for GGUF files

    try:
        values = gguf_dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ModelFormatError(f"tensor {tensor.name}: GGUF type {tensor.tensor_type.name} is not supported") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def _unpermute_index(rows: int, n_head: int) -> torch.Tensor:
    """`_unpermute` as a row index, for quantized weights whose rows move as they are."""
    return torch.from_numpy(_unpermute(np.arange(rows)[:, None], n_head)[:, 0].copy())


def read_gguf(path: str | Path, keep_quantized: bool = False) -> tuple[ModelConfig, dict, Tokenizer]:
    """(config, weights under Hugging Face names, tokenizer). Weights are fp32 tensors; with
    `keep_quantized`, matrices stored in a format memlm runs natively (quant/qweight.py FORMATS:
    Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the K-quants) come as `QWeight`s holding the file's bits, each in
    its own format (Q4_K_M files mix Q4_K, Q6_K, Q5_0 and Q8_0 tensors)."""
    fields, tensors = read_header(path)
    tokenizer = Tokenizer.from_gguf(fields)
    # Building a large vocabulary's tokenizer frees a few hundred MB inside the C heap; the weight
    # blocks are allocated apart from it (big buffers are their own mappings), so give those pages
    # back first, or peak RSS holds both (Gemma 3's file: 890 -> see bench/README.md).
    release_freed_memory()
    names = {t.name for t in tensors}
    moe_layers = tuple(sorted(int(n.split(".")[1]) for n in names if n.endswith(".ffn_gate_inp.weight")))
    # Phi-3's LongRoPE factors are tensors in GGUF files, fields of the config in transformers'.
    factors = {
        t.name.split("_")[-1].split(".")[0]: dequantize(t).tolist()
        for t in tensors
        if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")
    }
    config = config_from_gguf(fields, tokenizer, "output.weight" in names, moe_layers, factors)
    arch = fields.get("general.architecture")
    permuted = config.arch in ("llama", "mixtral")  # llama.cpp's convert reorders Q/K rows for these
    if "rope_freqs.weight" in names:
        raise ModelFormatError("GGUF files with per-dimension rope_freqs (Llama 3.1 style) are not supported yet")
    weights: dict[str, torch.Tensor | QWeight] = {}
    blocks = []  # (HF name, format, [out, in], Q/K heads, offset, bytes): read after the memory map is gone
    for tensor in tensors:
        if tensor.name.startswith("rope_factors_"):
            continue  # read into the config above
        hf_name = _hf_name(tensor.name, arch)
        heads = None  # Q/K rows to un-permute, by head count
        if permuted and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if "attn_q" in tensor.name else config.num_kv_heads
        fmt = format_of_gguf_type(tensor.tensor_type) if keep_quantized and len(tensor.shape) == 2 else None
        if fmt is not None:
            shape = (int(tensor.shape[1]), int(tensor.shape[0]))
            blocks.append((hf_name, fmt, shape, heads, int(tensor.data_offset), int(tensor.n_bytes)))
            continue
        w = dequantize(tensor)
        if heads:
            w = _unpermute(w, heads)
        if config.norm_offset and tensor.name.endswith("norm.weight"):
            w = w - np.float32(config.norm_offset)  # back to transformers' convention (fuse adds it again)
        weights[hf_name] = torch.from_numpy(w if w.flags.writeable else w.copy())
    # Dequantized tensors were copied out of the memory map; close it (with the views into it)
    # before the blocks are read with file reads, so their pages are never resident twice.
    tensors = tensor = None
    gc.collect()
    for hf_name, fmt, shape, heads, offset, size in blocks:
        row_bytes = size // shape[0]

        def read(first: int, rows: int, offset=offset, row_bytes=row_bytes):
            return _read_bytes(path, offset + first * row_bytes, rows * row_bytes).reshape(rows, row_bytes)

        q = QWeight.read_gguf_blocks(read, fmt, shape)
        weights[hf_name] = q.select_rows(_unpermute_index(q.shape[0], heads)) if heads else q
    return config, _join_experts(weights), tokenizer


def _read_bytes(path: str | Path, offset: int, size: int) -> np.ndarray:
    """A tensor's bytes read into memory of our own. Copying them out of the reader's memory map
    would fault the file's pages into this process as well: the peak would hold the weights twice."""
    out = np.empty(size, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(out)) != size:
            raise ModelFormatError(f"{path}: a tensor runs past the end of the file")
    return out


def _join_experts(weights: dict) -> dict:
    """GGUF keeps experts' gate and up apart ([E, I, H] each); transformers 5 (and memlm) fuse
    them into gate_up_proj [E, 2I, H]. The shared expert's gate is [1, H] there, [H] in some files."""
    for name in [n for n in weights if n.endswith("mlp.experts.gate_proj")]:
        prefix = name[: -len("gate_proj")]
        weights[prefix + "gate_up_proj"] = torch.cat((weights.pop(name), weights.pop(prefix + "up_proj")), dim=1)
    for name in [n for n in weights if n.endswith("mlp.shared_expert_gate.weight")]:
        if isinstance(weights[name], torch.Tensor):
            weights[name] = weights[name].reshape(1, -1)
    return weights


def _hf_name(name: str, arch: str | None = None) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(arch, {})}
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}"
    raise ModelFormatError(f"unexpected GGUF tensor {name!r}")
