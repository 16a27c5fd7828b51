"""memlm's native CPU kernels, compiled on first use and cached.

`quant_kernels.cpp` is plain C++20 with AVX2/FMA/F16C intrinsics and a C ABI, loaded with ctypes:
it needs g++ (or $CXX) but no torch headers, so it compiles in about two seconds. It runs its loops
on OpenMP threads from the libgomp torch already loaded: one thread team, sized by
torch.set_num_threads, serves torch and the kernels. The shared library
is cached under $MEMLM_HOME/kernels, named by a hash of its source and flags, and written
atomically (compiled to a temporary name, then renamed), so concurrent first uses cannot load a
half-written file.

`native()` returns the loaded library, or None on a machine without AVX2/FMA/F16C or without a
compiler; callers then take the portable path (dequantize + torch matmul), and a one-line notice
says why, once per process. MEMLM_NATIVE=0 forces the portable path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from memlm.paths import kernels_dir

SOURCE = Path(__file__).with_name("quant_kernels.cpp")
FLAGS = ["-O3", "-std=c++20", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp"]
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
# Built too where the CPU has them: AVX-512 F/BW/VL/VNNI. The int8-activation kernels' dot
# products take one instruction (vpdpbusd; the row kernels' results are identical to the AVX2
# build's), and batches of int8 activation rows run on 512-bit panels of 16 output rows.
VARIANTS = {
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
    )
}
ABI_VERSION = 11


class QMat(ctypes.Structure):
    pass


QMat._fields_ = [
    ("format", ctypes.c_int32),
    ("out", ctypes.c_int32),
    ("inp", ctypes.c_int32),
    ("qs", ctypes.c_void_p),
    ("d", ctypes.c_void_p),
    ("m", ctypes.c_void_p),
    ("bias", ctypes.c_void_p),
    ("lora_a", ctypes.c_void_p),
    ("lora_bt", ctypes.c_void_p),
    ("rank", ctypes.c_int32),
    ("scaling", ctypes.c_float),
    # A matrix of mixed formats: its row groups' descriptors (kept alive by the caller).
    ("parts", ctypes.POINTER(QMat)),
    ("nparts", ctypes.c_int32),
    # Stacked adapters: the adapter of each rank column (int32 [rank]); None: one adapter.
    ("lora_owner", ctypes.c_void_p),
]


class LayerDesc(ctypes.Structure):
    _fields_ = [
        ("attn_norm", ctypes.c_void_p),
        ("qkv", QMat),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("o", QMat),
        ("ffn_norm", ctypes.c_void_p),
        ("gate_up", QMat),
        ("down", QMat),
        ("attn_out_norm", ctypes.c_void_p),
        ("ffn_out_norm", ctypes.c_void_p),
        ("window", ctypes.c_int32),
        ("local_rope", ctypes.c_int32),
    ]


class ModelDesc(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_int32),
        ("hidden", ctypes.c_int32),
        ("heads", ctypes.c_int32),
        ("kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("intermediate", ctypes.c_int32),
        ("eps", ctypes.c_float),
        ("quantized_activations", ctypes.c_int32),
        ("layer", ctypes.POINTER(LayerDesc)),
        ("activation", ctypes.c_int32),
        ("attn_scale", ctypes.c_float),
        ("rotary_dim", ctypes.c_int32),
    ]


class AttendArgs(ctypes.Structure):
    """quant_kernels.cpp's AttendArgs: a short chunk's attention read from a KV store."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("probs", ctypes.c_void_p),
        ("width", ctypes.c_int32),
        ("queries", ctypes.c_int32),
        ("heads", ctypes.c_int32),
        ("kv_heads", ctypes.c_int32),
        ("hd", ctypes.c_int32),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("k_stride", ctypes.c_int64 * 3),
        ("v_stride", ctypes.c_int64 * 3),
        ("table", ctypes.c_void_p),
        ("table_width", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("kv_type", ctypes.c_int32),
        ("row", ctypes.c_void_p),
        ("count", ctypes.c_void_p),
        ("scale", ctypes.c_float),
    ]


class DecodeArgs(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("tokens", ctypes.c_int32),
        ("cos", ctypes.c_void_p),
        ("ssin", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("k_stride", ctypes.c_int64 * 4),
        ("v_stride", ctypes.c_int64 * 4),
        ("row", ctypes.c_void_p),
        ("slot", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("table_width", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("kv_type", ctypes.c_int32),
        ("rotate", ctypes.c_int32),
        ("attention", ctypes.c_void_p),
        ("width", ctypes.c_int32),
        ("lora", ctypes.c_int32),
        ("adapter", ctypes.c_void_p),  # int32 [tokens]: each token's adapter among stacked ones (0 = none)
        ("cos_local", ctypes.c_void_p),
        ("ssin_local", ctypes.c_void_p),
        ("positions", ctypes.c_void_p),
        ("positions_width", ctypes.c_int32),
    ]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def cpu_supports_kernels() -> bool:
    """Whether this CPU has the instruction sets the kernels are compiled for (x86-64 Linux flags)."""
    return all(f in cpu_flags() for f in REQUIRED_CPU_FLAGS)


def best_variant() -> str | None:
    """The richest build this CPU runs (None: the AVX2 one). MEMLM_KERNELS=avx2 forces the base."""
    if os.environ.get("MEMLM_KERNELS") == "avx2":
        return None
    flags = cpu_flags()
    return next((name for name, (needed, _) in VARIANTS.items() if all(f in flags for f in needed)), None)


def _flags(variant: str | None) -> list[str]:
    return FLAGS + (VARIANTS[variant][1] if variant else [])


def library_path(variant: str | None = None) -> Path:
    flags = _flags(variant)
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    return kernels_dir() / f"memlm_quant_{variant or 'avx2'}_{digest}.so"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(target: Path, variant: str | None = None) -> Path:
    """Compile the kernels into `target` atomically; raise RuntimeError with the compiler's message."""
    compiler_path = compiler()
    if compiler_path is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler_path, *_flags(variant), str(SOURCE), "-o", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {done.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _notice(message: str) -> None:
    print(f"memlm: {message}; using the portable quantized path (dequantize + torch matmul)", file=sys.stderr)


@functools.cache
def native() -> ctypes.CDLL | None:
    """The kernels library, built on first use; None (with a one-line notice) where it cannot run."""
    if os.environ.get("MEMLM_NATIVE", "1") == "0":
        return None
    if not cpu_supports_kernels():
        _notice(f"this CPU lacks {'/'.join(REQUIRED_CPU_FLAGS)}")
        return None
    lib = None
    for variant in dict.fromkeys((best_variant(), None)):  # the richest build first, then AVX2
        target = library_path(variant)
        try:
            if not target.is_file():
                build(target, variant)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, RuntimeError) as e:
            error = e
    if lib is None:
        _notice(f"native kernels unavailable ({error})")
        return None
    if lib.mk_abi_version() != ABI_VERSION:
        _notice(f"{target} has another ABI version")
        return None
    _declare(lib)
    return lib


def native_attention() -> ctypes.CDLL | None:
    """The kernels, for the float model's decode-step attention read from the KV store
    (KVCache.attend_in_place), or None: MEMLM_NATIVE_ATTENTION=0 keeps torch's (the store's rows
    gathered, then SDPA), as MEMLM_NATIVE=0 does with every kernel."""
    if os.environ.get("MEMLM_NATIVE_ATTENTION", "1") == "0":
        return None
    lib = native()
    return lib if lib is not None and hasattr(lib, "mk_attend_store") else None


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.mk_matmul.argtypes = [ctypes.POINTER(QMat), p, i64, i64, p, i64, ctypes.c_int32]
    lib.mk_dequantize.argtypes = [ctypes.POINTER(QMat), p, i64, p]
    if hasattr(lib, "mk_attend"):  # older builds, which `python -m memlm.bench.kernels --against` loads, lack it
        i32 = ctypes.c_int32
        lib.mk_attend.argtypes = [i32, p, p, p, i64, i32, i32, ctypes.c_float, p, p, i32]
        lib.mk_attend.restype = None
    if hasattr(lib, "mk_attend_store"):
        lib.mk_attend_store.argtypes = [ctypes.POINTER(AttendArgs)]
        lib.mk_attend_store.restype = None
    lib.mk_model_new.argtypes = [ctypes.POINTER(ModelDesc)]
    lib.mk_model_new.restype = p
    lib.mk_model_free.argtypes = [p]
    lib.mk_decode.argtypes = [p, ctypes.POINTER(DecodeArgs)]
    lib.mk_variant.restype = ctypes.c_int32
    if hasattr(lib, "mk_panel_min_rows"):
        lib.mk_panel_min_rows.restype = ctypes.c_int32
    for fn in (lib.mk_matmul, lib.mk_dequantize, lib.mk_model_free, lib.mk_decode):
        fn.restype = None
