"""Write a quantized GGUF file from a GGUF file or a Hugging Face folder (`memlm quantize`).

From a GGUF file, every metadata field is copied as it is (architecture, tokenizer, chat template)
and every tensor is dequantized to fp32 with the gguf package and quantized again in the format the
scheme's type mix gives it (quant/mix.py), in the file's own tensor order and orientation. From a
Hugging Face folder (or an embedded model's name), the metadata is written from the config and
tokenizer.json as llama.cpp's converter writes it (Q/K rows permuted for the llama architecture).

Blocks are quantized by memlm (quant/kquants.py: ggml's K-quant search; the gguf package's
quantizer for the 32-value formats) and written with the gguf package's writer, into a temporary
file renamed over the target at the end: a crash never leaves a half-written file under its name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from memlm.errors import MemlmError, ModelFormatError
from memlm.quant.kquants import quantize_blocks
from memlm.quant.mix import Scheme, plan

_HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")
_REPLACED_FIELDS = ("general.file_type", "general.quantization_version", "general.architecture")

# Hugging Face name (inside model.layers.N.) -> GGUF tensor suffix; the inverse of gguf_file's.
_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip


def quantize_file(source: str, target: str | Path, chosen: Scheme, progress=None) -> dict:
    """Write `target` (a .gguf file); return {format: tensor count} and sizes for the report."""
    import gguf  # lazy: only the quantizer writes GGUF files

    target = Path(target)
    if target.suffix.lower() != ".gguf":
        raise MemlmError(f"{target}: the output of memlm quantize is a .gguf file")
    source_path = Path(source).expanduser()
    if source_path.is_file() and source_path.suffix.lower() == ".gguf":
        arch, fields, tensors = _from_gguf(source_path)
    else:
        arch, fields, tensors = _from_hf(source)
    formats = plan([(name, shape) for name, shape, _ in tensors], chosen)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    counts: Counter = Counter()
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, (value, vtype, sub_type) in fields.items():
            if sub_type is not None and len(value) == 0:
                continue  # the gguf writer refuses empty arrays (a BPE without merges): absent reads the same
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        writer.add_file_type(chosen.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for i, (name, shape, load) in enumerate(tensors):
            values = np.ascontiguousarray(load(), dtype=np.float32).reshape(shape)
            fmt = formats[name]
            counts[fmt] += 1
            if fmt == "f32":
                writer.add_tensor(name, values)
            else:
                blocks = quantize_blocks(values.reshape(shape[0], -1), fmt)
                writer.add_tensor(name, blocks, raw_dtype=getattr(gguf.GGMLQuantizationType, fmt.upper()))
            if progress is not None:
                progress(i + 1, len(tensors), name, fmt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the half-written file, not the result
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"formats": dict(counts), "bytes": target.stat().st_size}


def _from_gguf(path: Path):
    """(architecture, fields to copy {key: (value, type, sub_type)}, [(name, shape, loader)])."""
    from gguf.quants import dequantize

    from memlm.formats.gguf_header import read_header

    types: dict = {}
    values, infos = read_header(path, types)
    arch = values.get("general.architecture")
    if arch is None:
        raise ModelFormatError(f"{path} has no general.architecture")
    fields = {}
    for key, value in values.items():
        if key in _HEADER_FIELDS or key in _REPLACED_FIELDS:
            continue
        vtype, sub_type = types[key]
        fields[key] = (value, vtype, sub_type)
    tensors = []
    for tensor in infos:
        shape = tuple(int(d) for d in reversed(tensor.shape))

        def load(t=tensor):
            try:
                return dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise ModelFormatError(f"tensor {t.name}: GGUF type {t.tensor_type.name} is not supported") from None

        tensors.append((tensor.name, shape, load))
    return arch, fields, tensors


def _from_hf(source: str):
    """The same from a Hugging Face folder or an embedded model's name (its cached fp32 folder)."""
    from gguf import GGUFValueType

    from memlm.formats.gguf_file import _unpermute_index
    from memlm.formats.hf_folder import read_hf_folder
    from memlm.formats.loading import resolve

    kind, folder = resolve(source)
    if kind != "hf":
        raise MemlmError(f"{source}: memlm quantize reads a GGUF file or a Hugging Face model folder")
    config, weights, tokenizer = read_hf_folder(folder)
    if config.arch not in ("llama", "qwen2", "qwen3") or config.rope_scaling:
        raise MemlmError(f"memlm quantize writes llama, qwen2 and qwen3 models without RoPE scaling, not {config.arch}")
    arch, s = config.arch, GGUFValueType.STRING
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    fields = {
        "general.name": (folder.name, s, None),
        f"{arch}.block_count": (config.num_layers, u32, None),
        f"{arch}.context_length": (config.max_position_embeddings, u32, None),
        f"{arch}.embedding_length": (config.hidden_size, u32, None),
        f"{arch}.feed_forward_length": (config.intermediate_size, u32, None),
        f"{arch}.attention.head_count": (config.num_heads, u32, None),
        f"{arch}.attention.head_count_kv": (config.num_kv_heads, u32, None),
        f"{arch}.attention.key_length": (config.head_dim, u32, None),
        f"{arch}.attention.value_length": (config.head_dim, u32, None),
        f"{arch}.attention.layer_norm_rms_epsilon": (config.rms_norm_eps, f32, None),
        f"{arch}.rope.freq_base": (config.rope_theta, f32, None),
        f"{arch}.vocab_size": (config.vocab_size, u32, None),
    }
    fields.update(_tokenizer_fields(folder, tokenizer))
    permute = arch == "llama"  # llama.cpp's converter reorders these Q/K rows (gguf_file undoes it)
    tensors = []
    for hf_name, w in weights.items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        name = _gguf_name(hf_name)
        heads = None
        if permute and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if "attn_q" in name else config.num_kv_heads
        tensors.append((name, tuple(w.shape), _hf_loader(w, heads, _unpermute_index)))
    return arch, fields, tensors


def _hf_loader(w, heads, unpermute_index):
    def load():
        values = w.dequantize() if hasattr(w, "dequantize") else w.float()
        if heads:  # the inverse of the reader's row order: row i of the file is row index[i]'s inverse
            index = unpermute_index(values.shape[0], heads)
            inverse = index.argsort()
            values = values[inverse]
        return values.numpy()

    return load


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _TO_GGUF:
        return f"blk.{parts[2]}.{_TO_GGUF[parts[3]]}"
    raise ModelFormatError(f"memlm quantize cannot write tensor {hf_name!r} to GGUF")


def _tokenizer_fields(folder: Path, tokenizer) -> dict:
    """tokenizer.ggml.* for a byte-level BPE tokenizer.json, as llama.cpp's converter writes them."""
    from gguf import GGUFValueType

    data = json.loads((folder / "tokenizer.json").read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise MemlmError(f"{folder}: memlm quantize writes byte-level BPE tokenizers, not {model.get('type')}")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise MemlmError(f"{folder}: the tokenizer's ids are not contiguous")
    added = {t["content"]: t.get("special", False) for t in data.get("added_tokens", [])}
    types = [(3 if added[t] else 4) if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = json.dumps(data.get("pre_tokenizer") or {})
    s, a, i32 = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.INT32
    u32, b = GGUFValueType.UINT32, GGUFValueType.BOOL
    fields = {
        "tokenizer.ggml.model": ("gpt2", s, None),
        "tokenizer.ggml.pre": ("smollm" if '"individual_digits": true' in pre else "gpt2", s, None),
        "tokenizer.ggml.tokens": (tokens, a, s),
        "tokenizer.ggml.token_type": (types, a, i32),
        "tokenizer.ggml.merges": (merges, a, s),
        "tokenizer.ggml.add_bos_token": (bool(tokenizer.add_bos_token), b, None),
    }
    if tokenizer.bos_token_id is not None:
        fields["tokenizer.ggml.bos_token_id"] = (tokenizer.bos_token_id, u32, None)
    if tokenizer.eos_token_id is not None:
        fields["tokenizer.ggml.eos_token_id"] = (tokenizer.eos_token_id, u32, None)
    if tokenizer.chat_template:
        fields["tokenizer.chat_template"] = (tokenizer.chat_template, s, None)
    return fields
