"""The native matmul kernels alone: GB/s of weights streamed per format, batch and activation type.

    python -m memlm.bench.kernels --shape 8192x2048 --formats q4_0,q8_0,q4_k,q6_k --rows 1,8
    python -m memlm.bench.kernels --against /path/to/other/memlm_quant.so   # two builds, one run

A decode step is a chain of such products, so this is where kernel work shows first and least
noisily: one matrix, no model around it. Each cell is the best of `--repeats` timed calls (after a
warm-up call), the builds interleaved call by call so a busy machine slows them alike; the ratio
column is the first build's speed over each other's. Weights are random and quantized by memlm's quantizer
(speed does not depend on the values); a matrix larger than the caches (the default 8192x2048 is
9.4 MB in Q4_K) streams from memory as a model's do.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import torch
from rich.console import Console

from memlm import kernels
from memlm.bench.report import print_table, write_outputs
from memlm.quant.qlinear import QLinear
from memlm.quant.qweight import FORMATS, QWeight

ACTIVATIONS = {"float32": 0, "q8_0": 1}


def load_build(path: str | None) -> tuple[str, ctypes.CDLL]:
    """A kernels library: this checkout's (None) or another build's .so, declared alike."""
    if path is None:
        lib = kernels.native()
        if lib is None:
            raise SystemExit("native kernels unavailable on this machine")
        return "this", lib
    lib = ctypes.CDLL(str(Path(path).resolve()))
    if lib.mk_abi_version() != kernels.ABI_VERSION:
        raise SystemExit(f"{path}: another ABI version ({lib.mk_abi_version()}, this checkout's {kernels.ABI_VERSION})")
    kernels._declare(lib)
    return Path(path).stem, lib


def weight_bytes(q: QWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (q.qs, q.d, q.m) if t is not None)


def time_calls(builds, layer: QLinear, x: torch.Tensor, q8: int, repeats: int) -> list[float]:
    rows, inp = x.shape
    y = torch.empty(rows, layer.out_features)
    best = [float("inf")] * len(builds)
    for _ in range(repeats + 1):  # the first round warms caches and the thread team
        for i, (_, lib) in enumerate(builds):
            start = time.perf_counter()
            lib.mk_matmul(ctypes.byref(layer._desc), x.data_ptr(), rows, inp, y.data_ptr(), layer.out_features, q8)
            best[i] = min(best[i], time.perf_counter() - start) if _ else best[i]
    return best


def run(args) -> dict:
    out, inp = (int(v) for v in args.shape.lower().split("x"))
    builds = [load_build(None)] + [load_build(p) for p in args.against]
    torch.manual_seed(0)
    weight = torch.randn(out, inp) * 0.02
    cells = []
    for name in args.formats.split(","):
        layer = QLinear(QWeight.quantize(weight, FORMATS[name]))
        size = weight_bytes(layer.qweight)
        for activations in args.activations.split(","):
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, inp)
                times = time_calls(builds, layer, x, ACTIVATIONS[activations], args.repeats)
                timed = [
                    {"build": b, "ms": t * 1e3, "gb_s": size / t / 1e9} for (b, _), t in zip(builds, times, strict=True)
                ]
                cells.append(
                    {"format": name, "activations": activations, "rows": rows, "weight_mb": size / 1e6, "builds": timed}
                )
    return {
        "shape": [out, inp],
        "threads": torch.get_num_threads(),
        "variant": kernels.best_variant() or "avx2",
        "cells": cells,
    }


def print_report(result: dict, console: Console) -> None:
    names = [b["build"] for b in result["cells"][0]["builds"]]
    columns = ["format", "act", "rows", "MB"] + [f"{n} GB/s" for n in names] + [f"{names[0]} vs {n}" for n in names[1:]]
    rows = []
    for c in result["cells"]:
        first = c["builds"][0]["ms"]
        rows.append(
            [c["format"], c["activations"], str(c["rows"]), f"{c['weight_mb']:.1f}"]
            + [f"{b['gb_s']:.1f}" for b in c["builds"]]
            + [f"{b['ms'] / first:.2f}x" for b in c["builds"][1:]]
        )
    out, inp = result["shape"]
    title = f"kernels, {out}x{inp}, {result['threads']} thread(s), {result['variant']} build"
    print_table(console, title, columns, rows, left=(0, 1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m memlm.bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8192x2048", help="OUTxIN of the weight (default %(default)s)")
    p.add_argument("--formats", default="q4_0,q4_1,q8_0,q5_0,q4_k,q5_k,q6_k")
    p.add_argument("--activations", default="q8_0,float32", help="q8_0 and/or float32")
    p.add_argument("--rows", default="1,8", help="activation rows per call (the batch)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--against", action="append", default=[], metavar="SO", help="another build to time beside")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    unknown = [f for f in args.formats.split(",") if f not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if any(a not in ACTIVATIONS for a in args.activations.split(",")):
        raise SystemExit(f"--activations takes {' and/or '.join(ACTIVATIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    result = run(args)
    print_report(result, console)
    write_outputs(result, console, args.json)


if __name__ == "__main__":
    main()
