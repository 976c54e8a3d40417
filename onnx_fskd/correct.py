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
from .report import PointReport
from .solve import Adapter, solve_adapter, solve_weights
from .stats import GramStats, as_planes, as_rows

# A correction must cut the held-out error by this fraction to be kept; float noise alone never passes.
MIN_GAIN = 1e-3
# Below this relative error the student already matches (float32 noise): there is nothing to fit.
NOISE_FLOOR = 1e-5
_FEATURE_BYTES = 1 << 27  # bound on one chunk of im2col patches (float64)


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


def _guard(fit_stats: GramStats, held_stats: GramStats, current: np.ndarray, candidate: np.ndarray) -> tuple[float, float, bool]:
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
                settings: FitSettings, target_kind: str, how: str) -> PointFit:
    """The paper's FSKD: y ↦ Q·y + d, from the point's output on the host."""
    s = pair.student
    axis = s.channel_axis
    stats = tuple(GramStats.empty(s.channels, blocks=s.groups) for _ in range(2))
    _accumulate(stats, rows, settings.batch_size, lambda i: (as_planes(y[i], axis), as_planes(target[i], axis)))
    point_fit = adapter_from_stats(pair, graph, stats, settings, target_kind, how)
    if point_fit.adapter is not None:
        final = point_fit.adapter
        point_fit.correct = lambda allocate: final.apply(y, axis, allocate(y.shape, y.dtype))
    return point_fit


def adapter_from_stats(pair: PointPair, graph: GraphIndex, stats: tuple[GramStats, GramStats],
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


def fit_weights(pair: PointPair, graph: GraphIndex, x: np.ndarray, y: np.ndarray, target: np.ndarray,
                rows: Rows, settings: FitSettings, target_kind: str, how: str) -> PointFit:
    """Full-weight refit of the op: y ≈ a·(W'·x + t') + c through the chain's per-channel scale a and
    offset c; falls back to the Q solver where that form does not hold."""
    s = pair.student
    slot = bias_slot(s, graph)
    scale_after = slot.scale_after if slot else chain_scale(s)
    blocker = full_refit_blocker(s, graph)
    if blocker is None and not np.allclose(chain_scale(s), scale_after):
        blocker = "a scale before the bias"
    if blocker is None and np.any(np.abs(scale_after) < 1e-12 * np.abs(scale_after).max()):
        blocker = "channels scaled to zero"
    if blocker is not None:
        return fit_adapter(pair, graph, y, target, rows, settings, target_kind, how)
    axis = s.channel_axis
    offset = slot.shift_after if slot else np.zeros(s.channels)
    node = graph.node_by_name[s.name]
    weight = s.op.to_output_major(node, graph.constant(s.weight).astype(np.float64))
    features = int(np.prod(weight.shape[1:]))
    # P = [(a·W)ᵀ; (a·t + c)ᵀ] predicts y = [x 1]·P directly, so the target is the teacher's as is.
    current = np.vstack([(weight.reshape(s.channels, -1) * scale_after[:, None]).T,
                         (scale_after * (slot.shift if slot else 0.0) + offset)[None, :]])
    rows_per_sample = int(np.prod(y.shape)) // (len(y) * s.channels)
    chunk = max(1, min(settings.batch_size, _FEATURE_BYTES // (8 * rows_per_sample * (features + 1))))
    stats = tuple(GramStats.empty(features, s.channels) for _ in range(2))
    _accumulate(stats, rows, chunk,
                lambda i: (point_features(s, graph, x[i]), as_rows(target[i], axis)))
    candidate = solve_weights(stats[0], current, settings.ridge, slot is not None)
    before, after, kept = _guard(*stats, current, candidate)
    report = _report(pair, stats[0].rows + stats[1].rows, target_kind, how, "full", before, after, kept)
    if not kept:
        return PointFit(None, None, None, report)
    final = solve_weights(stats[0] + stats[1], current, settings.ridge, slot is not None)

    def update_from(solution: np.ndarray) -> WeightUpdate:
        return WeightUpdate((solution[:-1] / scale_after[None, :]).T.reshape(weight.shape),
                            (solution[-1] - offset) / scale_after if slot else None)

    def correct(allocate: Allocate) -> np.ndarray:
        corrected = allocate(y.shape, y.dtype)
        moved = np.moveaxis(corrected, axis, -1)  # a view: filling it fills ``corrected``
        for start in range(0, len(y), chunk):
            window = slice(start, start + chunk)
            patches = point_features(s, graph, x[window])
            predicted = patches @ final[:-1].astype(np.float32) + final[-1].astype(np.float32)
            moved[window] = predicted.reshape(moved[window].shape)
        return corrected

    return PointFit(update_from(final), None, correct, report, update_from(candidate))
