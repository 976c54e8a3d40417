"""Streamed least-squares statistics: Gram matrices of [Y, 1] and cross-products with the target, in float64.

Only (C+1)² numbers per point are kept, never the activations themselves, and the held-out error of
any candidate (Q, d) follows from the same sums."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ROW_CHUNK = 1 << 16  # rows per float64 product: bounds the temporary copies


@dataclass
class GramStats:
    zz: np.ndarray  # (C+1, C+1): [Y 1]ᵀ[Y 1]
    zt: np.ndarray  # (C+1, C):   [Y 1]ᵀT
    tt: float       # ΣT²
    rows: int

    @classmethod
    def empty(cls, features: int, targets: int | None = None) -> "GramStats":
        """Sums for ``features`` inputs per row and ``targets`` outputs (default: as many)."""
        targets = features if targets is None else targets
        return cls(np.zeros((features + 1, features + 1)), np.zeros((features + 1, targets)), 0.0, 0)

    def __add__(self, other: "GramStats") -> "GramStats":
        return GramStats(self.zz + other.zz, self.zt + other.zt, self.tt + other.tt, self.rows + other.rows)

    def add(self, y: np.ndarray, t: np.ndarray) -> None:
        """Accumulate rows of student output y and target t, both (rows, C)."""
        for start in range(0, len(y), _ROW_CHUNK):
            yc = y[start:start + _ROW_CHUNK].astype(np.float64)
            tc = t[start:start + _ROW_CHUNK].astype(np.float64)
            c = yc.shape[1]
            self.zz[:c, :c] += yc.T @ yc
            sums = yc.sum(axis=0)
            self.zz[:c, c] += sums
            self.zz[c, :c] += sums
            self.zz[c, c] += len(yc)
            self.zt[:c] += yc.T @ tc
            self.zt[c] += tc.sum(axis=0)
            self.tt += float(np.sum(tc * tc))
            self.rows += len(yc)

    def squared_error(self, p: np.ndarray) -> float:
        """Σ‖t − [y 1]·P‖² over the accumulated rows, from the sums alone."""
        return float(self.tt - 2.0 * np.sum(p * self.zt) + np.sum(p * (self.zz @ p)))

    def relative_error(self, p: np.ndarray) -> float:
        """‖t − [y 1]·P‖ / ‖t‖; for an adapter P = [Qᵀ; dᵀ]."""
        return float(np.sqrt(max(self.squared_error(p), 0.0) / self.tt)) if self.tt > 0 else 0.0


def as_rows(tensor: np.ndarray, channel_axis: int) -> np.ndarray:
    """(N, ..., C, ...) → (rows, C): every sample and position is one least-squares row."""
    return np.moveaxis(tensor, channel_axis, -1).reshape(-1, tensor.shape[channel_axis])
