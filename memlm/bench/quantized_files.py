"""Models written by `memlm quantize` for the benchmarks, made once and cached under $MEMLM_HOME.

A benchmark "dtype" may name one of llama.cpp's file types (Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0,
optionally with ":q8_0" activations): the model is then quantized by memlm into a GGUF file and
that file is loaded with dtype auto, on its own blocks, as a user would run it.
"""

from __future__ import annotations

from pathlib import Path

from memlm.formats.loading import EMBEDDED
from memlm.paths import memlm_home
from memlm.quant.mix import SCHEMES


def file_type_of(dtype: str) -> str | None:
    """The file type a benchmark dtype names ("Q4_K_M:q8_0" -> "Q4_K_M"), or None."""
    base = dtype.partition(":")[0].upper()
    return base if base in SCHEMES else None


def quantized_file(model: str, type_name: str) -> Path:
    """`model` written by memlm quantize as `type_name`, named by its source file's size and mtime."""
    from memlm.formats.gguf_writer import quantize_file  # lazy: numpy/gguf work only when a file is missing
    from memlm.quant.mix import scheme

    key = model.lower()
    source = EMBEDDED[key].path() if key in EMBEDDED else Path(model).expanduser()
    stamp = f"{source.stat().st_size}-{int(source.stat().st_mtime)}"
    target = memlm_home() / "quantized" / f"{source.stem}-{stamp}-{type_name.upper()}.gguf"
    if not target.is_file():
        quantize_file(str(source) if source.is_file() else model, target, scheme(type_name))
    return target


def llama_cpp_quantized_file(model: str, type_name: str, threads: int = 2) -> Path:
    """`model` quantized as `type_name` by llama.cpp's own quantizer (llama-cpp-python, optional),
    from memlm's F32 file of the same weights; cached beside memlm's files."""
    from memlm.bench.llama_cpp import llama_cpp_quantize  # lazy: llama-cpp-python is optional
    from memlm.quant.mix import scheme

    source = quantized_file(model, "F32")
    target = source.with_name(source.name.replace("-F32.gguf", f"-{type_name.upper()}-llama.cpp.gguf"))
    return llama_cpp_quantize(source, target, scheme(type_name).file_type, threads)


def load_args(model: str, dtype: str) -> tuple[str, str]:
    """(model, dtype) to pass to memlm.load for a benchmark dtype: a file type's file in auto."""
    name = file_type_of(dtype)
    if name is None:
        return model, dtype
    _, _, activations = dtype.partition(":")
    return str(quantized_file(model, name)), "auto" + (f":{activations}" if activations else "")
