"""GGUF formats memlm keeps as the file's own blocks (Q5_0, Q5_1 and the K-quants), decoded for
the torch reference.

Every one of these formats dequantizes, per group of 16 consecutive values g of a block, as

    value = fl(fl(S[g] * c) + O[g])

with integer codes c (they fit in int8), a float32 scale S[g] and a float32 offset O[g], computed
exactly as the gguf package computes them (float32 products of the f16 super-scale and the small
integer sub-scale). Formats without an offset use O = -0.0, the identity of IEEE addition (x + -0.0
is x for every x, -0.0 included), so the decomposition is bit-identical to the gguf package's
dequantization. The native kernels decode the same three things from the same bytes, which makes
one matmul kernel serve every format (kernels/quant_kernels.cpp, `decode_superblock`).

Layouts (bytes of one block, in order):
    Q5_0  32 values, 22 B: f16 d, u32 high bits, 16 B nibbles       value = d * (q - 16)
    Q5_1  32 values, 24 B: f16 d, f16 m, u32 high bits, 16 B nibbles value = d * q + m
    Q2_K 256 values, 84 B: 16 B 4+4-bit scales/mins, 64 B 2-bit codes, f16 d, f16 dmin
    Q3_K 256 values, 110 B: 32 B high-bit mask, 64 B 2-bit codes, 12 B 6-bit scales, f16 d
    Q4_K 256 values, 144 B: f16 d, f16 dmin, 12 B 6-bit scales/mins, 128 B nibbles
    Q5_K 256 values, 176 B: f16 d, f16 dmin, 12 B scales/mins, 32 B high bits, 128 B nibbles
    Q6_K 256 values, 210 B: 128 B low nibbles, 64 B 2-bit highs, 16 int8 scales, f16 d
"""

from __future__ import annotations

import torch

GROUP = 16  # values sharing one (scale, offset) pair in the decomposition


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [...] float32 (little-endian f16)."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _bits(raw: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """[..., n] uint8 -> [..., len(shifts), n]: (raw >> s) & mask for each shift."""
    return torch.stack([(raw >> s) & mask for s in shifts], dim=-2)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit minimums (int64 [..., 8])."""
    s = scales.to(torch.int64)
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _per_group(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., k] -> [..., groups] repeating each of the k values groups/k times."""
    return x.repeat_interleave(groups // x.shape[-1], dim=-1)


def decode(name: str, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n, block_bytes] uint8 -> (codes int8 [n, block_size], S float32 [n, G], O float32 [n, G])."""
    n = blocks.shape[0]
    neg_zero = torch.full((), -0.0)
    if name in ("q5_0", "q5_1"):
        has_min = name == "q5_1"
        d = _f16(blocks[:, 0:2])
        start = 4 if has_min else 2
        qh = blocks[:, start : start + 4].to(torch.int64)
        high_word = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
        high = ((high_word[:, None] >> torch.arange(32)) & 1).to(torch.uint8)
        low = _bits(blocks[:, start + 4 :], [0, 4], 0x0F).reshape(n, 32)
        codes = (low | (high << 4)).to(torch.int16)
        if not has_min:
            codes = codes - 16
        scale = d[:, None].expand(n, 2)
        offset = _f16(blocks[:, 2:4])[:, None].expand(n, 2) if has_min else neg_zero.expand(n, 2)
        return codes.to(torch.int8), scale.contiguous(), offset.contiguous()
    if name == "q2_k":
        scales, qs = blocks[:, 0:16], blocks[:, 16:80]
        d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
        codes = _bits(qs.reshape(n, 2, 1, 32), [0, 2, 4, 6], 3).reshape(n, 256)
        scale = d[:, None] * (scales & 0x0F).float()
        offset = -(dmin[:, None] * (scales >> 4).float())
        return codes.to(torch.int8), scale, offset
    if name == "q3_k":
        hmask, qs, packed, d = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
        low = _bits(packed[:, 0:8], [0, 4], 0x0F).reshape(n, 16)
        high = _bits(packed[:, 8:12], [0, 2, 4, 6], 3).reshape(n, 16)
        sub = (low | (high << 4)).to(torch.int16) - 32
        ql = _bits(qs.reshape(n, 2, 1, 32), [0, 2, 4, 6], 3).reshape(n, 256).to(torch.int16)
        qh = _bits(hmask, list(range(8)), 1).reshape(n, 256).to(torch.int16)
        codes = ql - 4 * (1 - qh)
        return codes.to(torch.int8), d[:, None] * sub.float(), neg_zero.expand(n, 16).contiguous()
    if name in ("q4_k", "q5_k"):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        if name == "q4_k":
            codes = _bits(blocks[:, 16:144].reshape(n, 4, 1, 32), [0, 4], 0x0F).reshape(n, 256)
        else:
            qh, qs = blocks[:, 16:48], blocks[:, 48:176]
            low = _bits(qs.reshape(n, 4, 1, 32), [0, 4], 0x0F).reshape(n, 256)
            codes = low | (_bits(qh, list(range(8)), 1).reshape(n, 256) << 4)
        scale = _per_group(d[:, None] * sc.float(), 16)
        offset = _per_group(-(dmin[:, None] * mn.float()), 16)
        return codes.to(torch.int8), scale, offset
    if name == "q6_k":
        ql, qh, scales, d = blocks[:, 0:128], blocks[:, 128:192], blocks[:, 192:208], _f16(blocks[:, 208:210])
        low = _bits(ql.reshape(n, 2, 1, 64), [0, 4], 0x0F).reshape(n, 2, 4, 32)
        high = _bits(qh.reshape(n, 2, 1, 32), [0, 2, 4, 6], 3).reshape(n, 2, 4, 32)
        codes = (low | (high << 4)).reshape(n, 256).to(torch.int16) - 32
        scale = d[:, None] * scales.contiguous().view(torch.int8).float()
        return codes.to(torch.int8), scale, neg_zero.expand(n, 16).contiguous()
    raise KeyError(name)


def dequantize(name: str, blocks: torch.Tensor) -> torch.Tensor:
    """[n, block_bytes] uint8 -> [n, block_size] float32, equal bit for bit to the gguf package's."""
    codes, scale, offset = decode(name, blocks)
    n, size = codes.shape
    groups = codes.view(n, size // GROUP, GROUP).float()
    return (scale[..., None] * groups + offset[..., None]).view(n, size)
