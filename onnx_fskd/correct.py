"""Fit one point: accumulate statistics, solve, apply the held-out guard.

Two solvers share the same statistics machinery:
- ``q`` (the paper's FSKD): a C×C map Q (block-diagonal for grouped convs) and bias d after the op;
- ``full``: a ridge refit of the op's whole weight from its input patches, shrunk towards the current
  weights. Still merge-only (no node added) and much more expressive than Q·W; its statistics cost
  about k²·C_in/C_out times those of Q. Points it cannot take (grouped convs, a scale before the bias
  slot) use Q."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .features import full_refit_blocker, point_features
from .fuse import WeightUpdate, adapter_update, bias_slot, chain_scale, mergeable
from .graph import GraphIndex
from .pairing import PointPair
from .points import CorrectionPoint
from .report import PointReport
from .solve import Adapter, solve_adapter, solve_weights
from .sampling import sample_positions
from .stats import GramStats, MappedGramStats, as_planes, as_rows

# A correction must cut the held-out error by this fraction to be kept; float noise alone never passes.
MIN_GAIN = 1e-3
# Below this relative error the student already matches (float32 noise): there is nothing to fit.
NOISE_FLOOR = 1e-5
_FEATURE_BYTES = 1 << 27  # bound on one chunk of im2col patches (float64)
Stats = GramStats | MappedGramStats  # a point's sums: in its output's coordinates, or its input's


@dataclass(frozen=True)
class FitSettings:
    ridge: float
    batch_size: int


Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


@dataclass(eq=False)
class PointFit:
    """The outcome at one point: the weights to merge (None if rejected), the explicit adapter when the
    Q solver was used, and ``correct(allocate)``, which computes the point's corrected output for the
    next points (sequential mode only; the caller drops it afterwards, with the activations it holds).
    ``judged`` is the candidate the guard scored, fitted on the fit samples only: the kept ``update`` is
    refitted on all samples, so only ``judged`` has an honest held-out error."""

    update: WeightUpdate | None
    adapter: Adapter | None
    correct: Callable[[Allocate], np.ndarray] | None
    report: PointReport
    judged: WeightUpdate | None = None


@dataclass(frozen=True)
class Rows:
    """The samples used to fit and to judge: two contiguous ranges (the samples are ordered so), so
    that every chunk is a view rather than a copy."""

    fit: slice
    held: slice


def _accumulate(stats_pair: tuple[GramStats, GramStats], rows: Rows, chunk: int, make) -> None:
    for stats, part in zip(stats_pair, (rows.fit, rows.held)):
        for start in range(part.start, part.stop, chunk):
            features, target = make(slice(start, min(start + chunk, part.stop)))
            stats.add(features, target)


def _guard(fit_stats: Stats, held_stats: Stats, current: np.ndarray, candidate: np.ndarray) -> tuple[float, float, bool]:
    judge = held_stats if held_stats.rows else fit_stats
    before, after = judge.relative_error(current), judge.relative_error(candidate)
    return before, after, before > NOISE_FLOOR and after < before * (1.0 - MIN_GAIN)


def _report(pair: PointPair, rows: int, target: str, how: str, solver: str, before: float, after: float,
            kept: bool) -> PointReport:
    s = pair.student
    return PointReport(student=s.name, teacher=pair.teacher.name, op_type=s.op_type, channels=s.channels,
                       teacher_channels=pair.teacher.channels, groups=s.groups, rows=rows, target=target,
                       channel_map=how, solver=solver, error_before=before, error_after=after,
                       status="kept" if kept else "rejected")


def fit_adapter(pair: PointPair, graph: GraphIndex, y: np.ndarray, target: np.ndarray, rows: Rows,
                settings: FitSettings, target_kind: str, how: str, stride: int = 1) -> PointFit:
    """The paper's FSKD: y ↦ Q·y + d, from the point's output on the host; the sums read every
    ``stride``-th row and column of y (``target`` is given on those positions), Q applies to all of y."""
    s = pair.student
    axis = s.channel_axis
    sampled = sample_positions(y, stride)
    stats = tuple(GramStats.empty(s.channels, blocks=s.groups) for _ in range(2))
    _accumulate(stats, rows, settings.batch_size, lambda i: (as_planes(sampled[i], axis), as_planes(target[i], axis)))
    point_fit = adapter_from_stats(pair, graph, stats, settings, target_kind, how)
    if point_fit.adapter is not None:
        final = point_fit.adapter
        point_fit.correct = lambda allocate: final.apply(y, axis, allocate(y.shape, y.dtype))
    return point_fit


def adapter_from_stats(pair: PointPair, graph: GraphIndex, stats: tuple[Stats, Stats],
                       settings: FitSettings, target_kind: str, how: str) -> PointFit:
    """Solve Q, d from the fit rows' sums, keep it if the held-out sums say it helps, then refit on all.
    No ``correct``: the caller folds the update into the weights the next segment runs."""
    s = pair.student
    fit_bias = bias_slot(s, graph) is not None
    candidate = mergeable(solve_adapter(stats[0], settings.ridge, fit_bias), s)
    before, after, kept = _guard(*stats, Adapter.identity(s.channels, s.group_size).params, candidate.params)
    report = _report(pair, stats[0].rows + stats[1].rows, target_kind, how, "q", before, after, kept)
    if not kept:
        return PointFit(None, None, None, report)
    final = mergeable(solve_adapter(stats[0] + stats[1], settings.ridge, fit_bias), s)
    return PointFit(adapter_update(s, graph, final), final, None, report, adapter_update(s, graph, candidate))


@dataclass(frozen=True)
class FullForm:
    """The full solver's view of a point: y = [x 1]·``current`` per row (x: input patches, or the input
    row of a Gemm/MatMul), through the chain's per-channel scale ``scale_after`` and offset ``offset``."""

    current: np.ndarray       # (F+1, C): [(a·W)ᵀ; (a·t + c)ᵀ]
    weight_shape: tuple[int, ...]
    scale_after: np.ndarray
    offset: np.ndarray
    fits_bias: bool

    @property
    def linear_map(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) with y = A·x + b."""
        return self.current[:-1].T, self.current[-1]

    def update(self, solution: np.ndarray) -> WeightUpdate:
        return WeightUpdate((solution[:-1] / self.scale_after[None, :]).T.reshape(self.weight_shape),
                            (solution[-1] - self.offset) / self.scale_after if self.fits_bias else None)


def full_form(point: CorrectionPoint, graph: GraphIndex) -> FullForm | None:
    """The point in the full solver's form, or None where that form does not hold (Q takes it)."""
    slot = bias_slot(point, graph)
    scale_after = slot.scale_after if slot else chain_scale(point)
    if full_refit_blocker(point, graph) is not None or not np.allclose(chain_scale(point), scale_after) \
            or np.any(np.abs(scale_after) < 1e-12 * np.abs(scale_after).max()):
        return None
    offset = slot.shift_after if slot else np.zeros(point.channels)
    node = graph.node_by_name[point.name]
    weight = point.op.to_output_major(node, graph.constant(point.weight).astype(np.float64))
    current = np.vstack([(weight.reshape(point.channels, -1) * scale_after[:, None]).T,
                         (scale_after * (slot.shift if slot else 0.0) + offset)[None, :]])
    return FullForm(current, weight.shape, scale_after, offset, slot is not None)


def weights_from_stats(pair: PointPair, form: FullForm, stats: tuple[GramStats, GramStats], settings: FitSettings,
                       target_kind: str, how: str) -> tuple[PointFit, np.ndarray | None]:
    """Refit W', t' from the fit rows' sums of [x 1] against the target, keep it if the held-out sums say
    it helps, then refit on all; also the kept solution in ``current``'s layout. No ``correct``: the
    caller folds the update into the next segment."""
    candidate = solve_weights(stats[0], form.current, settings.ridge, form.fits_bias)
    before, after, kept = _guard(*stats, form.current, candidate)
    report = _report(pair, stats[0].rows + stats[1].rows, target_kind, how, "full", before, after, kept)
    if not kept:
        return PointFit(None, None, None, report), None
    final = solve_weights(stats[0] + stats[1], form.current, settings.ridge, form.fits_bias)
    return PointFit(form.update(final), None, None, report, form.update(candidate)), final


def fit_weights(pair: PointPair, graph: GraphIndex, form: FullForm, x: np.ndarray, y: np.ndarray, target: np.ndarray,
                rows: Rows, settings: FitSettings, target_kind: str, how: str, stride: int = 1) -> PointFit:
    """Full-weight refit of the op from its input on the host (``form``: full_form of the point): y ≈
    a·(W'·x + t') + c through the chain's per-channel scale a and offset c. The sums read every
    ``stride``-th row and column of the output (``target`` is given on those positions)."""
    s = pair.student
    axis = s.channel_axis
    features = form.current.shape[0] - 1
    rows_per_sample = int(np.prod(target.shape)) // (len(target) * s.channels)
    chunk = max(1, min(settings.batch_size, _FEATURE_BYTES // (8 * rows_per_sample * (features + 1))))
    stats = tuple(GramStats.empty(features, s.channels) for _ in range(2))
    _accumulate(stats, rows, chunk,
                lambda i: (point_features(s, graph, x[i], stride), as_rows(target[i], axis)))
    point_fit, final = weights_from_stats(pair, form, stats, settings, target_kind, how)
    if final is None:
        return point_fit

    def correct(allocate: Allocate) -> np.ndarray:
        corrected = allocate(y.shape, y.dtype)
        moved = np.moveaxis(corrected, axis, -1)  # a view: filling it fills ``corrected``
        for start in range(0, len(y), chunk):
            window = slice(start, start + chunk)
            patches = point_features(s, graph, x[window])
            predicted = patches @ final[:-1].astype(np.float32) + final[-1].astype(np.float32)
            moved[window] = predicted.reshape(moved[window].shape)
        return corrected

    point_fit.correct = correct
    return point_fit
