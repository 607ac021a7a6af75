"""Rows of a tensor in a safetensors file, read without reading (or mapping) the tensor.

Why: the embedding and LM head of a 3B model are its largest single weight (128K x 3072 at
INT4: 0.21 GB). A training step needs all of it only as a sequence of vocabulary tiles (the
chunked loss) and, for the embedding, only the rows of the batch's token ids. Reading just
those bytes with `os.pread` keeps the whole matrix out of memory. Not `np.memmap`: pages of a
mapped file count in the process's resident set as they are touched, so a pass over the
vocabulary would put the whole head back into the RSS that a user sees; `pread` goes through
the page cache, which does not.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

# safetensors dtype -> (numpy dtype of the bytes, mlx dtype to view them as, or None)
_DTYPES = {
    "F32": (np.float32, None),
    "F16": (np.float16, None),
    "BF16": (np.uint16, mx.bfloat16),  # numpy has no bfloat16: read the bits, view in mlx
    "U32": (np.uint32, None),
    "I32": (np.int32, None),
    "U16": (np.uint16, None),
    "U8": (np.uint8, None),
    "I8": (np.int8, None),
}


class TensorRows:
    """The tensors of one safetensors file, readable by rows (first axis)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, n, 8))
        except Exception:
            os.close(self._fd)
            raise
        header.pop("__metadata__", None)
        self._data = 8 + n
        self.tensors = header  # name -> {"dtype", "shape", "data_offsets"}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def read(self, name: str, rows: slice | np.ndarray) -> mx.array:
        """Rows `rows` (a step-1 slice, or int indices in any order) of tensor `name`."""
        info = self.tensors[name]
        np_dtype, view = _DTYPES[info["dtype"]]
        shape = info["shape"]
        row_elems = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = row_elems * np.dtype(np_dtype).itemsize
        start = self._data + info["data_offsets"][0]
        if isinstance(rows, slice):
            s, e, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("TensorRows.read: only step-1 slices")
            raw = os.pread(self._fd, (e - s) * row_bytes, start + s * row_bytes)
            out = np.frombuffer(raw, np_dtype).reshape(e - s, *shape[1:])
        else:
            ids = np.asarray(rows, dtype=np.int64).reshape(-1)
            uniq, inverse = np.unique(ids, return_inverse=True)
            buf = np.empty((uniq.size, row_elems), np_dtype)
            for j, r in enumerate(uniq):  # one small read per distinct row
                buf[j] = np.frombuffer(
                    os.pread(self._fd, row_bytes, start + int(r) * row_bytes), np_dtype
                )
            out = buf[inverse].reshape(ids.size, *shape[1:])
        arr = mx.array(out)
        return arr.view(view) if view is not None else arr

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
