"""The correctness check benchmarks run before timing: factored steps against dense float64 SGD."""

from __future__ import annotations

import numpy as np
import sparsetarget as st


def spherical_softmax_steps_error(D: int, d: int, m: int, lr: float, h_scale: float = 1.0, steps: int = 3,
                                  eps: float = 1e-2, seed: int = 5) -> float:
    """Largest relative difference of W after ``steps`` spherical-softmax steps of a FactoredOutput and of dense
    float64 SGD from the same weights and batches. Raises SystemExit above 1e-10."""
    rng = np.random.default_rng(seed)
    W = rng.uniform(-0.1, 0.1, (D, d))
    layer = st.FactoredOutput(W, loss="spherical_softmax", eps=eps)
    for _ in range(steps):
        H, y = rng.standard_normal((m, d)) * h_scale, rng.integers(0, D, m)
        layer.step(H, y, lr)
        O = H @ W.T
        num = O * O + eps
        Z = num.sum(1, keepdims=True)
        rows = np.arange(m)
        dO = 2 * O / Z
        dO[rows, y] -= 2 * O[rows, y] / num[rows, y]
        W = W - lr * dO.T @ H
    err = float(np.abs(layer.dense_weight() - W).max() / np.abs(W).max())
    if err > 1e-10:
        raise SystemExit(f"the factored step disagrees with dense SGD: relative error {err:.3g}")
    return err
