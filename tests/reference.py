"""Dense O(D d) reference shared by every suite (NumPy, torch, CUDA): materialise W, compute every loss from its
definition over all D outputs (:func:`dense_loss`: the loss and dL/dO, in the dtype of O), and take plain SGD
steps with torch.optim.SGD-style weight decay. ``torch_reference`` wraps the same definitions for autograd.
Torch-free."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Targets = np.ndarray  # dense (m, D) target matrix Y (duplicates already summed)

LOSSES = {
    "squared_error": {},
    "spherical_softmax": {"eps": 0.05},
    "taylor_softmax": {},
    "z_loss": {"a": 0.7, "b": 1.5},
}
"""The losses every exactness suite runs, with non-default options."""


def softplus(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def dense_loss(name: str, O: np.ndarray, Y: np.ndarray, opts: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-row loss (m,) and dL/dO (m, D), from the definitions over all D outputs."""
    D = O.shape[1]
    y_tot = Y.sum(1, keepdims=True)
    if name == "squared_error":
        return ((O - Y) ** 2).sum(1), 2 * (O - Y)
    if name == "spherical_softmax":
        eps = opts.get("eps", 1e-2)
        num = O**2 + eps
        Z = num.sum(1, keepdims=True)
        L = -(Y * np.log(num / Z)).sum(1)
        return L, -Y * 2 * O / num + y_tot * 2 * O / Z
    if name == "taylor_softmax":
        num = 1 + O + O**2 / 2
        Z = num.sum(1, keepdims=True)
        L = -(Y * np.log(num / Z)).sum(1)
        return L, -Y * (1 + O) / num + y_tot * (1 + O) / Z
    if name == "z_loss":
        a, b = opts.get("a", 0.1), opts.get("b", 10.0)
        mu = O.mean(1, keepdims=True)
        sigma = O.std(1, keepdims=True)
        z = (O - mu) / sigma
        L = (Y * softplus(a * (b - z)) / a).sum(1)
        g = -Y * sigmoid(a * (b - z))  # dL/dz
        dO = g / sigma - g.sum(1, keepdims=True) / (D * sigma) - z * (g * z).sum(1, keepdims=True) / (D * sigma)
        return L, dO
    raise ValueError(name)


class DenseSGD:
    """The dense layer W (D x d) trained by SGD on the summed loss; the ground truth for every test."""

    def __init__(self, W: np.ndarray, dtype=np.float64) -> None:
        self.W = np.array(W, dtype=dtype)

    def step_with(self, H: np.ndarray, loss_and_grad: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                  lr: float, weight_decay: float = 0.0, mask: np.ndarray | None = None):
        H = H.astype(self.W.dtype)
        O = H @ self.W.T
        L, dO = loss_and_grad(O)
        if mask is not None:
            L = np.where(mask, L, 0.0)
            dO = dO * mask[:, None]
        dO = dO.astype(self.W.dtype)
        grad_H = dO @ self.W
        self.W = (1 - lr * weight_decay) * self.W - lr * (dO.T @ H)
        return L, grad_H

    def step(self, H, Y, name, opts, lr, weight_decay=0.0, mask=None):
        return self.step_with(H, lambda O: dense_loss(name, O, Y, opts), lr, weight_decay, mask)


def dense_targets(targets, m: int, D: int, ignore_index: int = -100) -> tuple[np.ndarray, np.ndarray | None]:
    """(Y, mask) from class labels or a CSR-like object (duplicates summed)."""
    Y = np.zeros((m, D))
    if hasattr(targets, "indptr"):
        for j in range(m):
            for e in range(targets.indptr[j], targets.indptr[j + 1]):
                Y[j, targets.indices[e]] += targets.data[e]
        return Y, None
    labels = np.asarray(targets)
    mask = labels != ignore_index
    Y[np.arange(m)[mask], labels[mask]] = 1.0
    return Y, (mask if not mask.all() else None)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (b the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(np.abs(b).max(), 1e-300)
    return float(np.abs(a - b).max() / scale)
