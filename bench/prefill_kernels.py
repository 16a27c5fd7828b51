"""A long chunk (a prefill) through one quantized matrix with int8 activations: the native integer
kernels (8 activation rows per pass over the weight; on an AVX-512 build, 16-row panels) against
dequantizing the weight into fp32 and torch's GEMM, per format, width and chunk length, one thread,
best of 3. The formats where the row kernels win at every length are QLinear's INT8_GEMM_FORMATS
(memlm/quant/qlinear.py); the panels win for every format.

    python bench/prefill_kernels.py [--json bench/results/prefill_kernels.json]
"""

import argparse
import json
import time

import torch
from rich.console import Console
from rich.table import Table

import memlm.quant.qlinear as qlinear
from memlm.quant.qweight import FORMATS, QWeight

CASES = [  # format, out, in: a 1B-class model's FFN matrices and SmolLM2's 576-wide ones
    *[(fmt, 8192, 2048) for fmt in ("q4_0", "q4_k", "q5_k", "q5_0", "q8_0")],
    *[(fmt, 2048, 8192) for fmt in ("q4_k", "q6_k")],
    *[(fmt, 1536, 576) for fmt in ("q4_1", "q5_0", "q8_0")],
]
ROWS = (64, 128, 512)


def best_of(layer: qlinear.QLinear, x: torch.Tensor, native: bool, repeats: int = 3) -> float:
    """Seconds for one call, with the layer's chunk limit forced to native or to the GEMM."""
    layer.native_max_rows = (lambda: None) if native else (lambda: 0)
    with torch.inference_mode():
        layer(x)
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            layer(x)
            best = min(best, time.perf_counter() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows_out = []
    table = Table(title="prefill chunk: native int8 kernels vs dequantize + fp32 GEMM (1 thread)")
    for column in ("format", "matrix", "rows", "GEMM ms", "native ms", "native is"):
        table.add_column(column, justify="right")
    for fmt, out, inp in CASES:
        layer = qlinear.QLinear(QWeight.quantize(torch.randn(out, inp) * 0.05, FORMATS[fmt]))
        layer.activations = "q8_0"
        for rows in ROWS:
            x = torch.randn(rows, inp)
            gemm, native = best_of(layer, x, False), best_of(layer, x, True)
            rows_out.append(
                {"format": fmt, "out": out, "in": inp, "rows": rows, "gemm_ms": gemm * 1e3, "native_ms": native * 1e3}
            )
            table.add_row(
                fmt, f"{out}x{inp}", str(rows), f"{gemm * 1e3:.1f}", f"{native * 1e3:.1f}", f"{gemm / native:.2f}x"
            )
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": 1, "activations": "q8_0", "rows": rows_out}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
