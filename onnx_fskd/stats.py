"""Streamed least-squares statistics in float64, per diagonal block: Gram matrices of [Y 1] and their
cross-products with the target.

Only the blocks a solve can use are kept — (C+1)² numbers for a dense Q, C·4 for a depthwise conv's
diagonal Q — never the activations themselves, and the held-out error of any candidate follows from
the same sums."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK_ELEMENTS = 1 << 22  # float64 elements per converted chunk: bounds the temporary copies


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
        """Accumulate inputs y and targets t given as rows (rows, F) or as planes (n, F, L) — a conv's
        (N, C, H·W) output as it lies. F = B·k features and B·m targets."""
        if y.ndim == 2:
            y, t = y.T[None], t.T[None]
        per_plane = max(1, _CHUNK_ELEMENTS // max(1, y.shape[1] * y.shape[2]))
        for start in range(0, len(y), per_plane):
            self._add_chunk(_features_by_rows(y[start:start + per_plane]), _features_by_rows(t[start:start + per_plane]))

    def _add_chunk(self, y: np.ndarray, t: np.ndarray) -> None:
        """y (F, rows) and t (T, rows) in float64; one large product per block."""
        blocks, k1, m = self.zt.shape
        k = k1 - 1
        yb, tb = y.reshape(blocks, k, -1), t.reshape(blocks, m, -1)
        if blocks == 1:
            self.zz[0, :k, :k] += y @ y.T  # numpy runs a·aᵀ as a symmetric rank-k update
            self.zt[0, :k] += y @ t.T
        elif k == 1 and m == 1:  # depthwise: every block is a scalar regression
            self.zz[:, 0, 0] += np.einsum("br,br->b", yb[:, 0], yb[:, 0])
            self.zt[:, 0, 0] += np.einsum("br,br->b", yb[:, 0], tb[:, 0])
        else:
            self.zz[:, :k, :k] += np.matmul(yb, yb.transpose(0, 2, 1))
            self.zt[:, :k] += np.matmul(yb, tb.transpose(0, 2, 1))
        sums = yb.sum(axis=2)
        self.zz[:, :k, k] += sums
        self.zz[:, k, :k] += sums
        self.zz[:, k, k] += y.shape[1]
        self.zt[:, k] += tb.sum(axis=2)
        self.tt += float(np.einsum("ij,ij->", t, t))
        self.rows += y.shape[1]

    def squared_error(self, p: np.ndarray) -> float:
        """Σ‖t − [y 1]·P‖² over the accumulated rows, from the sums alone; P is (B, k+1, m). For P = [I; 0]
        (the student as it is, which the guard judges every ``q`` point against) from traces, without the
        (k+1)²·m product: a 1280-channel point's costs as much as its solve's factorisation. The full
        solver's P is one (F+1, C) matrix."""
        if p.ndim == 3 and p.shape[1] == p.shape[2] + 1 and not p[:, -1].any() \
                and np.array_equal(p[:, :-1], np.broadcast_to(np.eye(p.shape[2]), p[:, :-1].shape)):
            m = p.shape[2]
            return float(self.tt - 2.0 * np.einsum("bii->", self.zt[:, :m]) + np.einsum("bii->", self.zz[:, :m, :m]))
        return float(self.tt - 2.0 * np.sum(p * self.zt) + np.sum(p * (self.zz @ p)))

    def relative_error(self, p: np.ndarray) -> float:
        """‖t − [y 1]·P‖ / ‖t‖."""
        return float(np.sqrt(max(self.squared_error(p), 0.0) / self.tt)) if self.tt > 0 else 0.0


def _features_by_rows(planes: np.ndarray) -> np.ndarray:
    """(n, F, L) float32 → (F, n·L) float64, converted and laid out in a single copy."""
    n, features, length = planes.shape
    out = np.empty((features, n, length))
    out[...] = planes.transpose(1, 0, 2)
    return out.reshape(features, n * length)


def as_rows(tensor: np.ndarray, channel_axis: int) -> np.ndarray:
    """(N, ..., C, ...) → (rows, C): every sample and position is one least-squares row."""
    return np.moveaxis(tensor, channel_axis, -1).reshape(-1, tensor.shape[channel_axis])


def as_planes(tensor: np.ndarray, channel_axis: int) -> np.ndarray:
    """The least-squares rows of a channels-first tensor without copying: (N, C, *spatial) → (N, C, L);
    channels-last tensors become rows (as_rows)."""
    if channel_axis == 1 and tensor.ndim > 2:
        return tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
    return as_rows(tensor, channel_axis)
