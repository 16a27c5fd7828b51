"""A GGUF file's metadata and tensor table, read fast: what loading needs, without the gguf
package's reader.

That reader builds a numpy view for every part of every field: four per vocabulary entry, over a
million views for Gemma 3's 262,144 tokens, which took 40 s and ~600 MB here before a weight was
read. This parses the same header with `struct` over a memory map (a fraction of a second) and
leaves tensors as (type, shape, offset) until they are read. The gguf package still owns the type
tables and the dequantization.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from memlm.errors import ModelFormatError

_MAGIC = b"GGUF"
# GGUFValueType -> struct format of a scalar (8: string, 9: array are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of the table: `shape` in GGUF's order (fastest dimension first), as the gguf reader's."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data_offset: int  # from the start of the file
    n_bytes: int
    _buffer: Any  # the file's memory map

    @property
    def data(self) -> np.ndarray:
        """The stored values as the gguf reader gives them: float32/float16 arrays in PyTorch order,
        block types as uint8 rows of their bytes (a view of the memory map: no copy)."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import quant_shape_to_byte_shape

        dims = tuple(reversed(self.shape))
        if self.tensor_type in (Q.F32, Q.F16):
            dtype = np.float32 if self.tensor_type == Q.F32 else np.float16
            return np.frombuffer(self._buffer, dtype, prod(dims), self.data_offset).reshape(dims)
        byte_shape = quant_shape_to_byte_shape(dims, self.tensor_type)
        return np.frombuffer(self._buffer, np.uint8, self.n_bytes, self.data_offset).reshape(byte_shape)


def read_header(path: str | Path, types: dict | None = None) -> tuple[dict[str, Any], list[TensorInfo]]:
    """({key: value} with arrays as lists, as `field.contents()` gives them; the tensor table).
    `types`, when given, receives {key: (GGUFValueType, its items' type or None)} (`memlm quantize`
    copies every field with its type)."""
    try:
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    try:
        return _parse(buffer, types)
    except (struct.error, ValueError, KeyError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _parse(buffer, types: dict | None) -> tuple[dict[str, Any], list[TensorInfo]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

    if buffer[:4] != _MAGIC:
        raise ValueError("bad magic")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", buffer, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} (memlm reads 2 and 3)")
    at = 24
    fields: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": tensor_count, "GGUF.kv_count": kv_count}
    for _ in range(kv_count):
        key, at = _string(buffer, at)
        (kind,), at = struct.unpack_from("<I", buffer, at), at + 4
        if types is not None:
            item = struct.unpack_from("<I", buffer, at)[0] if kind == _ARRAY else None
            types[key] = (GGUFValueType(kind), None if item is None else GGUFValueType(item))
        fields[key], at = _value(buffer, at, kind)
    tensors = []
    for _ in range(tensor_count):
        name, at = _string(buffer, at)
        (n_dims,) = struct.unpack_from("<I", buffer, at)
        shape = struct.unpack_from(f"<{n_dims}Q", buffer, at + 4)
        kind, offset = struct.unpack_from("<IQ", buffer, at + 4 + 8 * n_dims)
        at += 4 + 8 * n_dims + 12
        tensor_type = GGMLQuantizationType(kind)
        block, size = GGML_QUANT_SIZES[tensor_type]
        tensors.append((name, tensor_type, tuple(int(d) for d in shape), offset, prod(shape) // block * size))
    alignment = int(fields.get("general.alignment", 32))
    start = -(-at // alignment) * alignment
    infos = [TensorInfo(n, t, s, start + o, size, buffer) for n, t, s, o, size in tensors]
    end = max((t.data_offset + t.n_bytes for t in infos), default=start)
    if end > len(buffer):
        raise ValueError(f"tensor data runs to byte {end}, past the end of the file ({len(buffer)} bytes)")
    return fields, infos


def _string(buffer, at: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buffer, at)
    end = at + 8 + n
    if end > len(buffer):
        raise ValueError("a string runs past the end of the file")
    return buffer[at + 8 : end].decode("utf-8"), end


def _value(buffer, at: int, kind: int) -> tuple[Any, int]:
    if kind == _STRING:
        return _string(buffer, at)
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        return struct.unpack_from(fmt, buffer, at)[0], at + struct.calcsize(fmt)
    if kind != _ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    item, count = struct.unpack_from("<IQ", buffer, at)
    at += 12
    if item in _NUMPY:  # numbers in one read (token scores, types: 262k entries each)
        values = np.frombuffer(buffer, _NUMPY[item], count, at)
        return values.tolist(), at + values.nbytes
    out = []
    for _ in range(count):  # strings (the vocabulary), or arrays of arrays
        value, at = _value(buffer, at, item)
        out.append(value)
    return out, at
