"""Streamed least-squares statistics in float64, per diagonal block: Gram matrices of [Y 1] and their
cross-products with the target.

Only the blocks a solve can use are kept — (C+1)² numbers for a dense Q, C·4 for a depthwise conv's
diagonal Q — never the activations themselves, and the held-out error of any candidate follows from
the same sums."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ROW_CHUNK = 1 << 15  # rows per float64 product: bounds the temporary copies


@dataclass
class GramStats:
    """Sums over rows for B independent blocks of k inputs and m targets each."""

    zz: np.ndarray  # (B, k+1, k+1): [Y 1]ᵀ[Y 1] per block
    zt: np.ndarray  # (B, k+1, m):   [Y 1]ᵀT per block
    tt: float       # ΣT² over everything
    rows: int

    @classmethod
    def empty(cls, features: int, targets: int | None = None, blocks: int = 1) -> "GramStats":
        """Sums for ``features`` inputs and ``targets`` outputs per row (default as many), split in blocks."""
        targets = features if targets is None else targets
        k, m = features // blocks, targets // blocks
        return cls(np.zeros((blocks, k + 1, k + 1)), np.zeros((blocks, k + 1, m)), 0.0, 0)

    def __add__(self, other: "GramStats") -> "GramStats":
        return GramStats(self.zz + other.zz, self.zt + other.zt, self.tt + other.tt, self.rows + other.rows)

    def add(self, y: np.ndarray, t: np.ndarray) -> None:
        """Accumulate rows of inputs y (rows, B·k) and targets t (rows, B·m)."""
        blocks, k1, m = self.zt.shape
        k = k1 - 1
        for start in range(0, len(y), _ROW_CHUNK):
            yc = y[start:start + _ROW_CHUNK].astype(np.float64).reshape(-1, blocks, k)
            tc = t[start:start + _ROW_CHUNK].astype(np.float64).reshape(-1, blocks, m)
            if blocks == 1:
                y2, t2 = yc[:, 0], tc[:, 0]
                self.zz[0, :k, :k] += y2.T @ y2
                self.zt[0, :k] += y2.T @ t2
            elif k == 1 and m == 1:  # depthwise: every block is a scalar regression
                self.zz[:, 0, 0] += np.einsum("rb,rb->b", yc[..., 0], yc[..., 0])
                self.zt[:, 0, 0] += np.einsum("rb,rb->b", yc[..., 0], tc[..., 0])
            else:
                self.zz[:, :k, :k] += np.einsum("rbi,rbj->bij", yc, yc, optimize=True)
                self.zt[:, :k] += np.einsum("rbi,rbj->bij", yc, tc, optimize=True)
            sums = yc.sum(axis=0)
            self.zz[:, :k, k] += sums
            self.zz[:, k, :k] += sums
            self.zz[:, k, k] += len(yc)
            self.zt[:, k] += tc.sum(axis=0)
            self.tt += float(np.sum(tc * tc))
            self.rows += len(yc)

    def squared_error(self, p: np.ndarray) -> float:
        """Σ‖t − [y 1]·P‖² over the accumulated rows, from the sums alone; P is (B, k+1, m)."""
        return float(self.tt - 2.0 * np.sum(p * self.zt) + np.sum(p * (self.zz @ p)))

    def relative_error(self, p: np.ndarray) -> float:
        """‖t − [y 1]·P‖ / ‖t‖."""
        return float(np.sqrt(max(self.squared_error(p), 0.0) / self.tt)) if self.tt > 0 else 0.0


def as_rows(tensor: np.ndarray, channel_axis: int) -> np.ndarray:
    """(N, ..., C, ...) → (rows, C): every sample and position is one least-squares row."""
    return np.moveaxis(tensor, channel_axis, -1).reshape(-1, tensor.shape[channel_axis])
