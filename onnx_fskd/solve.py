"""Ridge least squares for Q and d, block-diagonal for grouped convs, shrunk towards Q = I."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stats import GramStats


@dataclass(frozen=True, eq=False)
class Adapter:
    """The fitted correction y ↦ Q·y + d for one point."""

    q: np.ndarray
    d: np.ndarray

    @classmethod
    def identity(cls, channels: int) -> "Adapter":
        return cls(np.eye(channels), np.zeros(channels))

    @property
    def params(self) -> np.ndarray:
        """[Qᵀ; dᵀ]: the adapter as least-squares parameters over [y 1]."""
        return np.vstack([self.q.T, self.d[None, :]])

    def apply(self, tensor: np.ndarray, channel_axis: int) -> np.ndarray:
        moved = np.moveaxis(tensor, channel_axis, -1)
        out = moved @ self.q.T.astype(tensor.dtype) + self.d.astype(tensor.dtype)
        return np.ascontiguousarray(np.moveaxis(out, -1, channel_axis))


def solve_adapter(stats: GramStats, group_size: int, ridge: float, fit_bias: bool = True) -> Adapter:
    """Minimise ‖T − Y·Qᵀ − d‖² + λ‖Q − I‖² per diagonal block of Q.

    λ = ridge · trace(YᵀY)/C of each block, so the strength does not depend on activation scale or row
    count. Shrinking towards I (not 0) means scarce data leaves the student as it was, and λ > 0 keeps
    the system positive definite even with fewer rows than channels."""
    channels = stats.zt.shape[1]
    blocks = channels // group_size
    cols = np.arange(channels).reshape(blocks, group_size)
    rows = np.concatenate([cols, np.full((blocks, 1), channels)], axis=1) if fit_bias else cols
    gram = stats.zz[rows[:, :, None], rows[:, None, :]]      # (blocks, k, k)
    cross = stats.zt[rows[:, :, None], cols[:, None, :]]     # (blocks, k, group_size)
    diag = np.einsum("bii->bi", gram[:, :group_size, :group_size])
    lam = ridge * diag.mean(axis=1) + 1e-12 * (diag.max() + 1.0)
    penalty = np.zeros_like(gram)
    idx = np.arange(group_size)
    penalty[:, idx, idx] = lam[:, None]
    prior = np.zeros_like(cross)
    prior[:, idx, idx] = lam[:, None]
    solution = np.linalg.solve(gram + penalty, cross + prior)  # (blocks, k, group_size): [Qᵀ; dᵀ]
    q = np.zeros((channels, channels))
    q[cols[:, :, None], cols[:, None, :]] = solution[:, :group_size].transpose(0, 2, 1)
    d = solution[:, group_size].reshape(-1) if fit_bias else np.zeros(channels)
    return Adapter(q, d)


def solve_weights(stats: GramStats, prior: np.ndarray, ridge: float, fit_bias: bool) -> np.ndarray:
    """Full-weight refit: minimise ‖T − [X 1]·P‖² + λ‖W − W₀‖², P = [Wᵀ; bᵀ], shrunk towards the
    current weights W₀ (``prior``, same layout) with λ = ridge · trace(XᵀX)/features."""
    features = stats.zz.shape[0] - 1
    keep = np.arange(features + 1) if fit_bias else np.arange(features)
    gram = stats.zz[np.ix_(keep, keep)]
    lam = ridge * np.trace(gram[:features, :features]) / max(features, 1) + 1e-12 * (np.abs(gram).max() + 1.0)
    penalty = np.zeros(len(keep))
    penalty[:features] = lam
    solution = np.linalg.solve(gram + np.diag(penalty), stats.zt[keep] + penalty[:, None] * prior[keep])
    if fit_bias:
        return solution
    return np.vstack([solution, prior[features:]])
