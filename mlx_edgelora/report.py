"""Progress line, peak memory and the metrics log of a training run.

Peak memory is MLX's own allocator peak (`mx.get_peak_memory`), the figure the paper reports.
Every step's record also goes to <out>/metrics.jsonl (strict JSON, one object a line) so
curves can be plotted afterwards, and with --report-to to wandb or TensorBoard.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import mlx.core as mx

from .errors import UserError

GB = 1024**3


def peak_gb() -> float:
    return mx.get_peak_memory() / GB


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class Reporter:
    """Prints a progress line per step (in place on a terminal) and logs metrics as JSON lines."""

    total_steps: int
    log_path: Path | None = None
    stream: TextIO = sys.stdout
    sinks: list[Callable[[dict], None]] = field(default_factory=list)  # --report-to trackers
    history: list[dict] = field(default_factory=list)
    _t0: float = field(default_factory=time.perf_counter)
    _first_step: int | None = None
    _tokens: int = 0

    def start(self, first_step: int) -> None:
        """Start the clock before step `first_step` (1-based) so its time counts too."""
        self._first_step, self._t0, self._tokens = first_step - 1, time.perf_counter(), 0

    def step(self, step: int, loss: float, tokens: int, lr: float, exact: bool = True) -> dict:
        """Record optimizer step `step` (1-based) and print the progress line; `exact` False
        (an approximate loss head, e.g. --subset-refresh) marks the loss "~" and logs
        loss_exact: false."""
        if self._first_step is None:
            self.start(step)
        self._tokens += tokens
        elapsed = time.perf_counter() - self._t0
        done = step - self._first_step
        rec = {
            "step": step,
            "loss": loss,
            "loss_exact": exact,
            "lr": lr,
            "tokens": tokens,
            "tokens_per_s": self._tokens / max(elapsed, 1e-9),
            "peak_gb": peak_gb(),
            "elapsed_s": elapsed,
        }
        eta = elapsed / done * (self.total_steps - step) if done else float("nan")
        approx = "" if exact else "~"  # an approximate loss head's value (--subset-refresh)
        line = (
            f"step {step}/{self.total_steps} | loss {approx}{loss:.3f}"
            f" | {rec['tokens_per_s']:.0f} tok/s"
            f" | peak {rec['peak_gb']:.2f} GB | lr {lr:.1e} | ETA {format_duration(eta)}"
        )
        self._print(line, final=step == self.total_steps or step % 10 == 0 or done == 1)
        self._log(rec)
        return rec

    def eval(self, step: int, val_loss: float, n_tokens: int) -> dict:
        rec = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        rec["val_tokens"] = n_tokens
        self._print(f"step {step}: val loss {val_loss:.3f} | val ppl {rec['val_ppl']:.2f}", True)
        self._log(rec)
        return rec

    def test(self, step: int, test_loss: float, n_tokens: int) -> dict:
        """The exact loss on the held-out test set (--test), in the log beside val_loss."""
        rec = {"step": step, "test_loss": test_loss, "test_ppl": math.exp(min(test_loss, 50.0))}
        rec["test_tokens"] = n_tokens
        self._print(f"test loss {test_loss:.3f} | test ppl {rec['test_ppl']:.2f}", True)
        self._log(rec)
        return rec

    def info(self, message: str) -> None:
        self._print(message, True)

    def close(self) -> None:
        """Flush and close the --report-to trackers (their writers buffer in the background)."""
        for send in self.sinks:
            getattr(send, "close", lambda: None)()

    def _print(self, line: str, final: bool) -> None:
        tty = getattr(self.stream, "isatty", lambda: False)()
        if tty:
            end = "\n" if final else ""
            self.stream.write("\r\033[K" + line + end)
        elif final:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        for send in self.sinks:
            send(rec)
        if self.log_path:  # strict JSON: a non-finite value is written as null, never NaN
            clean = {
                k: v if not isinstance(v, float) or math.isfinite(v) else None
                for k, v in rec.items()
            }
            with open(self.log_path, "a") as f:
                f.write(json.dumps(clean, allow_nan=False) + "\n")


# --- optional trackers (--report-to) -------------------------------------------------------

_PIP = {"wandb": "pip install wandb", "tensorboard": "pip install tensorboardX"}


def attach_tracker(reporter: Reporter, report_to: str, out: Path, config: dict) -> None:
    """Also send every metrics record to wandb or TensorBoard (metrics.jsonl stays the record).

    The packages are optional: a missing one is a one-line UserError naming the pip command.
    wandb goes through mlx-lm's own WandBCallback; TensorBoard through tensorboardX.
    """
    if report_to == "none":
        return
    try:
        send = _wandb(out, config) if report_to == "wandb" else _tensorboard(out)
    except ImportError:
        raise UserError(
            f"--report-to {report_to}: the package is not installed; run `{_PIP[report_to]}`"
        ) from None
    reporter.sinks.append(send)


def _wandb(out: Path, config: dict) -> Callable[[dict], None]:
    from mlx_lm.tuner import callbacks

    if callbacks.wandb is None:  # mlx-lm imports wandb optionally, at its own import
        raise ImportError("wandb")
    cb = callbacks.WandBCallback("mlx-edgelora", str(out), config)

    def send(rec: dict) -> None:
        info = {**rec, "iteration": rec["step"]}  # mlx-lm's name for the step
        if "val_loss" in rec:
            cb.on_val_loss_report(info)
        else:
            cb.on_train_loss_report(info)

    send.close = callbacks.wandb.finish
    return send


def _tensorboard(out: Path) -> Callable[[dict], None]:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=str(Path(out) / "tensorboard"))

    def send(rec: dict) -> None:
        group = "val" if "val_loss" in rec else "train"
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)):
                writer.add_scalar(f"{group}/{key}", value, rec["step"])

    send.close = writer.close  # events are queued to a writer thread: close() drains it
    return send
