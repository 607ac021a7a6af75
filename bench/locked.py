"""Run one heavy benchmark process at a time on a shared machine, with a timeout of its own.

Every heavy child runs under `flock /tmp/edgelora-bench.lock`, so measurements never overlap
(each is alone on the CPU and in memory). The timeout starts once the lock is held (`timeout`
runs inside `flock`): a cell that waited an hour for another benchmark is not a timed-out cell.
A caller that already holds the lock for a batch sets BENCH_LOCK_HELD=1.
"""

from __future__ import annotations

import os
import subprocess

LOCK = "/tmp/edgelora-bench.lock"
TIMED_OUT = (124, 137)  # `timeout`'s exit codes: TERM sent / KILL needed


def run_locked(cmd: list[str], timeout: int) -> subprocess.CompletedProcess | None:
    """`cmd`'s completed process, or None if it ran longer than `timeout` seconds."""
    cmd = ["timeout", "--kill-after=30", str(timeout), *cmd]
    if not os.environ.get("BENCH_LOCK_HELD"):
        cmd = ["flock", LOCK, *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return None if p.returncode in TIMED_OUT else p
