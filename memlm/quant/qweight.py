"""GGUF block-quantized weights (Q4_0, Q4_1, Q8_0) held as they are, never expanded to fp32.

A GGUF tensor of these formats is a sequence of 32-value blocks per output row:

    Q4_0: f16 d,          16 bytes of nibbles   value = d * (q - 8)
    Q4_1: f16 d, f16 m,   16 bytes of nibbles   value = d * q + m
    Q8_0: f16 d,          32 int8               value = d * q

(byte j of a 4-bit block holds value j in its low nibble and value j + 16 in its high one).
`QWeight` keeps the same bits split into columns: `qs` [out, in/2] uint8 or [out, in] int8, `d`
and `m` [out, in/32] float16, which the native kernels stream with aligned, unit-stride loads.
`dequantize` is the torch reference, equal bit for bit to the gguf package's (a multiply, then an
add, in float32: no fused multiply-add); `quantize` is the gguf package's own quantizer.

Blocks run along the input dimension, so output rows can be concatenated, selected or permuted
exactly: fusing q/k/v or gate/up projections costs nothing and changes no bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from memlm.errors import ModelFormatError

BLOCK = 32


@dataclass(frozen=True, slots=True)
class Format:
    name: str
    code: int  # the native kernels' format id
    bits: int
    has_min: bool

    @property
    def block_bytes(self) -> int:
        return 2 + (2 if self.has_min else 0) + BLOCK * self.bits // 8

    @property
    def gguf_type(self):
        import gguf  # lazy: only to name a block type to the gguf package

        return getattr(gguf.GGMLQuantizationType, self.name.upper())


FORMATS = {
    "q4_0": Format("q4_0", 0, 4, False),
    "q4_1": Format("q4_1", 1, 4, True),
    "q8_0": Format("q8_0", 2, 8, False),
}


def format_of_gguf_type(tensor_type) -> Format | None:
    """The format a GGUF tensor type is stored in, if memlm runs it natively."""
    return FORMATS.get(tensor_type.name.lower())


@dataclass(frozen=True, slots=True)
class QWeight:
    """A [out, in] matrix in one of FORMATS."""

    format: Format
    shape: tuple[int, int]
    qs: torch.Tensor  # uint8 [out, in/2] (4-bit) or int8 [out, in] (8-bit)
    d: torch.Tensor  # float16 [out, in/32]
    m: torch.Tensor | None  # float16 [out, in/32] (Q4_1) or None

    # ---- conversions ---------------------------------------------------------------------------

    @classmethod
    def from_gguf_blocks(cls, raw: np.ndarray, fmt: Format, shape: tuple[int, int]) -> QWeight:
        """From a GGUF tensor's bytes ([out, row_bytes] uint8, as gguf's reader exposes them)."""
        out, inp = shape
        if inp % BLOCK:
            raise ModelFormatError(f"a {fmt.name} matrix needs rows that are whole blocks of {BLOCK}, got {inp}")
        blocks = np.ascontiguousarray(raw).reshape(out, inp // BLOCK, fmt.block_bytes)
        d = torch.from_numpy(np.ascontiguousarray(blocks[..., 0:2]).view(np.float16).reshape(out, -1))
        m = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).reshape(out, -1))
        start = 4 if fmt.has_min else 2
        qs = np.ascontiguousarray(blocks[..., start:]).reshape(out, -1)
        qs = torch.from_numpy(qs.view(np.int8) if fmt.bits == 8 else qs)
        return cls(fmt, (out, inp), qs, d, m if fmt.has_min else None)

    def to_gguf_blocks(self) -> np.ndarray:
        """The inverse of `from_gguf_blocks`: [out, row_bytes] uint8 in GGUF block layout."""
        out, inp = self.shape
        parts = [self.d.numpy().view(np.uint8).reshape(out, -1, 2)]
        if self.m is not None:
            parts.append(self.m.numpy().view(np.uint8).reshape(out, -1, 2))
        parts.append(self.qs.numpy().view(np.uint8).reshape(out, inp // BLOCK, -1))
        return np.concatenate(parts, axis=-1).reshape(out, -1)

    @classmethod
    def quantize(cls, weight: torch.Tensor, fmt: Format | str) -> QWeight:
        """Quantize a float [out, in] matrix with the gguf package's reference quantizer."""
        from gguf.quants import quantize  # lazy: quantizing float weights is a load-time job

        fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
        w = weight.detach().float().cpu().contiguous().numpy()
        if w.ndim != 2 or w.shape[1] % BLOCK:
            raise ModelFormatError(f"{fmt.name} quantizes [out, in] matrices with in a multiple of {BLOCK}")
        return cls.from_gguf_blocks(quantize(w, fmt.gguf_type), fmt, tuple(w.shape))

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [out, in] (or [len(rows), in]): the reference semantics, equal to gguf's bit for bit."""
        qs, d, m = self.qs, self.d, self.m
        if rows is not None:
            qs, d, m = qs[rows], d[rows], (m[rows] if m is not None else None)
        n, blocks = d.shape
        if self.format.bits == 8:
            q = qs.view(n, blocks, BLOCK).float()
        else:
            nibbles = qs.view(n, blocks, BLOCK // 2)
            q = torch.stack((nibbles & 0x0F, nibbles >> 4), dim=2).view(n, blocks, BLOCK).float()
            if not self.format.has_min:
                q = q - 8.0
        values = d.float()[..., None] * q
        if m is not None:
            values = values + m.float()[..., None]
        return values.view(n, blocks * BLOCK)

    # ---- row operations (exact: blocks run along the input dimension) -------------------------

    @staticmethod
    def cat(parts: list[QWeight]) -> QWeight:
        fmt, inp = parts[0].format, parts[0].shape[1]
        if any(p.format != fmt or p.shape[1] != inp for p in parts):
            raise ModelFormatError("cannot fuse quantized matrices of different formats or widths")
        m = torch.cat([p.m for p in parts]) if fmt.has_min else None
        out = sum(p.shape[0] for p in parts)
        return QWeight(fmt, (out, inp), torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), m)

    def select_rows(self, index: torch.Tensor) -> QWeight:
        m = self.m[index] if self.m is not None else None
        return QWeight(self.format, (len(index), self.shape[1]), self.qs[index], self.d[index], m)

    def split_rows(self, sizes: tuple[int, ...]) -> list[QWeight]:
        out, start = [], 0
        for size in sizes:
            out.append(self.select_rows(torch.arange(start, start + size)))
            start += size
        return out

    def to(self, device: torch.device | str) -> QWeight:
        m = self.m.to(device) if self.m is not None else None
        return QWeight(self.format, self.shape, self.qs.to(device), self.d.to(device), m)

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)


# ---- in safetensors files ----------------------------------------------------------------------
# A QWeight `name` is stored as the tensors `name.qs`, `name.d` (and `name.m`), and listed in the
# file's metadata under QUANTIZED_KEY as {name: format}. Only memlm reads such folders.

QUANTIZED_KEY = "memlm.quantized"


def pack_quantized(weights: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights (tensors and QWeights) -> (plain tensors, safetensors metadata)."""
    tensors, formats = {}, {}
    for name, w in weights.items():
        if isinstance(w, QWeight):
            formats[name] = w.format.name
            tensors[f"{name}.qs"], tensors[f"{name}.d"] = w.qs.contiguous(), w.d.contiguous()
            if w.m is not None:
                tensors[f"{name}.m"] = w.m.contiguous()
        else:
            tensors[name] = w
    return tensors, ({QUANTIZED_KEY: json.dumps(formats)} if formats else {})


def unpack_quantized(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict:
    """The inverse of `pack_quantized`."""
    if not metadata or QUANTIZED_KEY not in metadata:
        return tensors
    out = dict(tensors)
    for name, fmt_name in json.loads(metadata[QUANTIZED_KEY]).items():
        fmt = FORMATS.get(fmt_name)
        if fmt is None or f"{name}.qs" not in out:
            raise ModelFormatError(f"quantized tensor {name!r} is incomplete or in an unknown format {fmt_name!r}")
        qs, d = out.pop(f"{name}.qs"), out.pop(f"{name}.d")
        m = out.pop(f"{name}.m", None)
        shape = (qs.shape[0], qs.shape[1] * 8 // fmt.bits)
        out[name] = QWeight(fmt, shape, qs, d, m)
    return out
