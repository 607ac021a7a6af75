"""Read and check a GGUF file's header and tensor-info table (gguf.py then maps the data).

Why: every length in a GGUF comes from whoever wrote it. MLX's own reader (gguflib, which
we no longer use) trusts them: a tensor record with 200 dims, a name length of 2^40, an
unknown tensor type or an offset past the end of the file made it read or write out of
bounds and die with SIGSEGV. Here the header is read with `struct`, every length checked
against the file's size, and anything that does not add up is one `UserError` naming the
file and the fault.

Layout (GGUF v2/v3, little-endian): "GGUF", u32 version, u64 tensor count, u64 metadata
count; metadata entries (string key, u32 value type, value); tensor infos (string name,
u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset); padding to `general.alignment`;
tensor data. A string is a u64 byte length followed by that many bytes of UTF-8.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from .errors import UserError

MAX_DIMS = 4  # GGML_MAX_DIMS: gguflib keeps dims in a fixed array of this size
DEFAULT_ALIGNMENT = 32

# ggml type id -> (name, weights per block, bytes per block): the `gguf` package's
# GGMLQuantizationType / GGML_QUANT_SIZES, restated because importing that package takes over
# a second; tests/test_hostile_input.py keeps the two equal.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}

# metadata value type id -> struct format of one value (8 = string and 9 = array are special)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
_SCALARS[12] = "d"
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor-info record: dims in GGUF order (fastest-varying first), byte offset from
    the start of the data section, and its size in bytes."""

    name: str
    type_id: int
    dims: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]


@dataclass
class Header:
    """What the header says: version, scalar/string metadata (arrays only as their length),
    the tensor table in file order, and where the data section starts."""

    version: int
    metadata: dict = field(default_factory=dict)
    # key -> (GGUF value type, array element type or None): what a copy needs to write it back
    value_types: dict = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0


class _Reader:
    """Bounded reads: every length is checked against the bytes left in the file."""

    def __init__(self, f: BinaryIO, size: int, path: str):
        self.f, self.size, self.path = f, size, path

    def fail(self, what: str) -> UserError:
        return UserError(
            f"{self.path}: not a valid GGUF file ({what}); re-download or re-convert it"
        )

    def left(self) -> int:
        return self.size - self.f.tell()

    def read(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise self.fail(f"{what} needs {n} bytes, only {self.left()} left in the file")
        return self.f.read(n)

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise self.fail(f"{what} needs {n} bytes, only {self.left()} left in the file")
        self.f.seek(n, os.SEEK_CUR)

    def skip_strings(self, count: int, what: str, chunk: int = 1 << 20) -> None:
        """Step over `count` strings, reading a chunk at a time (tokenizer arrays hold 10^5)."""
        start, buf, pos = self.f.tell(), b"", 0  # buf holds the file from `start`
        for j in range(count):
            while True:
                n = struct.unpack_from("<Q", buf, pos)[0] if pos + 8 <= len(buf) else None
                if n is not None and pos + 8 + n <= len(buf):
                    break
                if start + len(buf) >= self.size or (n is not None and n > self.size):
                    raise self.fail(f"{what}: string #{j} runs past the end of the file")
                need = max(chunk, 8 + (n or 0))
                buf = buf[pos:] + self.f.read(need)
                start, pos = start + pos, 0
            pos += 8 + n
        self.f.seek(start + pos)

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"length of {what}")
        raw = self.read(n, f"{what} of {n} bytes")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None


def _q(name: str) -> str:
    """A name from the file, quoted for a one-line message: escaped, at most ~60 chars."""
    return repr(name if len(name) <= 60 else name[:57] + "...")


def read_header(path: str, arrays: bool = False) -> Header:
    """Parse and check the header and tensor table; UserError (one line) on any fault.

    `arrays`: keep metadata arrays' values (numeric ones as numpy, strings as a list: the
    tokenizer) instead of only their length.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        r = _Reader(f, size, path)
        header = Header(version=_preamble(r))
        n_tensors = r.unpack("Q", "tensor count")
        n_meta = r.unpack("Q", "metadata count")
        if n_meta * 12 > r.left():  # a key length (8) and a value type (4) at the least
            raise r.fail(f"metadata count {n_meta} does not fit in the file")
        for i in range(n_meta):
            key, value, types = _metadata_entry(r, i, arrays)
            header.metadata[key], header.value_types[key] = value, types
        if n_tensors * 24 > r.left():  # name length, n_dims, type, offset at the least
            raise r.fail(f"tensor count {n_tensors} does not fit in the file")
        infos = [_tensor_info(r) for _ in range(n_tensors)]
        alignment = _alignment(header.metadata, r)
        header.data_offset = -(-f.tell() // alignment) * alignment
    header.tensors = _check_tensors(infos, header.data_offset, alignment, r)
    return header


def _preamble(r: _Reader) -> int:
    if r.size < 24:
        raise r.fail(f"only {r.size} bytes, shorter than a GGUF header")
    if r.read(4, "magic") != b"GGUF":
        raise r.fail("does not start with 'GGUF'")
    version = r.unpack("I", "version")
    if version in (2, 3):
        return version
    if version == 1:
        raise r.fail("GGUF version 1 is obsolete")
    if struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
        raise r.fail("big-endian GGUF; use a little-endian (normal) file")
    raise r.fail(f"unknown GGUF version {version}")


def _metadata_entry(r: _Reader, i: int, arrays: bool = False) -> tuple[str, object, tuple]:
    key = r.string(f"metadata key #{i}")
    kind = r.unpack("I", f"type of {_q(key)}")
    if kind in _SCALARS:
        return key, r.unpack(_SCALARS[kind], f"value of {_q(key)}"), (kind, None)
    if kind == _STRING:
        return key, r.string(f"value of {_q(key)}"), (kind, None)
    if kind != _ARRAY:
        raise r.fail(f"metadata {_q(key)} has unknown value type {kind}")
    item = r.unpack("I", f"element type of {_q(key)}")
    count = r.unpack("Q", f"length of {_q(key)}")
    if item in _SCALARS:
        nbytes, what = count * struct.calcsize(_SCALARS[item]), f"array {_q(key)} of {count} values"
        if arrays:
            values = np.frombuffer(r.read(nbytes, what), "<" + _SCALARS[item]).copy()
            return key, values, (kind, item)
        r.skip(nbytes, what)
    elif item == _STRING:
        if count * 8 > r.left():
            raise r.fail(f"array {_q(key)} of {count} strings does not fit in the file")
        if arrays:
            return key, [r.string(f"string #{j} of {_q(key)}") for j in range(count)], (kind, item)
        r.skip_strings(count, f"array {_q(key)}")
    else:  # nested arrays: the format allows them, no model uses them, gguflib mis-reads them
        raise r.fail(f"metadata array {_q(key)} has element type {item}")
    return key, count, (kind, item)


def _tensor_info(r: _Reader) -> tuple[str, list[int], int, int]:
    name = r.string("tensor name")
    n_dims = r.unpack("I", f"dims of tensor {_q(name)}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise r.fail(f"tensor {_q(name)} has {n_dims} dims (GGML allows 1 to {MAX_DIMS})")
    dims = [r.unpack("Q", f"dims of tensor {_q(name)}") for _ in range(n_dims)]
    type_id = r.unpack("I", f"type of tensor {_q(name)}")
    offset = r.unpack("Q", f"offset of tensor {_q(name)}")
    return name, dims, type_id, offset


def _alignment(metadata: dict, r: _Reader) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment {alignment} is not a power of two")
    return alignment


def _check_tensors(infos: list, data_offset: int, alignment: int, r: _Reader) -> list[TensorInfo]:
    data_size = r.size - data_offset
    if data_size < 0 and infos:
        raise r.fail("the file ends before its tensor data")
    seen: set[str] = set()
    tensors = []
    for name, dims, type_id, offset in infos:
        if name in seen:
            raise r.fail(f"tensor {_q(name)} appears twice")
        seen.add(name)
        if type_id not in GGML_TYPES:
            raise r.fail(f"tensor {_q(name)} has unknown type {type_id}")
        type_name, block, block_bytes = GGML_TYPES[type_id]
        if 0 in dims:
            raise r.fail(f"tensor {_q(name)} has a zero dimension {tuple(dims)}")
        if dims[0] % block:
            raise r.fail(
                f"tensor {_q(name)} ({type_name}) has {dims[0]} columns, not a multiple of {block}"
            )
        nbytes = math.prod(dims) // block * block_bytes
        if offset % alignment:
            raise r.fail(f"tensor {_q(name)} offset {offset} is not a multiple of {alignment}")
        if offset + nbytes > data_size:
            raise r.fail(
                f"tensor {_q(name)} ({nbytes} bytes at offset {offset}) runs past the end of the "
                f"file (data section holds {data_size} bytes; truncated download?)"
            )
        tensors.append(TensorInfo(name, type_id, tuple(dims), offset, nbytes))
    return tensors
