"""GGUF block-quantized weights held as they are, never expanded to fp32.

Two storage layouts. Q4_0, Q4_1 and Q8_0 ("columns") are sequences of 32-value blocks per output row:

    Q4_0: f16 d,          16 bytes of nibbles   value = d * (q - 8)
    Q4_1: f16 d, f16 m,   16 bytes of nibbles   value = d * q + m
    Q8_0: f16 d,          32 int8               value = d * q

(byte j of a 4-bit block holds value j in its low nibble and value j + 16 in its high one).
`QWeight` keeps the same bits split into columns: `qs` [out, in/2] uint8 or [out, in] int8, `d`
and `m` [out, in/32] float16, which the native kernels stream with aligned, unit-stride loads.
`dequantize` is the torch reference, equal bit for bit to the gguf package's (a multiply, then an
add, in float32: no fused multiply-add); `quantize` is the gguf package's own quantizer.

Q5_0, Q5_1 and the K-quants Q2_K..Q6_K ("blocks") keep the file's block bytes unchanged, `qs`
[out, row_bytes] uint8 (d and m None); their torch reference is quant/blocks.py and the kernels
read the same bytes. Their `quantize` is memlm's own quantizer (quant/kquants.py).

Blocks run along the input dimension, so output rows can be concatenated, selected or permuted
exactly: fusing q/k/v or gate/up projections costs nothing and changes no bit. Rows of different
formats (a Q4_K_M file's Q4_K q/k beside its Q6_K v) fuse into a MIXED weight whose `parts` keep
each format; the kernels run each part on its own output rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

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
    block_size: int = BLOCK  # values per block
    raw_bytes: int = 0  # bytes per block of the "blocks" layout (0: the "columns" layout)

    @property
    def block_bytes(self) -> int:
        if self.raw_bytes:
            return self.raw_bytes
        return 2 + (2 if self.has_min else 0) + BLOCK * self.bits // 8

    @property
    def raw(self) -> bool:
        """Stored as the file's block bytes (not split into columns)."""
        return self.raw_bytes > 0

    @property
    def gguf_type(self):
        import gguf  # lazy: only to name a block type to the gguf package

        return getattr(gguf.GGMLQuantizationType, self.name.upper())


FORMATS = {
    "q4_0": Format("q4_0", 0, 4, False),
    "q4_1": Format("q4_1", 1, 4, True),
    "q8_0": Format("q8_0", 2, 8, False),
    "q5_0": Format("q5_0", 3, 5, False, 32, 22),
    "q5_1": Format("q5_1", 4, 5, True, 32, 24),
    "q2_k": Format("q2_k", 5, 2, True, 256, 84),
    "q3_k": Format("q3_k", 6, 3, False, 256, 110),
    "q4_k": Format("q4_k", 7, 4, True, 256, 144),
    "q5_k": Format("q5_k", 8, 5, True, 256, 176),
    "q6_k": Format("q6_k", 9, 6, False, 256, 210),
}
# Rows of several formats fused into one matrix (see QWeight.cat); not a GGUF type.
MIXED = Format("mixed", -1, 0, False)


# llama.cpp's substitutes for K-quants on rows that are not whole super-blocks of 256.
K_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def format_for_width(fmt: str, width: int) -> str | None:
    """The format a matrix with rows of `width` values is stored in when `fmt` is asked for: fmt,
    its fallback when the rows are not whole blocks of it, None when no format fits (float32)."""
    if width % FORMATS[fmt].block_size == 0:
        return fmt
    fallback = K_FALLBACK.get(fmt)
    return fallback if fallback and width % FORMATS[fallback].block_size == 0 else None


def format_of_gguf_type(tensor_type) -> Format | None:
    """The format a GGUF tensor type is stored in, if memlm runs it natively."""
    return FORMATS.get(tensor_type.name.lower())


@dataclass(frozen=True, slots=True)
class QWeight:
    """A [out, in] matrix in one of FORMATS (or MIXED: row groups in their own formats)."""

    format: Format
    shape: tuple[int, int]
    qs: torch.Tensor  # uint8 [out, in/2] (4-bit) or int8 [out, in] (8-bit); raw formats: [out, row_bytes]
    d: torch.Tensor | None  # float16 [out, in/32] (columns layout only)
    m: torch.Tensor | None  # float16 [out, in/32] (Q4_1) or None
    parts: tuple[QWeight, ...] = ()  # MIXED only, in row order
    # The kernels' descriptors of MIXED parts, built once and kept alive with the weight (qlinear.qmat).
    native: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- conversions ---------------------------------------------------------------------------

    @classmethod
    def from_gguf_blocks(cls, raw: np.ndarray, fmt: Format, shape: tuple[int, int]) -> QWeight:
        """From a GGUF tensor's bytes ([out, row_bytes] uint8, as gguf's reader exposes them)."""
        out, inp = _checked_shape(fmt, shape)
        if fmt.raw:  # the file's bytes as they are (copied unless already a private, writable array)
            private = raw.flags.writeable and raw.flags.c_contiguous and raw.dtype == np.uint8
            row_bytes = inp // fmt.block_size * fmt.block_bytes
            qs = (raw if private else np.array(raw, dtype=np.uint8)).reshape(out, row_bytes)
            return cls(fmt, (out, inp), torch.from_numpy(qs), None, None)
        return cls._from_columns(fmt, (out, inp), *_columns(np.asarray(raw), fmt, out, inp))

    @classmethod
    def read_gguf_blocks(cls, read, fmt: Format, shape: tuple[int, int], chunk_rows: int = 4096) -> QWeight:
        """From a GGUF tensor in a file: `read(first_row, rows)` -> those rows' bytes. The column
        layout is filled a chunk of rows at a time, so the file's bytes and the layout never both
        hold the whole matrix (a 262k-row Q8_0 embedding would otherwise peak at twice its size)."""
        out, inp = _checked_shape(fmt, shape)
        if fmt.raw:
            return cls.from_gguf_blocks(read(0, out), fmt, shape)
        nb, start = inp // BLOCK, 4 if fmt.has_min else 2
        d = np.empty((out, nb), np.float16)
        m = np.empty((out, nb), np.float16) if fmt.has_min else None
        qs = np.empty((out, nb * (fmt.block_bytes - start)), np.uint8)
        for r0 in range(0, out, chunk_rows):
            r1 = min(out, r0 + chunk_rows)
            cd, cm, cq = _columns(read(r0, r1 - r0), fmt, r1 - r0, inp)
            d[r0:r1], qs[r0:r1] = cd, cq
            if m is not None:
                m[r0:r1] = cm
        return cls._from_columns(fmt, (out, inp), d, m, qs)

    @classmethod
    def _from_columns(cls, fmt: Format, shape, d: np.ndarray, m: np.ndarray | None, qs: np.ndarray) -> QWeight:
        qs_t = torch.from_numpy(qs.view(np.int8) if fmt.bits == 8 else qs)
        return cls(fmt, shape, qs_t, torch.from_numpy(d), torch.from_numpy(m) if m is not None else None)

    def to_gguf_blocks(self) -> np.ndarray:
        """The inverse of `from_gguf_blocks`: [out, row_bytes] uint8 in GGUF block layout."""
        if self.parts:
            raise ModelFormatError("a matrix of mixed formats has no single GGUF block layout")
        if self.format.raw:
            return self.qs.numpy().copy()
        out, inp = self.shape
        parts = [self.d.numpy().view(np.uint8).reshape(out, -1, 2)]
        if self.m is not None:
            parts.append(self.m.numpy().view(np.uint8).reshape(out, -1, 2))
        parts.append(self.qs.numpy().view(np.uint8).reshape(out, inp // BLOCK, -1))
        return np.concatenate(parts, axis=-1).reshape(out, -1)

    @classmethod
    def quantize(cls, weight: torch.Tensor, fmt: Format | str) -> QWeight:
        """Quantize a float [out, in] matrix: the gguf package's reference quantizer where it has
        one, memlm's (ggml's algorithms, quant/kquants.py) for the K-quants."""
        from memlm.quant.kquants import quantize_blocks  # lazy: a load-time job

        fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
        w = weight.detach().float().cpu().contiguous().numpy()
        if w.ndim != 2 or w.shape[1] % fmt.block_size:
            raise ModelFormatError(f"{fmt.name} quantizes [out, in] matrices with in a multiple of {fmt.block_size}")
        return cls.from_gguf_blocks(quantize_blocks(w, fmt.name), fmt, tuple(w.shape))

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [out, in] (or [len(rows), in]): the reference semantics, equal to gguf's bit for bit."""
        if self.parts:
            full = torch.cat([p.dequantize() for p in self.parts])
            return full if rows is None else full[rows]
        if self.format.raw:
            from memlm.quant import blocks as raw_blocks  # lazy: the reference decoders

            qs = self.qs if rows is None else self.qs[rows]
            n, inp = qs.shape[0], self.shape[1]
            per_row = qs.reshape(n * (inp // self.format.block_size), self.format.block_bytes)
            return raw_blocks.dequantize(self.format.name, per_row).view(n, inp)
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
        """Rows of `parts` one after another: one format stays that format, several make MIXED."""
        inp = parts[0].shape[1]
        if any(p.shape[1] != inp for p in parts):
            raise ModelFormatError("cannot fuse quantized matrices of different widths")
        flat = [q for p in parts for q in (p.parts or (p,))]
        runs: list[list[QWeight]] = []  # consecutive parts of one format join into one block of rows
        for q in flat:
            if runs and runs[-1][0].format == q.format:
                runs[-1].append(q)
            else:
                runs.append([q])
        joined = [QWeight._cat_same(run) for run in runs]
        if len(joined) == 1:
            return joined[0]
        out = sum(p.shape[0] for p in joined)
        return QWeight(MIXED, (out, inp), joined[0].qs, None, None, tuple(joined))

    @staticmethod
    def _cat_same(parts: list[QWeight]) -> QWeight:
        if len(parts) == 1:
            return parts[0]
        fmt, inp = parts[0].format, parts[0].shape[1]
        out = sum(p.shape[0] for p in parts)
        qs = torch.cat([p.qs for p in parts])
        if fmt.raw:
            return QWeight(fmt, (out, inp), qs, None, None)
        m = torch.cat([p.m for p in parts]) if fmt.has_min else None
        return QWeight(fmt, (out, inp), qs, torch.cat([p.d for p in parts]), m)

    def select_rows(self, index: torch.Tensor) -> QWeight:
        if self.parts:
            raise ModelFormatError("rows of a matrix of mixed formats are selected per part")
        d = self.d[index] if self.d is not None else None
        m = self.m[index] if self.m is not None else None
        return QWeight(self.format, (len(index), self.shape[1]), self.qs[index], d, m)

    def split_rows(self, sizes: tuple[int, ...]) -> list[QWeight]:
        if self.parts and tuple(p.shape[0] for p in self.parts) == tuple(sizes):
            return list(self.parts)
        out, start = [], 0
        for size in sizes:
            out.append(self.select_rows(torch.arange(start, start + size)))
            start += size
        return out

    def to(self, device: torch.device | str) -> QWeight:
        if self.parts:
            parts = tuple(p.to(device) for p in self.parts)
            return QWeight(MIXED, self.shape, parts[0].qs, None, None, parts)
        d = self.d.to(device) if self.d is not None else None
        m = self.m.to(device) if self.m is not None else None
        return QWeight(self.format, self.shape, self.qs.to(device), d, m)

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def nbytes(self) -> int:
        if self.parts:
            return sum(p.nbytes for p in self.parts)
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats its rows are stored in (one, or MIXED's parts')."""
        return tuple(p.format.name for p in self.parts) if self.parts else (self.format.name,)


# ---- in safetensors files ----------------------------------------------------------------------
# A QWeight `name` is stored as the tensors `name.qs`, `name.d` (and `name.m`), and listed in the
# file's metadata under QUANTIZED_KEY as {name: format}. Only memlm reads such folders.

QUANTIZED_KEY = "memlm.quantized"


def pack_quantized(weights: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights (tensors and QWeights) -> (plain tensors, safetensors metadata)."""
    tensors, formats = {}, {}
    for name, w in weights.items():
        if isinstance(w, QWeight):
            if w.parts:
                raise ModelFormatError(f"{name}: a matrix of mixed formats is saved per part, before fusing")
            formats[name] = w.format.name
            tensors[f"{name}.qs"] = w.qs.contiguous()
            if w.d is not None:
                tensors[f"{name}.d"] = w.d.contiguous()
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
        qs, d = out.pop(f"{name}.qs"), out.pop(f"{name}.d", None)
        m = out.pop(f"{name}.m", None)
        if fmt.raw:
            shape = (qs.shape[0], qs.shape[1] // fmt.block_bytes * fmt.block_size)
        else:
            shape = (qs.shape[0], qs.shape[1] * 8 // fmt.bits)
        out[name] = QWeight(fmt, shape, qs, d, m)
    return out


def _checked_shape(fmt: Format, shape: tuple[int, int]) -> tuple[int, int]:
    out, inp = shape
    if inp % fmt.block_size:
        raise ModelFormatError(f"a {fmt.name} matrix needs rows that are whole blocks of {fmt.block_size}, got {inp}")
    return out, inp


def _columns(raw: np.ndarray, fmt: Format, out: int, inp: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """GGUF blocks of a column-layout format (Q4_0, Q4_1, Q8_0) as (d [out, in/32] float16, m or
    None, qs [out, code bytes]): the layout memlm's kernels read."""
    blocks = np.ascontiguousarray(raw).reshape(out, inp // BLOCK, fmt.block_bytes)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16).reshape(out, -1)
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).reshape(out, -1) if fmt.has_min else None
    start = 4 if fmt.has_min else 2
    return d, m, np.ascontiguousarray(blocks[..., start:]).reshape(out, -1)
