"""TensorRows: rows of a safetensors tensor read with pread equal the same rows of mx.load."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_edgelora.rowread import TensorRows


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16, mx.uint32, mx.uint8])
def test_slices_and_ids_equal_the_loaded_tensor(dtype, tmp_path):
    mx.random.seed(0)
    t = (mx.random.uniform(shape=(37, 3, 5)) * 200).astype(dtype)
    path = tmp_path / "t.safetensors"
    mx.save_safetensors(str(path), {"a.weight": mx.zeros((2,)), "b.weight": t})
    ref = mx.load(str(path))["b.weight"]
    rows = TensorRows(path)
    try:
        assert rows.shape("b.weight") == (37, 3, 5)
        for sel in (slice(0, 37), slice(5, 12), slice(36, 37), slice(30, 99)):
            got = rows.read("b.weight", sel)
            assert got.dtype == dtype and mx.array_equal(got, ref[sel]).item(), sel
        ids = np.array([[4, 0, 36], [4, 9, 9]])  # repeats, any order, any shape
        got = rows.read("b.weight", ids)
        assert got.shape == (6, 3, 5)
        assert mx.array_equal(got, ref[mx.array(ids.reshape(-1))]).item()
    finally:
        rows.close()
