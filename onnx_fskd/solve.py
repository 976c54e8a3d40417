"""Ridge least squares: Q and d per diagonal block (grouped convs), shrunk towards Q = I; or a
point's whole weight, shrunk towards its current value."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from threadpoolctl import ThreadpoolController

from .stats import GramStats, MappedGramStats


@dataclass(frozen=True, eq=False)
class Adapter:
    """The fitted correction y ↦ Q·y + d for one point, kept as its diagonal blocks (B, g, g)."""

    blocks: np.ndarray
    d: np.ndarray

    @classmethod
    def identity(cls, channels: int, group_size: int) -> "Adapter":
        return cls(np.tile(np.eye(group_size), (channels // group_size, 1, 1)), np.zeros(channels))

    @property
    def q(self) -> np.ndarray:
        """The full C×C matrix (block-diagonal)."""
        count, size, _ = self.blocks.shape
        full = np.zeros((count * size, count * size))
        index = np.arange(count * size).reshape(count, size)
        full[index[:, :, None], index[:, None, :]] = self.blocks
        return full

    @property
    def params(self) -> np.ndarray:
        """[Qᵀ; dᵀ] per block: the adapter as least-squares parameters over [y 1], shaped (B, g+1, g)."""
        count, size, _ = self.blocks.shape
        return np.concatenate([self.blocks.transpose(0, 2, 1), self.d.reshape(count, 1, size)], axis=1)

    def apply(self, tensor: np.ndarray, channel_axis: int, out: np.ndarray | None = None) -> np.ndarray:
        """Q·y + d along the channel axis, into ``out`` if given; channels-first tensors are multiplied
        in their own layout."""
        count, size, _ = self.blocks.shape
        planes = np.moveaxis(tensor, channel_axis, 1)
        grouped = planes.reshape(planes.shape[0], count, size, -1)          # (N, B, g, L)
        dtype = tensor.dtype
        result = np.empty_like(tensor) if out is None else out
        target = np.moveaxis(result, channel_axis, 1).reshape(grouped.shape)  # a view when channels come first
        if size == 1:
            np.multiply(grouped, self.blocks.astype(dtype)[None, :, :, :1], out=target)
        else:
            np.matmul(self.blocks.astype(dtype)[None], grouped, out=target)
        target += self.d.astype(dtype).reshape(1, count, size, 1)
        if not np.shares_memory(target, result):  # channels-last tensors went through a copy
            np.moveaxis(result, channel_axis, 1)[...] = target.reshape(planes.shape)
        return result


def solve_adapter(stats: GramStats | MappedGramStats, ridge: float, fit_bias: bool = True) -> Adapter:
    """Minimise ‖T − Y·Qᵀ − d‖² + λ‖Q − I‖² per diagonal block of Q.

    λ = ridge · trace(YᵀY)/g of each block, so the strength does not depend on activation scale or row
    count. Shrinking towards I (not 0) means scarce data leaves the student as it was, and λ > 0 keeps
    the system positive definite even with fewer rows than channels."""
    if isinstance(stats, MappedGramStats):
        return _solve_mapped(stats, ridge, fit_bias)
    count, k1, size = stats.zt.shape
    keep = k1 if fit_bias else size
    gram, cross = stats.zz[:, :keep, :keep], stats.zt[:, :keep]
    lam = _strength(np.einsum("bii->bi", gram[:, :size, :size]), ridge)
    idx = np.arange(size)
    penalty = np.zeros_like(gram)
    penalty[:, idx, idx] = lam[:, None]
    prior = np.zeros_like(cross)
    prior[:, idx, idx] = lam[:, None]
    solution = _solve_spd(gram + penalty, cross + prior)  # (B, keep, g): [Qᵀ; dᵀ]
    d = solution[:, size].reshape(-1) if fit_bias else np.zeros(count * size)
    return Adapter(np.ascontiguousarray(solution[:, :size].transpose(0, 2, 1)), d)


def _solve_mapped(stats: MappedGramStats, ridge: float, fit_bias: bool) -> Adapter:
    """solve_adapter's minimiser where y = A·x + b with x narrower than y (r < C), in x's coordinates.

    With the bias fitted, d = mean(t) − Q·mean(y) and Q solves the centred normal equations
    (Q − I)(A·Cxx·Aᵀ + λI) = Cdx·Aᵀ (Cxx, Cdx: centred sums of x·xᵀ and d·xᵀ, d = t − y). Since
    (A·Cxx·Aᵀ + λI)⁻¹·A = A·(Cxx·AᵀA + λI)⁻¹, Q = I + Cdx·(λI + Cxx·AᵀA)⁻¹·Aᵀ: one r×r system with C
    right-hand sides instead of a (C+1)² one, and Q − I stays proportional to the residual. Without
    a bias the same holds for the uncentred sums of [x 1], with [A b] as the map."""
    a, b, n = stats.a, stats.b, stats.n
    lam = _strength(stats.y_squares()[None], ridge)[0]
    if fit_bias:
        mean_x, mean_d = stats.x / n, stats.d / n
        covariance = stats.xx - n * np.outer(mean_x, mean_x)
        cross = stats.xd.T - n * np.outer(mean_d, mean_x)  # (C, r)
        mapping = a
    else:
        covariance = np.block([[stats.xx, stats.x[:, None]], [stats.x[None, :], np.array([[n]])]])
        cross = np.hstack([stats.xd.T, stats.d[:, None]])
        mapping = np.hstack([a, b[:, None]])
    system = lam * np.eye(len(covariance)) + covariance @ (mapping.T @ mapping)
    gain = np.linalg.solve(system, cross.T).T  # (C, r): Q = I + gain·mappingᵀ
    q = gain @ mapping.T
    q[np.arange(len(b)), np.arange(len(b))] += 1.0
    d = mean_d - gain @ (a.T @ (a @ mean_x + b)) if fit_bias else np.zeros(len(b))
    return Adapter(q[None], d)


def _strength(diagonal: np.ndarray, ridge: float) -> np.ndarray:
    """λ per block from the diagonals (B, k) of its Gram ΣY·Yᵀ: ``ridge`` times their mean, plus a floor
    that keeps a system of all-zero inputs solvable."""
    return ridge * diagonal.mean(axis=1) + 1e-12 * (diagonal.max() + 1.0)


def solve_weights(stats: GramStats, prior: np.ndarray, ridge: float, fit_bias: bool) -> np.ndarray:
    """Full-weight refit: minimise ‖T − [X 1]·P‖² + λ‖W − W₀‖², P = [Wᵀ; bᵀ] of shape (F+1, C), shrunk
    towards the current weights W₀ (``prior``, same layout) with λ = ridge · trace(XᵀX)/F."""
    zz, zt = stats.zz[0], stats.zt[0]
    features = zz.shape[0] - 1
    size = features + 1 if fit_bias else features  # [x 1] or x: a leading block either way, so slices
    # (a fancy-indexed copy and a dense diagonal matrix cost as much as the Cholesky at F = 2304).
    diagonal = np.diagonal(zz)[:size]
    # |G_ij| <= max_i G_ii for a Gram, so the largest diagonal entry is the largest entry.
    lam = ridge * diagonal[:features].sum() / max(features, 1) + 1e-12 * (diagonal.max() + 1.0)
    lhs = zz[:size, :size].copy()
    lhs[np.arange(features), np.arange(features)] += lam
    rhs = zt[:size].copy()
    rhs[:features] += lam * prior[:features]
    solution = _solve_spd(lhs[None], rhs[None])[0]
    if fit_bias:
        return solution
    return np.vstack([solution, prior[features:]])


@functools.cache
def _blas() -> ThreadpoolController:
    """The process's BLAS libraries, looked up once: threadpoolctl's ``threadpool_limits`` scans every
    loaded library on each call (0.7–1.7 ms; a fit makes 60–100 calls). numpy's and scipy's OpenBLAS are
    both loaded by now (scipy.linalg is imported above)."""
    return ThreadpoolController()


def one_blas_thread():
    """A context in which BLAS runs on one thread: for the fit's many small host products and solves,
    which the runtime's own threads would otherwise compete with. OpenBLAS's worker threads also
    busy-wait after each multi-threaded call (2-core CPU: 0.13 s of CPU within 0.2 s of one 1500² product)
    and take a core from the runtime's next run: the ResNet-18 fit's segment runs were 30–70 ms slower
    after each point's host work than later runs of the same session, and not with one thread. The fit
    and re-selection run inside it (pipeline.py); re-selection's thousands of small greedy updates took
    2.9–3.2 s with OpenBLAS's threads and 2.35 s without (MobileNet-like net, 2 cores)."""
    return blas_threads(1)


def blas_threads(count: int):
    """A context in which BLAS runs on ``count`` threads."""
    return _blas().limit(limits=count, user_api="blas")


# From this many unknowns (the full solver's 2305- and 4609-feature 3×3 convs: 10–30 GFLOP per solve) a
# system is solved on half the cores the process may use. ResNet-18's default fit on an H100 machine
# (16 host cores): solves 13.3 s of 33 s on one thread, 4.4–4.5 s on eight. Half, not all: OpenBLAS's
# threads spin, and on a busy machine more threads than free cores made a 1281² Cholesky take 3–4 s
# instead of 0.3 s. A 2-core machine keeps one thread.
PARALLEL_SOLVE_UNKNOWNS = 2048


def solve_threads(unknowns: int) -> int:
    """BLAS threads for a system of ``unknowns`` unknowns: one, or half the usable cores for a large one."""
    if unknowns < PARALLEL_SOLVE_UNKNOWNS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def _solve_spd(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched solve of symmetric positive definite systems: Cholesky (half LU's work) for one big
    block, numpy's batched LU for many small ones; LU again if rounding broke definiteness. BLAS threads
    by solve_threads: one for the many small systems."""
    with blas_threads(solve_threads(lhs.shape[-1])):
        return _solve_spd_here(lhs, rhs)


def _solve_spd_here(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    if len(lhs) == 1:
        try:
            factor = scipy.linalg.cho_factor(lhs[0], check_finite=False)
            return scipy.linalg.cho_solve(factor, rhs[0], check_finite=False)[None]
        except np.linalg.LinAlgError:
            pass
    return np.linalg.solve(lhs, rhs)
