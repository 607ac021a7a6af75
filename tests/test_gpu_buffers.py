"""--gpu-buffers: when the CLI starts itself again with MLX's command-buffer limits.

The limits' effect needs a GPU (bench/results/gpu_trainer.md measured it on CUDA); here: the
decision, the restart's command line and environment, and that a CPU never restarts."""

# isort: off
import mlx_edgelora  # (first: preloads OpenBLAS before mlx)

# isort: on
from contextlib import contextmanager
from importlib import import_module

import pytest

from mlx_edgelora import gpu_buffers, precision
from mlx_edgelora.errors import UserError


@contextmanager
def _cli_module():
    """The CLI module mlx_edgelora.train, imported for one test only: importing it makes the
    package attribute `train` the module, which would shadow the public function `train`
    for every test after (the package resolves it lazily)."""
    before = vars(mlx_edgelora).get("train")
    try:
        yield import_module("mlx_edgelora.train")
    finally:
        if before is None:
            vars(mlx_edgelora).pop("train", None)
        else:
            mlx_edgelora.train = before


@pytest.fixture
def cli():
    with _cli_module() as module:
        yield module


SMALL = gpu_buffers.SMALL


@pytest.mark.parametrize(
    "choice, budget, gpu, restarts",
    [
        ("small", False, True, True),
        ("auto", True, True, True),
        ("auto", False, True, False),
        ("mlx", True, True, False),
        ("small", True, False, False),  # a CPU: the limits mean nothing there
    ],
)
def test_restart_decision(choice, budget, gpu, restarts):
    env = gpu_buffers.restart_env(choice, budget, gpu, {"HOME": "/h"})
    assert (env is not None) == restarts
    if restarts:
        assert env["HOME"] == "/h" and all(env[k] == v for k, v in SMALL.items())


def test_no_restart_once_set_and_user_values_kept():
    assert gpu_buffers.restart_env("small", False, True, dict(SMALL)) is None
    env = gpu_buffers.restart_env("small", False, True, {"MLX_MAX_OPS_PER_BUFFER": "4"})
    assert env == {"MLX_MAX_OPS_PER_BUFFER": "4", "MLX_MAX_MB_PER_BUFFER": "1"}


class Restarted(Exception):
    pass


def _capture_exec(monkeypatch):
    calls = []

    def execve(path, args, env):
        calls.append((path, args, env))
        raise Restarted

    monkeypatch.setattr(gpu_buffers.os, "execve", execve)
    return calls


def test_cli_restarts_on_a_gpu_with_its_arguments(monkeypatch, cli):
    for k in SMALL:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(precision, "on_gpu", lambda: True)
    calls = _capture_exec(monkeypatch)
    argv = ["--memory-budget-gb", "3", "--steps", "1"]
    with pytest.raises(Restarted):
        cli.main(argv)
    ((path, args, env),) = calls
    assert args[1:] == ["-m", "mlx_edgelora.train", *argv]
    assert all(env[k] == v for k, v in SMALL.items())


@pytest.mark.parametrize("gpu, argv", [(False, ["--gpu-buffers", "small"]), (True, [])])
def test_cli_runs_on_without_restart(monkeypatch, cli, gpu, argv):
    """A CPU, or a GPU with no budget and the default `auto`: straight to training."""
    for k in SMALL:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(precision, "on_gpu", lambda: gpu)
    calls = _capture_exec(monkeypatch)

    def stop(cfg, keep_model):
        raise UserError("reached training")

    monkeypatch.setattr("mlx_edgelora.trainer.train", stop)
    assert cli.main([*argv, "--steps", "1"]) == 2
    assert calls == []


def test_startup_line_says_what_the_plan_means():
    assert "op by op" in gpu_buffers.describe("mlx", False, dict(SMALL))
    assert "before importing mlx" in gpu_buffers.describe("small", False, {})
    assert "--gpu-buffers small" in gpu_buffers.describe("auto", False, {})


def test_public_train_is_the_trainer_after_the_cli_module_was_imported():
    """What _cli_module guards: test_export's SmolLM2 run failed ('module' object is not
    callable) when a collected test module imported the CLI at import time."""
    with _cli_module():
        pass
    from mlx_edgelora import train

    assert callable(train) and train.__module__ == "mlx_edgelora.trainer"
