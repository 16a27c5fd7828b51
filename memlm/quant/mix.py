"""Which block format each tensor of a model gets, for llama.cpp's file types (the `_M` mixes).

llama.cpp names a file type by its main format, and keeps some tensors at higher precision
(`llama_tensor_get_type`); memlm's quantizer follows the same rules so that its Q4_K_M file has the
layout of llama.cpp's:

- 1-D tensors (norms, biases) stay F32.
- The output matrix (or the token embeddings when the output is tied to them) takes Q6_K, except in
  a Q8_0 file where it stays Q8_0.
- Q4_K_M and Q5_K_M: attn_v and ffn_down take Q6_K in the layers `use_more_bits` picks (the first
  and last eighth of the layers, and every third layer between them).
- A K-quant on rows that are not whole super-blocks of 256 takes llama.cpp's fallback:
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (the 135M model's 576-wide matrices, for instance).
- F32 keeps every tensor in float32: the unquantized source llama.cpp's own quantizer reads (a
  quantized input dequantized), so both quantizers can be compared on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from memlm.errors import MemlmError


@dataclass(frozen=True, slots=True)
class Scheme:
    name: str  # as llama.cpp spells it (Q4_K_M)
    base: str  # memlm's format name for most matrices
    file_type: int  # llama.cpp's LLAMA_FTYPE_MOSTLY_* (general.file_type)
    more_bits: bool = False  # the _M mix: Q6_K for some attn_v / ffn_down


SCHEMES = {
    s.name: s
    for s in (
        Scheme("F32", "f32", 0),
        Scheme("Q4_0", "q4_0", 2),
        Scheme("Q8_0", "q8_0", 7),
        Scheme("Q4_K_M", "q4_k", 15, more_bits=True),
        Scheme("Q5_K_M", "q5_k", 17, more_bits=True),
        Scheme("Q6_K", "q6_k", 18),
    )
}


def scheme(name: str) -> Scheme:
    key = name.upper()
    if key not in SCHEMES:
        raise MemlmError(f"unknown quantization type {name!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[key]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that keep more bits in the _M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def plan(tensors: list[tuple[str, tuple[int, ...]]], chosen: Scheme) -> dict[str, str]:
    """{GGUF tensor name: memlm format name, or "f32"} for tensors given as (name, shape) with
    shape in PyTorch order ([out, in] for matrices)."""
    from memlm.quant.qweight import format_for_width  # lazy: the CLI lists SCHEMES without torch

    if chosen.base == "f32":
        return {name: "f32" for name, _ in tensors}
    names = [name for name, _ in tensors]
    has_output = "output.weight" in names
    head = "output.weight" if has_output else "token_embd.weight"
    n_v = sum(n.endswith("attn_v.weight") for n in names)
    n_down = sum(n.endswith("ffn_down.weight") for n in names)
    i_v = i_down = 0
    out = {}
    for name, shape in tensors:
        if len(shape) != 2:
            out[name] = "f32"
            continue
        fmt = chosen.base
        if name == head:
            fmt = "q8_0" if chosen.base == "q8_0" else "q6_k"
        elif name.endswith("attn_v.weight"):
            if chosen.more_bits and use_more_bits(i_v, n_v):
                fmt = "q6_k"
            i_v += 1
        elif name.endswith("ffn_down.weight"):
            if chosen.more_bits and use_more_bits(i_down, n_down):
                fmt = "q6_k"
            i_down += 1
        out[name] = format_for_width(fmt, shape[1]) or "f32"
    return out
