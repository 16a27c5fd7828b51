"""How keys and values are stored: fp32, bf16, or llama.cpp's q8_0 / q4_0 blocks, optionally rotated.

A quantized cache stores each head's vector of `head_dim` values as blocks of 32 along head_dim,
byte for byte as ggml lays them out (`block_q8_0`: an fp16 scale then 32 int8; `block_q4_0`: an
fp16 scale then 16 bytes of nibbles, value j in the low nibble of byte j and value j + 16 in the
high one), and rounds exactly as ggml's reference quantizer (the `gguf` package's `quantize`
equals it bit for bit; the tests hold both). The native decode step quantizes and reads the same
bytes (quant_kernels.cpp), so the two paths see identical keys and values.

Rotation: keys carry outliers in a few channels, and a block's scale is set by its largest value,
so rounding to 4 bits wipes out the small ones. Multiplying keys *and* queries by one orthogonal
matrix R leaves every score unchanged (q.k = Rq.Rk) and spreads each outlier over all channels
before rounding. R is the normalised Walsh-Hadamard matrix, applied as its butterfly (log2(n)
add/subtract passes, then one scale) over blocks of the largest power of two dividing head_dim;
the kernels apply the same butterfly in the same order, so both paths round alike. Values are not
rotated: undoing it would cost a transform of every attention output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memlm.errors import InvalidRequestError

QBLOCK = 32  # values per quantized block along head_dim (ggml's QK8_0 = QK4_0)


@dataclass(frozen=True)
class KVFormat:
    name: str  # f32 | bf16 | q8_0 | q4_0
    code: int  # the kernels' number for it
    block_bytes: int  # bytes per QBLOCK values (0: stored as a torch float dtype)
    dtype: torch.dtype  # element dtype of the storage tensor

    @property
    def quantized(self) -> bool:
        return self.block_bytes > 0

    def row_width(self, head_dim: int) -> int:
        """Elements of the storage tensor's last dim per head vector."""
        return head_dim // QBLOCK * self.block_bytes if self.quantized else head_dim

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def token_bytes(self, config) -> int:
        """Bytes one token's keys and values take in this format, every layer (a model's config)."""
        return 2 * config.num_layers * config.num_kv_heads * self.row_width(config.head_dim) * self.element_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., head_dim] float -> the stored form [..., row_width]."""
        if self.name == "q8_0":
            return _quantize_q8_0(x)
        if self.name == "q4_0":
            return _quantize_q4_0(x)
        return x.to(self.dtype)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored form -> [..., head_dim] values (what attention reads)."""
        if self.name == "q8_0":
            return _dequantize_q8_0(stored).to(dtype)
        if self.name == "q4_0":
            return _dequantize_q4_0(stored).to(dtype)
        return stored.to(dtype)


KV_FORMATS = {
    f.name: f
    for f in (
        KVFormat("f32", 0, 0, torch.float32),
        KVFormat("bf16", 1, 0, torch.bfloat16),
        KVFormat("q8_0", 2, 2 + QBLOCK, torch.uint8),
        KVFormat("q4_0", 3, 2 + QBLOCK // 2, torch.uint8),
    )
}


def stored_as(dtype: torch.dtype) -> KVFormat:
    """The unquantized format of a model dtype (a cache that stores what the model computes)."""
    return next((f for f in KV_FORMATS.values() if f.dtype == dtype), None) or KVFormat(str(dtype), -1, 0, dtype)


def kv_format(name: str, head_dim: int | None = None) -> KVFormat:
    """The format named by `--kv-cache-type` (InvalidRequestError for an unknown one or a head size
    that is not a multiple of 32 for a quantized one)."""
    fmt = KV_FORMATS.get(name)
    if fmt is None:
        raise InvalidRequestError(f"unknown KV cache type {name!r}; choose one of {', '.join(KV_FORMATS)}")
    if fmt.quantized and head_dim is not None and head_dim % QBLOCK:
        raise InvalidRequestError(
            f"KV cache type {name} needs a head size divisible by {QBLOCK} (this model's is {head_dim})"
        )
    return fmt


# ---- ggml's reference quantizers in torch -----------------------------------------------------------


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, exactly as ggml's roundf reference (torch.round rounds half to even)."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _blocks(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // QBLOCK, QBLOCK)


def _scale_bytes(d: torch.Tensor) -> torch.Tensor:
    return d.half().view(torch.uint8).reshape(*d.shape[:-1], 2)


def _scales(stored: torch.Tensor, block_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split stored rows into (fp32 scales [..., nb, 1], payload bytes [..., nb, block_bytes - 2])."""
    blocks = stored.reshape(*stored.shape[:-1], stored.shape[-1] // block_bytes, block_bytes)
    d = blocks[..., :2].contiguous().view(torch.float16).float()
    return d, blocks[..., 2:]


def _quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(x)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(d == 0, 0.0, 1.0 / d)
    qs = _round_away(blocks * inverse).to(torch.int8).view(torch.uint8)
    return torch.cat((_scale_bytes(d), qs), dim=-1).flatten(-2)


def _dequantize_q8_0(stored: torch.Tensor) -> torch.Tensor:
    d, qs = _scales(stored, 2 + QBLOCK)
    return (d * qs.contiguous().view(torch.int8).float()).flatten(-2)


def _quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(x)
    largest = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))  # signed value of largest magnitude
    d = largest / -8
    inverse = torch.where(d == 0, 0.0, 1.0 / d)
    q = (blocks * inverse + 8.5).trunc().clamp(0, 15).to(torch.uint8)
    half = QBLOCK // 2
    qs = q[..., :half] | (q[..., half:] << 4)
    return torch.cat((_scale_bytes(d), qs), dim=-1).flatten(-2)


def _dequantize_q4_0(stored: torch.Tensor) -> torch.Tensor:
    d, qs = _scales(stored, 2 + QBLOCK // 2)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float() - 8
    return (d * q).flatten(-2)


# ---- rotation -----------------------------------------------------------------------------------------


def rotation_block(head_dim: int) -> int:
    """The Hadamard block: the largest power of two dividing head_dim."""
    return head_dim & -head_dim


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim] times the block-diagonal normalised Walsh-Hadamard matrix (orthogonal and
    symmetric, so it is its own inverse): the butterfly, in the kernels' order."""
    head_dim = x.shape[-1]
    n = rotation_block(head_dim)
    y = x.reshape(-1, head_dim // n, n)
    h = 1
    while h < n:
        pairs = y.reshape(*y.shape[:-1], n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(*y.shape[:-1], n)
        h *= 2
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape)
