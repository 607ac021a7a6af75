"""GGUF container: header, metadata and tensor table, tensor bytes by memory map.

Why our own reader: `mx.load` dequantizes or refuses most llama.cpp tensor types (Q5_*, Q3_K,
Q4_K...), and the `gguf` package would become a runtime dependency for ~80 lines of parsing.
The file is memory-mapped, so a tensor's bytes are read only when it is converted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .errors import UserError

# GGUF metadata value types -> (struct format, size); 8 = string, 9 = array
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1"}
_NUMPY.update({10: "<u8", 11: "<i8", 12: "<f8"})


@dataclass
class TensorInfo:
    name: str
    kind: int  # ggml type id
    shape: tuple[int, ...]  # MLX order: outermost first (GGUF stores innermost first)
    offset: int  # absolute byte offset in the file


class _Cursor:
    """Sequential little-endian reads over the file's bytes (struct on the mmap: fast)."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise EOFError
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def scalar(self, fmt: str, size: int):
        if self.pos + size > len(self.buf):
            raise EOFError
        self.pos += size
        return struct.unpack_from(fmt, self.buf, self.pos - size)[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q", 8))).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.scalar(*_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind != 9:
            raise ValueError(f"unknown metadata type {kind}")
        item, count = self.scalar("<I", 4), self.scalar("<Q", 8)
        if item in _NUMPY:  # numeric arrays (token scores, types) stay numpy
            dtype = np.dtype(_NUMPY[item])
            return np.frombuffer(self.take(count * dtype.itemsize), dtype).copy()
        if item == 8:
            return [self.string() for _ in range(count)]
        return [self.value(item) for _ in range(count)]


def read_gguf(path: str) -> tuple[np.ndarray, dict, dict[str, TensorInfo]]:
    """(the file as a read-only uint8 memmap, metadata, tensor table) of a GGUF v2/v3 file."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the GGUF file ({e}); check the path") from None
    cur = _Cursor(memoryview(data))
    try:
        if cur.take(4).tobytes() != b"GGUF" or cur.scalar("<I", 4) not in (2, 3):
            raise ValueError("no GGUF v2/v3 header")
        n_tensors, n_meta = cur.scalar("<Q", 8), cur.scalar("<Q", 8)
        meta = {}
        for _ in range(n_meta):
            key = cur.string()
            meta[key] = cur.value(cur.scalar("<I", 4))
        infos = []
        for _ in range(n_tensors):
            name, ndim = cur.string(), cur.scalar("<I", 4)
            dims = [cur.scalar("<Q", 8) for _ in range(ndim)]
            kind, offset = cur.scalar("<I", 4), cur.scalar("<Q", 8)
            infos.append(TensorInfo(name, kind, tuple(reversed(dims)), offset))
    except (EOFError, ValueError, struct.error, MemoryError) as e:
        reason = str(e) or "the file ends inside its header"
        raise UserError(f"{path}: not a readable GGUF file ({reason}); re-download it") from None
    align = int(meta.get("general.alignment", 32))
    start = cur.pos + (-cur.pos % align)
    for info in infos:
        info.offset += start
    return data, meta, {info.name: info for info in infos}
