"""`memlm quantize IN OUT --type Q4_K_M`: write a quantized GGUF file from a GGUF file or an HF folder."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from memlm.quant.mix import SCHEMES


def quantize(
    source: Annotated[
        str, typer.Argument(help="A .gguf file, a Hugging Face model folder, or an embedded model's name.")
    ],
    target: Annotated[str, typer.Argument(help="The .gguf file to write (replaced atomically).")],
    type_name: Annotated[
        str,
        typer.Option(
            "--type",
            help=f"llama.cpp's file type: {', '.join(SCHEMES)} (_M: Q6_K for the output, some attn_v and ffn_down).",
        ),
    ] = "Q4_K_M",
    quiet: Annotated[bool, typer.Option("--quiet", help="No per-tensor progress.")] = False,
) -> None:
    """Quantize a model into a GGUF file that memlm and llama.cpp load."""
    from memlm.formats.gguf_writer import quantize_file  # lazy: numpy and gguf load only here
    from memlm.quant.mix import scheme

    chosen = scheme(type_name)
    start = time.perf_counter()

    def progress(done: int, total: int, name: str, fmt: str) -> None:
        if not quiet:
            print(f"\r[{done}/{total}] {name} -> {fmt}".ljust(60), end="", file=sys.stderr, flush=True)

    summary = quantize_file(source, target, chosen, progress)
    if not quiet:
        print(file=sys.stderr)
    mix = ", ".join(f"{n} {fmt}" for fmt, n in sorted(summary["formats"].items()))
    seconds = time.perf_counter() - start
    print(f"wrote {target} ({chosen.name}, {summary['bytes'] / 1e6:.1f} MB, {seconds:.1f}s): {mix}")
