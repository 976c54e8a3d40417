"""Low-rank factorisations of one weight, as plain numpy (no graph): each is exact at full rank.

* ``conv_svd``: W (C, Cin, *k) ≈ B·A with A the k×k conv to r channels and B a 1×1 conv r → C.
* ``conv_tucker2``: HOSVD on the output and input modes: 1×1 (Cin→r1), k×k core (r1→r2), 1×1 (r2→C).
* ``conv_spatial``: W[o,i,h,w] ≈ Σ_r V[r,i,h]·H[o,r,w], a kh×1 conv (Cin→r) then a 1×kw conv (r→C);
  from the SVD of W arranged as the (Cin·kh) × (C·kw) matrix M[(i,h),(o,w)] = W[o,i,h,w].
* ``linear_svd``: an output-major (N, K) matrix ≈ B (N, r) · A (r, K).
Singular values are split evenly (√S on each side) so both factors have similar scales.

The singular vectors come from ``eigh`` of the Gram matrix of the shorter side (BLAS-3 products plus a
small symmetric eigenproblem, several times faster than a full SVD of a wide conv unfolding); the
factors are exact projections (U·Uᵀ·M), so full rank reproduces the weight to rounding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankChoice:
    ratio: float | None = None   # fraction of the full rank
    energy: float | None = None  # fraction of the squared singular values to keep

    def rank(self, matrix: np.ndarray) -> int:
        """The rank this choice gives for ``matrix`` (at least 1); only --energy needs its singular values."""
        full = min(matrix.shape)
        if self.energy is None:
            return int(min(full, max(1, math.ceil(self.ratio * full - 1e-9))))
        power = _powers(matrix.astype(np.float64))
        total = power.sum()
        if total <= 0:
            return 1
        return int(min(full, np.searchsorted(np.cumsum(power) / total, self.energy - 1e-12) + 1))


def svd_matrix(weight: np.ndarray) -> np.ndarray:
    """(C, Cin·k…): the matrix whose rank ``conv_svd`` cuts."""
    return weight.reshape(weight.shape[0], -1)


def tucker_matrices(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The input-mode (Cin, C·k…) and output-mode (C, Cin·k…) unfoldings whose ranks are r1 and r2."""
    return np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1), weight.reshape(weight.shape[0], -1)


def spatial_matrix(weight: np.ndarray) -> np.ndarray:
    """M[(i,h),(o,w)] = W[o,i,h,w], (Cin·kh, C·kw): the matrix whose rank ``conv_spatial`` cuts."""
    c, cin, kh, kw = weight.shape
    return weight.transpose(1, 2, 0, 3).reshape(cin * kh, c * kw)


def _gram_eigen(matrix: np.ndarray, left: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(squared singular values, descending; the matching left (or right) singular vectors as columns)."""
    gram = matrix @ matrix.T if left else matrix.T @ matrix
    power, vectors = np.linalg.eigh(gram)
    return np.clip(power[::-1], 0.0, None), vectors[:, ::-1]


def _powers(matrix: np.ndarray) -> np.ndarray:
    """The squared singular values, descending: eigenvalues only, of the shorter side's Gram matrix."""
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)


def _left_vectors(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The ``rank`` leading left singular vectors of ``matrix`` (m, r). A tall matrix (a 1×1 conv's
    2048×512 output unfolding) uses the small Gram: u = M·v / σ, unless some σ is ≈ 0."""
    if matrix.shape[0] > matrix.shape[1]:
        power, vectors = _gram_eigen(matrix, left=False)
        sigma = np.sqrt(power[:rank])
        if sigma[-1] > 1e-6 * max(sigma[0], 1e-300):
            return (matrix @ vectors[:, :rank]) / sigma
    return _gram_eigen(matrix)[1][:, :rank]


def _split(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """matrix (m, n) ≈ left (m, r) · right (r, n), the best rank-r approximation."""
    matrix = matrix.astype(np.float64)
    wide = matrix.shape[0] <= matrix.shape[1]
    power, vectors = _gram_eigen(matrix, left=wide)
    vectors = vectors[:, :rank]
    # √σ on each side; a floor keeps the split finite where σ ≈ 0 (the product stays the exact projection).
    root = np.sqrt(np.maximum(np.sqrt(power[:rank]), 1e-12 * max(np.sqrt(power[0]), 1e-300)))
    if wide:
        return vectors * root, (vectors.T @ matrix) / root[:, None]
    return (matrix @ vectors) / root, vectors.T * root[:, None]


def conv_svd(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(first: (r, Cin, *k), second: (C, r, 1, …))."""
    c, kernel = weight.shape[0], weight.shape[1:]
    left, right = _split(svd_matrix(weight), rank)
    return right.reshape((rank,) + kernel), left.reshape((c, rank) + (1,) * (weight.ndim - 2))


def conv_tucker2(weight: np.ndarray, r1: int, r2: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first 1×1: (r1, Cin, 1, …), core: (r2, r1, *k), last 1×1: (C, r2, 1, …))."""
    w = weight.astype(np.float64)
    c, cin = w.shape[:2]
    unfold_in, unfold_out = tucker_matrices(w)
    u_in = _left_vectors(unfold_in, r1)                                  # (Cin, r1)
    u_out = _left_vectors(unfold_out, r2)                                # (C, r2)
    kernel = w.shape[2:]
    # core[a, b] = Σ_o,i u_out[o, a]·u_in[i, b]·w[o, i]: two matrix products, not a per-element einsum.
    projected = (u_out.T @ unfold_out).reshape(r2, cin, -1)              # (r2, Cin, k)
    core = (u_in.T @ projected).reshape((r2, r1) + kernel)               # (r2, r1, *k)
    ones = (1,) * (w.ndim - 2)
    return u_in.T.reshape((r1, cin) + ones), core, u_out.reshape((c, r2) + ones)


def conv_spatial(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(vertical: (r, Cin, kh, 1), horizontal: (C, r, 1, kw)) for a 2-D conv weight (C, Cin, kh, kw)."""
    c, cin, kh, kw = weight.shape
    left, right = _split(spatial_matrix(weight), rank)
    vertical = left.T.reshape(rank, cin, kh, 1)
    horizontal = right.reshape(rank, c, kw).transpose(1, 0, 2).reshape(c, rank, 1, kw)
    return vertical, horizontal


def linear_svd(major: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(first: (r, K), second: (N, r)) for an output-major (N, K) weight."""
    left, right = _split(major, rank)
    return right, left
