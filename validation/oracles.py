"""Independent float64 NumPy oracles and comparison helpers for reference checks.

These are written without sae-ref's own code, so a check against them can catch a bug in it.

>>> import numpy as np
>>> top_n_mask_oracle(np.array([[1., 2., 2.]]), 2, None).tolist()
[[False, True, True]]
"""

from __future__ import annotations

import numpy as np


def top_n_mask_oracle(z, n: int, axis) -> np.ndarray:
    """Mask of the ``n`` largest under the tie rule: order by (-value, index), take the first n.

    ``axis=None``: over the flat (row-major) array; ``axis=-1``: within each row.
    """
    z = np.asarray(z, dtype=np.float64)
    if axis is None:
        flat = z.reshape(-1)
        order = np.lexsort((np.arange(flat.size), -flat))
        mask = np.zeros(flat.size, dtype=bool)
        mask[order[:n]] = True
        return mask.reshape(z.shape)
    mask = np.zeros(z.shape, dtype=bool)
    cols = np.arange(z.shape[1])
    for b in range(z.shape[0]):
        mask[b, np.lexsort((cols, -z[b]))[:n]] = True
    return mask


def assert_close(actual, expected, *, rtol=1e-9, atol=1e-11, what=""):
    """Elementwise closeness, the absolute tolerance scaled by the size of ``expected``."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def torch_leaf(a, grad: bool = True):
    """A float64 torch leaf tensor holding a copy of ``a`` (for autograd references)."""
    import torch

    return torch.tensor(np.array(a, dtype=np.float64), dtype=torch.float64, requires_grad=grad)


def torch_grad(t) -> np.ndarray:
    """The gradient torch accumulated on ``t`` (zeros when the graph never reached it)."""
    return np.zeros(tuple(t.shape)) if t.grad is None else t.grad.detach().numpy()


def finite_difference_check(fun, arr, grad, seed, *, n=3, rel_step=1e-6, tol=2e-6, what=""):
    """Central finite differences of ``fun`` at ``n`` random coordinates of ``arr``.

    ``fun(array) -> float`` or ``None`` when the point leaves the smooth region (then the
    coordinate is skipped: there is no derivative to compare with).
    """
    arr = np.asarray(arr, dtype=np.float64)
    grad = np.asarray(grad, dtype=np.float64)
    assert grad.shape == arr.shape, f"{what}: gradient shape {grad.shape} != {arr.shape}"
    if arr.size == 0:
        return
    f0 = fun(arr)
    rng = np.random.default_rng(seed)
    for i in rng.choice(arr.size, size=min(n, arr.size), replace=False):
        step = rel_step * max(1.0, abs(float(arr.flat[i])))
        plus, minus = arr.copy(), arr.copy()
        plus.flat[i] += step
        minus.flat[i] -= step
        fp, fm = fun(plus), fun(minus)
        if fp is None or fm is None:
            continue
        fd = (fp - fm) / (2 * step)
        g = float(grad.flat[i])
        bound = tol * (1.0 + abs(g) + abs(f0 if f0 is not None else 0.0))
        assert abs(fd - g) <= bound, (
            f"{what}: finite difference {fd!r} != gradient {g!r} at flat index {i} "
            f"(|diff| = {abs(fd - g):.3g} > {bound:.3g})")
