"""Writes that never leave a user's folder half-changed, and one run per output folder.

Why one module: training, fusing, spilling and the neighbour cache all write files a crash
must not corrupt, and `train --out` / `fuse --out` both write into a folder the user may
already own. Each of these jobs is done once, here:
- `atomic_path`: write a hidden temp file beside the target, then rename it over the target,
  so a reader (or the next run after a kill) sees the old file or the new one, never half.
- `check_out` / `remove_ours`: check an output folder without changing it, and later (once
  every input has been validated) remove only the files a previous run of ours wrote.
- `lock_out`: an exclusive `fcntl.flock` on a file inside --out, held for the whole run, so
  a second run on the same folder stops with the holder's pid instead of interleaving.
- `require_free_space`: fail before writing, not halfway through with a full disk.
- `write_safetensors`: a safetensors file written one tensor in memory at a time (the
  streamed trainable state's checkpoints and adapter, state.py; a fused model, fuse.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import UserError

LOCK_FILE = ".edgelora.lock"  # inside --out; never counts as the user's content
_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint64: "U64",
    mx.int64: "I64",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.uint8: "U8",
}
SPACE_MARGIN = 1.2  # free space required = estimate x margin (file-system overhead, slack)


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path`, on failure it is removed.

    The temp name keeps the suffix (mx.save_safetensors and np.save add one when missing)
    and carries the pid, so two processes never share it. `durable` fsyncs the file before
    the rename (checkpoints and adapters: they must survive a power cut, not just a kill).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # nothing left there after a successful rename


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text)


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def user_content(folder: Path) -> list[Path]:
    """What is in `folder`, less our lock file (which an empty run folder may hold)."""
    return [p for p in folder.iterdir() if p.name != LOCK_FILE] if folder.is_dir() else []


def check_out(
    out: str | Path,
    may_replace: bool,
    options: str = "--overwrite to replace it",
    inside: str | Path | None = None,
    flag: str = "--out",
) -> Path:
    """The output folder (train --out, fuse --out) as a Path, checked without changing it.

    Refused: a file; a non-empty folder unless `may_replace` (the message offers `options`);
    a folder equal to or inside `inside` (the model being read: fusing into the base's own
    folder would overwrite the base). Removing old files is left to the caller, after every
    other input is validated (`remove_ours`), so a mistyped flag never costs the old run.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another {flag}")
    if user_content(out) and not may_replace:
        raise UserError(f"{out}: folder is not empty; pass {options}, or choose another {flag}")
    if inside is not None and Path(inside).is_dir():
        base = Path(inside).expanduser().resolve()
        if out.resolve() == base or base in out.resolve().parents:
            raise UserError(
                f"{out}: is inside the model folder {base}, whose files it would replace; "
                f"choose a {flag} outside it"
            )
    return out


def make_folder(out: Path, flag: str = "--out") -> Path:
    """Create `out` (and its parents), as a one-line error on a read-only or full disk."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"{out}: cannot create the folder ({e.strerror or e}); choose a writable {flag}"
        ) from None
    return out


def remove_ours(out: Path, patterns: list[str]) -> None:
    """Remove what a previous run of ours wrote in `out` (files or folders by glob pattern);
    anything else in the folder is the user's and stays."""
    for pattern in patterns:
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


class OutLock:
    """An exclusive lock on `folder` for this process (released by `release` or by exit)."""

    def __init__(self, folder: Path, flag: str = "--out"):
        self.path = folder / LOCK_FILE
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                f"{folder}: cannot write in the folder ({e.strerror or e}); "
                f"choose a writable {flag}"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{folder}: cannot lock the folder ({e.strerror})") from None
            raise UserError(
                f"{folder}: another run (pid {holder}) is using this {flag}; wait for it to "
                f"finish, stop it, or choose another {flag}"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock; the file stays (deleting races)
            self._fd = -1


def format_bytes(n: float) -> str:
    """GB down to 0.1 GB, MB below that: never "needs ~0.0 GB, only 0.0 GB free"."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def require_free_space(folder: Path, nbytes: int, what: str, fix: str) -> None:
    """Raise UserError unless `folder`'s disk has room for `nbytes` (with a margin)."""
    free, need = shutil.disk_usage(folder).free, nbytes * SPACE_MARGIN
    if free < need:
        raise UserError(
            f"{folder}: needs ~{format_bytes(need)} free for {what}, only {format_bytes(free)} "
            f"free; {fix}"
        )


def write_safetensors(path: Path, tensors: dict[str, mx.array]) -> None:
    """mx.save_safetensors, one tensor in memory at a time: `tensors` (lazy arrays, e.g. from
    mx.load) is consumed as each one is written."""
    header, offset = {}, 0
    for k, v in tensors.items():
        if v.dtype not in _DTYPES:
            raise TypeError(f"{k}: dtype {v.dtype} not supported by the streamed writer")
        n = v.size * v.itemsize
        header[k] = {
            "dtype": _DTYPES[v.dtype],
            "shape": list(v.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    header["__metadata__"] = {"format": "mlx"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in list(tensors):
            v = tensors.pop(k)
            f.write(np.asarray(v.view(mx.uint16) if v.dtype == mx.bfloat16 else v).tobytes())
