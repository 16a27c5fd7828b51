"""Linear and embedding layers over quantized weights (`QWeight`), and turning a model into them.

`QLinear` multiplies with the quantized weight directly through the native kernels (fp32
activations, each weight byte read once per group of 8 activation rows). Long chunks (prefill,
latent insertion) dequantize the weight once into a scratch fp32 matrix and use torch's GEMM,
which is compute-bound there and faster than any GEMV; with int8 activations Q4_0 / Q4_1 stay on
their integer kernels at any length, and on an AVX-512 build every format does (16-row panels of
the weight decoded per call, multiplied with vpdpbusd). Without the native kernels (another CPU,
CUDA, no compiler) the portable path dequantizes with the torch reference and calls F.linear.

Quantized models are for inference: fp32 stays the reference and the training path, and a LoRA
adapter is merged into the fp32 weights before they are quantized.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from memlm.errors import MemlmError
from memlm.kernels import QMat, native
from memlm.quant.qweight import FORMATS, MIXED, QWeight, format_for_width

# Up to this many activation rows, the native kernel beats dequantize + GEMM (it reads the weight
# once per 8 rows); past it, GEMM's compute efficiency wins. Measured on the embedded model.
NATIVE_MAX_ROWS = 32
# Except with int8 activations on Q4_0 / Q4_1, whose integer kernels (two blocks per load) beat
# dequantize + fp32 GEMM at every chunk length (one thread, 512 rows: 8192 x 2048 Q4_0 1.50-1.55x,
# 1536 x 576 Q4_1 1.13-1.34x; 64 rows 1.8-3x): a long chunk (a prefill) runs on them too. The other
# formats keep the GEMM past NATIVE_MAX_ROWS: at 512 rows they break even (Q4_K 0.97-1.24x by
# shape, Q5_K, Q8_0) or lose (Q6_K 0.49x, Q5_0 at 576 wide 0.45x). `python bench/prefill_kernels.py`.
# On an AVX-512 build every format has an integer kernel that beats the GEMM on long chunks (16-row
# panels, `mk_panel_min_rows`): all of them keep int8 activations at any length there.
INT8_GEMM_FORMATS = frozenset({"q4_0", "q4_1"})
MAX_PARTS = 64  # row groups of different formats in one matrix (the kernels' bound)


def qmat(weight: QWeight, bias: torch.Tensor | None = None, lora=None, lora_bt: torch.Tensor | None = None):
    """The kernels' descriptor of a weight, and optionally of a LoRA adapter beside it (a
    LoRALinear, with its B transposed and contiguous in `lora_bt`): pointers into their tensors,
    so keep them alive. A MIXED weight's part descriptors live in the weight itself."""
    if weight.parts:
        desc = QMat(MIXED.code, weight.shape[0], weight.shape[1], None, None, None, None)
        desc.parts, desc.nparts = _part_descriptors(weight, bias), len(weight.parts)
    else:
        d = weight.d.data_ptr() if weight.d is not None else None
        m = weight.m.data_ptr() if weight.m is not None else None
        b = bias.data_ptr() if bias is not None else None
        desc = QMat(weight.format.code, weight.shape[0], weight.shape[1], weight.qs.data_ptr(), d, m, b)
    if lora is not None:
        desc.lora_a, desc.lora_bt = lora.lora_a.data_ptr(), lora_bt.data_ptr()
        desc.rank, desc.scaling = lora.rank, lora.scaling
    return desc


def _part_descriptors(weight: QWeight, bias: torch.Tensor | None):
    """An array of the parts' descriptors, each with its slice of the bias, cached on the weight
    (descriptors copied into a layer's point at it, so it lives as long as the weight)."""
    if len(weight.parts) > MAX_PARTS:
        raise MemlmError(f"a matrix of mixed formats has at most {MAX_PARTS} parts")
    key = bias.data_ptr() if bias is not None else 0
    if key not in weight.native:
        parts, row = (QMat * len(weight.parts))(), 0
        for i, part in enumerate(weight.parts):
            part_bias = bias[row : row + part.shape[0]] if bias is not None else None
            parts[i] = qmat(part, part_bias)
            row += part.shape[0]
        weight.native[key] = parts
    return ctypes.cast(weight.native[key], ctypes.POINTER(QMat))


def _native_ok(x: torch.Tensor, weight: QWeight):
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    return native()


ACTIVATIONS = ("float32", "q8_0")


class QLinear(nn.Module):
    """y = x W^T + b with W quantized. `activations`: float32 multiplies the reference weights
    exactly (up to summation order); q8_0 quantizes each 32-value block of x to int8 first, as
    llama.cpp does, for integer dot products (faster, most of all in batches)."""

    activations = "float32"

    def __init__(self, weight: QWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight = weight
        self.bias = nn.Parameter(bias.float().contiguous(), requires_grad=False) if bias is not None else None
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._desc = qmat(weight, self.bias)
        lib = native()
        panels = lib is not None and hasattr(lib, "mk_panel_min_rows") and lib.mk_panel_min_rows() > 0
        self._int8_gemm = panels or all(part.format.name in INT8_GEMM_FORMATS for part in weight.parts or (weight,))

    def native_max_rows(self) -> int | None:
        """The longest chunk this layer multiplies with the native kernel (None: any)."""
        return None if self.activations == "q8_0" and self._int8_gemm else NATIVE_MAX_ROWS

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized fp32 weight (a fresh tensor: for inspection and export, not the hot path)."""
        return self.qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = _native_ok(x, self.qweight)
        rows = x.numel() // self.in_features
        limit = self.native_max_rows()
        if lib is None or (limit is not None and rows > limit):
            w = self.dequantized_native(lib) if lib is not None else self.qweight.to(x.device).dequantize()
            return F.linear(x, w.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)
        x2 = x.reshape(rows, self.in_features).contiguous()
        y = torch.empty(rows, self.out_features)
        q8 = int(self.activations == "q8_0")
        lib.mk_matmul(
            ctypes.byref(self._desc), x2.data_ptr(), rows, self.in_features, y.data_ptr(), self.out_features, q8
        )
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized_native(self, lib) -> torch.Tensor:
        out = torch.empty(self.qweight.shape)
        lib.mk_dequantize(ctypes.byref(self._desc), None, self.out_features, out.data_ptr())
        return out

    def extra_repr(self) -> str:
        fmt = self.qweight.format.name
        return f"{self.in_features}, {self.out_features}, format={fmt}, bias={self.bias is not None}"


class QEmbedding(nn.Module):
    """Token embeddings looked up from a quantized table: only the rows asked for are dequantized."""

    def __init__(self, weight: QWeight):
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self._desc = qmat(weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.long).contiguous()
        lib = _native_ok(torch.empty(0), self.qweight) if ids.device.type == "cpu" else None
        if lib is None:
            out = self.qweight.to(ids.device).dequantize(flat)
        else:
            out = torch.empty(flat.numel(), self.embedding_dim)
            lib.mk_dequantize(ctypes.byref(self._desc), flat.data_ptr(), flat.numel(), out.data_ptr())
        return out.view(*ids.shape, self.embedding_dim)


# ---- turning a model's layers into quantized ones ----------------------------------------------


def install_quantized(model: nn.Module, name: str, weight: QWeight) -> None:
    """Put `weight` in place of the parameter `name` (e.g. 'layers.0.mlp.down_proj.weight')."""
    path, _, leaf = name.rpartition(".")
    if leaf != "weight":
        raise MemlmError(f"only weights are quantized, not {name}")
    parent_name, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    child = getattr(parent, child_name)
    if isinstance(child, nn.Embedding | QEmbedding):
        setattr(parent, child_name, QEmbedding(weight))
    else:
        bias = child.bias if isinstance(child, nn.Linear | QLinear) else None
        setattr(parent, child_name, QLinear(weight, bias))


def quantize_model(model: nn.Module, fmt: str) -> nn.Module:
    """Quantize every float nn.Linear and nn.Embedding of a Llama-family model to `fmt`, in place.

    Layers already quantized (read as they are from a GGUF file) are left alone. Tied embeddings
    stay tied: the LM head multiplies with the embedding table's quantized blocks. A matrix whose
    input size is not a whole number of the format's blocks takes llama.cpp's fallback format
    (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); one with no 32-value block layout stays float32.
    """
    if fmt not in FORMATS:
        raise MemlmError(f"unknown quantized format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tied = model.config.tie_word_embeddings
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if tied and child is model.lm_head:
                continue  # shares the embedding table: tied again below
            if type(child) is nn.Linear and (chosen := format_for_width(fmt, child.in_features)):
                setattr(parent, name, QLinear(QWeight.quantize(child.weight, chosen), child.bias))
            elif type(child) is nn.Embedding and (chosen := format_for_width(fmt, child.embedding_dim)):
                setattr(parent, name, QEmbedding(QWeight.quantize(child.weight, chosen)))
    tie_quantized_head(model, tied)
    return model


def tie_quantized_head(model: nn.Module, tied: bool) -> None:
    """With tied embeddings, the LM head reads the embedding table's quantized blocks."""
    if tied and isinstance(model.embed_tokens, QEmbedding):
        model.lm_head = QLinear(model.embed_tokens.qweight)


def set_activations(model: nn.Module, activations: str) -> None:
    """Choose how every quantized linear layer of the model treats its input (see QLinear)."""
    if activations not in ACTIVATIONS:
        raise MemlmError(f"unknown activations {activations!r}; choose one of {', '.join(ACTIVATIONS)}")
    for module in model.modules():
        if isinstance(module, QLinear):
            module.activations = activations
