"""The notebooks run headless, top to bottom, at a small size, and draw their plots.

The kernel is this interpreter (a kernel spec written for `sys.executable`), so the notebooks
see the same environment as the tests whatever `jupyter kernelspec list` says.
"""

import json
import sys
from pathlib import Path

import pytest
from conftest import requires_smollm2

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need the dev extra")
pytest.importorskip("ipykernel", reason="notebook tests need the dev extra")
pytest.importorskip("matplotlib", reason="notebook tests need the dev extra")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "edgelora-test"
CELL_TIMEOUT_S = 300


@pytest.fixture
def this_python_kernel(tmp_path, monkeypatch):
    """A kernel spec that starts ipykernel with this very interpreter, found via JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "edgelora tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return KERNEL


def run_notebook(name: str, kernel: str, timeout: int = CELL_TIMEOUT_S) -> list:
    """Execute notebooks/<name> in place of a user; return its code cells with outputs."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=timeout,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    return cells


def images(cells: list) -> int:
    return sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)


@pytest.mark.slow
@requires_smollm2
def test_quickstart_notebook(tmp_path, monkeypatch, this_python_kernel):
    monkeypatch.setenv("EDGELORA_NB_STEPS", "2")
    monkeypatch.setenv("EDGELORA_NB_MAX_SEQ_LEN", "64")
    monkeypatch.setenv("EDGELORA_NB_MAX_TOKENS", "8")
    monkeypatch.setenv("EDGELORA_NB_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("EDGELORA_NB_PLOT", str(tmp_path / "curve.png"))
    cells = run_notebook("01_quickstart.ipynb", this_python_kernel)

    assert images(cells) >= 1
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert (tmp_path / "run" / "adapters.safetensors").is_file()
    text = "".join(o.get("text", "") for c in cells for o in c.outputs)
    assert "memory plan" in text and "AFTER:" in text


@pytest.mark.slow
@requires_smollm2
def test_memory_techniques_notebook(tmp_path, monkeypatch, this_python_kernel):
    monkeypatch.setenv("EDGELORA_NB_SEQ_LEN", "64")
    # k >= V needs no neighbour table (a one-time ~4 min build for SmolLM2 on this CPU)
    monkeypatch.setenv("EDGELORA_NB_SUBSET_K", "49152")
    monkeypatch.setenv("EDGELORA_NB_SPILL_DIR", str(tmp_path / "spill"))
    monkeypatch.setenv("EDGELORA_NB_PLOT", str(tmp_path / "techniques.png"))
    cells = run_notebook("02_memory_techniques.ipynb", this_python_kernel)

    assert images(cells) >= 1
    assert (tmp_path / "techniques.png").stat().st_size > 0
    assert not any((tmp_path / "spill").rglob("*.npy")), "spill files left behind"


@pytest.mark.slow
@requires_smollm2
def test_lars_emloc_notebook(tmp_path, monkeypatch, this_python_kernel):
    """LoRA, LARS and EMLoC through the same public calls (train, emloc, generate)."""
    monkeypatch.setenv("EDGELORA_NB_STEPS", "2")
    monkeypatch.setenv("EDGELORA_NB_MAX_SEQ_LEN", "64")
    monkeypatch.setenv("EDGELORA_NB_MAX_TOKENS", "8")
    # two narrow projections: EMLoC's calibration (an eigh + SVD per projection) stays short
    monkeypatch.setenv("EDGELORA_NB_KEYS", "self_attn.q_proj,self_attn.v_proj")
    monkeypatch.setenv("EDGELORA_NB_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("EDGELORA_NB_PLOT", str(tmp_path / "methods.png"))
    # one cell runs all of EMLoC (calibrate, build, train, correct, score): a longer limit
    cells = run_notebook("03_lars_emloc.ipynb", this_python_kernel, timeout=3 * CELL_TIMEOUT_S)

    assert images(cells) >= 1
    assert (tmp_path / "methods.png").stat().st_size > 0
    runs = tmp_path / "runs"
    assert (runs / "lars" / "adapter_config.json").is_file()
    config = json.loads((runs / "emloc" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["emloc"]["ratio"] == 0.4
    text = "".join(o.get("text", "") for c in cells for o in c.outputs)
    assert all(f"{m:<6} validation loss" in text for m in ("LoRA", "LARS", "EMLoC"))
