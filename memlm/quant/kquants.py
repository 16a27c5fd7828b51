"""memlm's quantizer for the K-quants (Q4_K, Q5_K, Q6_K): ggml's reference algorithms, vectorized.

The gguf package quantizes only the 32-value formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); for those
`quantize_blocks` calls it. For the K-quants this module follows ggml's reference quantizers
(quantize_row_q*_K_ref, no importance matrix), written again here over numpy arrays of all
sub-blocks of a matrix at once:

- Q4_K / Q5_K: per 32-value sub-block, an affine fit (scale, min <= 0) by ggml's iterative search
  (`make_qkx2_quants`): start from the min/max grid, then try nstep+1 slightly different grid
  sizes, each followed by a weighted least-squares refit of scale and min, keeping the fit of
  least weighted squared error (weights |x| + rms of the sub-block). The 8 scales and 8 mins of a
  super-block are then quantized to 6 bits against their maxima (f16 d and dmin), and the codes
  recomputed against the rounded scales.
- Q6_K: per 16-value sub-block, a symmetric fit (`make_qx_quants`, weights x^2) with 18 perturbed
  grids; the 16 scales are quantized to int8 against the largest (f16 d), codes recomputed.

Rounding is ties-to-even (np.rint), as ggml's nearest_int under the default rounding mode. Sums
run in numpy's order, so a code can differ from llama.cpp's in rare near-tie cases; the bytes are
valid blocks either way, and tests check dequantize(quantize(x)) error against the format's step.
"""

from __future__ import annotations

import numpy as np

from memlm.errors import ModelFormatError

QK_K = 256
_EPS = 1e-15  # ggml's GROUP_MAX_EPS: groups with |x| below this quantize to zeros


def quantize_blocks(w: np.ndarray, fmt: str) -> np.ndarray:
    """A float32 [out, in] matrix -> [out, row_bytes] uint8 GGUF blocks of format `fmt`."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    out, inp = w.shape
    if fmt in ("q4_k", "q5_k", "q6_k"):
        if inp % QK_K:
            raise ModelFormatError(f"{fmt} needs rows that are whole super-blocks of {QK_K}, got {inp}")
        flat = w.reshape(-1, QK_K)
        packed = {"q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}[fmt](flat)
        return packed.reshape(out, -1)
    import gguf  # lazy: the 32-value formats are the gguf package's own reference quantizers
    from gguf.quants import quantize

    try:
        qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
        return quantize(w, qtype).reshape(out, -1)
    except (AttributeError, NotImplementedError):
        raise ModelFormatError(f"memlm cannot quantize to {fmt}") from None


# ---- the affine fit of Q4_K / Q5_K -------------------------------------------------------------


def _affine_fit(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """x [G, n] -> (scale [G], min [G] as a positive offset: value = scale * L - min, L [G, n]).

    ggml's make_qkx2_quants with squared error, over G groups at once."""
    f32 = np.float32
    sum_x2 = (x * x).sum(axis=1, keepdims=True, dtype=f32)
    weights = np.sqrt(sum_x2 / f32(x.shape[1])) + np.abs(x)
    lo = np.minimum(x.min(axis=1, keepdims=True), f32(0))
    hi = x.max(axis=1, keepdims=True)
    flat = hi == lo
    span = np.where(flat, f32(1), hi - lo)
    sum_w = weights.sum(axis=1, keepdims=True, dtype=f32)
    sum_x = (weights * x).sum(axis=1, keepdims=True, dtype=f32)

    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    levels = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
    best_err = (weights * np.square(scale * levels + lo - x)).sum(axis=1, keepdims=True, dtype=f32)
    best_min = lo.copy()
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span
        trial = np.clip(np.rint(iscale * (x - lo)), 0, nmax)
        sum_l = (weights * trial).sum(axis=1, keepdims=True, dtype=f32)
        sum_l2 = (weights * trial * trial).sum(axis=1, keepdims=True, dtype=f32)
        sum_xl = (weights * trial * x).sum(axis=1, keepdims=True, dtype=f32)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0  # the min is an offset below zero: refit the scale alone
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        this_min = np.where(positive, f32(0), this_min)
        err = (weights * np.square(this_scale * trial + this_min - x)).sum(axis=1, keepdims=True, dtype=f32)
        better = ok & (err < best_err)
        levels = np.where(better, trial, levels)
        best_err = np.where(better, err, best_err)
        scale = np.where(better, this_scale, scale)
        best_min = np.where(better, this_min, best_min)
    scale = np.where(flat, f32(0), scale)
    return scale[:, 0].astype(f32), (-best_min)[:, 0].astype(f32)


def _k4_superblocks(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Super-blocks [B, 256] -> (d f16 [B], dmin f16 [B], 12 packed scale bytes [B, 12], codes [B, 256])."""
    f32 = np.float32
    blocks = x.shape[0]
    sub = x.reshape(blocks * 8, 32)
    scales, mins = _affine_fit(sub, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(blocks, 8), mins.reshape(blocks, 8)
    max_scale = scales.max(axis=1, keepdims=True)
    max_min = mins.max(axis=1, keepdims=True)
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, 1), f32(0))
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, 1), f32(0))
    ls = np.minimum(np.rint(inv_scale * scales), 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min * mins), 63).astype(np.uint8)
    d = (max_scale[:, 0] / f32(63)).astype(np.float16)
    dmin = (max_min[:, 0] / f32(63)).astype(np.float16)
    packed = np.zeros((blocks, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    # Codes against the rounded scales, as the dequantizer will see them.
    eff_scale = d.astype(f32)[:, None] * ls.astype(f32)  # [B, 8]
    eff_min = dmin.astype(f32)[:, None] * lm.astype(f32)
    zero = eff_scale == 0
    safe = np.where(zero, f32(1), eff_scale)
    codes = np.rint((x.reshape(blocks, 8, 32) + eff_min[..., None]) / safe[..., None])
    codes = np.where(zero[..., None], 0, np.clip(codes, 0, nmax)).astype(np.uint8).reshape(blocks, 256)
    return d, dmin, packed, codes


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[B, 256] codes (< 16) -> [B, 128]: per 64 values, byte l = value l | value l+32 << 4."""
    c = codes.reshape(-1, 4, 2, 32)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(-1, 128)


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, packed, codes = _k4_superblocks(x, 15, -1.0, 0.1, 20)
    parts = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, _nibbles(codes)]
    return np.concatenate(parts, axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, packed, codes = _k4_superblocks(x, 31, -0.5, 0.1, 15)
    high = (codes >> 4).reshape(-1, 8, 32)  # bit i of byte l: value 32 i + l
    qh = np.zeros((codes.shape[0], 32), dtype=np.uint8)
    for i in range(8):
        qh |= high[:, i, :] << i
    parts = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qh, _nibbles(codes & 0x0F)]
    return np.concatenate(parts, axis=1)


# ---- the symmetric fit of Q6_K -----------------------------------------------------------------


def _symmetric_fit(x: np.ndarray, nmax: int) -> np.ndarray:
    """x [G, n] -> scale [G] (value = scale * L, L in [-nmax, nmax-1]); ggml's make_qx_quants with
    weights x^2 (rmse_type 1): the grid through the largest-magnitude value, then 18 perturbed ones."""
    f32 = np.float32
    idx = np.abs(x).argmax(axis=1)
    peak = x[np.arange(x.shape[0]), idx][:, None]
    tiny = np.abs(peak) < f32(_EPS)
    peak = np.where(tiny, f32(1), peak)
    w = x * x

    def fit(iscale):
        levels = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        sumlx = (w * x * levels).sum(axis=1, keepdims=True, dtype=f32)
        suml2 = (w * levels * levels).sum(axis=1, keepdims=True, dtype=f32)
        return sumlx, suml2

    sumlx, suml2 = fit(f32(-nmax) / peak)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        this_scale = sumlx / np.where(suml2 > 0, suml2, 1)
        scale = np.where(better, this_scale, scale)
        best = np.where(better, this_scale * sumlx, best)
    return np.where(tiny, f32(0), scale)[:, 0].astype(f32)


def _q6_k(x: np.ndarray) -> np.ndarray:
    f32 = np.float32
    blocks = x.shape[0]
    scales = _symmetric_fit(x.reshape(blocks * 16, 16), 32).reshape(blocks, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(blocks), pick][:, None]
    empty = np.abs(max_scale) < f32(_EPS)
    iscale = np.where(empty, f32(0), f32(-128) / np.where(empty, f32(1), max_scale))
    ls = np.minimum(np.rint(iscale * scales), 127).astype(np.int8)
    d = np.where(empty[:, 0], f32(0), f32(1) / np.where(empty[:, 0], f32(1), iscale[:, 0])).astype(np.float16)
    eff = d.astype(f32)[:, None] * ls.astype(f32)  # [B, 16]
    zero = eff == 0
    codes = np.rint(x.reshape(blocks, 16, 16) / np.where(zero, f32(1), eff)[..., None])
    codes = (np.where(zero[..., None], 0, np.clip(codes, -32, 31)) + 32).astype(np.uint8).reshape(blocks, 2, 4, 32)
    # Per half of 128 values: ql byte l holds value l (low) and l+64 (high) for l < 64 ... as the
    # dequantizer reads them (quant/blocks.py): low nibbles of chunks 0,1 | chunks 2,3 shifted 4.
    low = codes & 0x0F
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = codes >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    parts = [ql.reshape(blocks, 128), qh.reshape(blocks, 64), ls.view(np.uint8), d.view(np.uint8).reshape(-1, 2)]
    return np.concatenate(parts, axis=1)
