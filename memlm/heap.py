"""Give the C heap's freed memory back to the operating system after a load.

Loading parses large data in C and Rust (a tokenizer.json's half a million merges, a GGUF header's
262k-piece vocabulary) and frees it again, but glibc's allocator keeps the freed pages mapped, so
the process's resident memory stays at its peak: Gemma 3's SentencePiece tokenizer uses ~50 MB and
left ~300 MB resident. `malloc_trim` returns them. Elsewhere (no glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
