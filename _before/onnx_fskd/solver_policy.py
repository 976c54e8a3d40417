"""Which solver each point gets under ``--solver auto``: a policy the point loop asks, kept apart
from the solvers themselves (correct.py).

``full`` refits the op's whole weight from its input patches; its statistics cost about F/C_out times
the layer's own forward pass (F = C_in·k² patch features) and its Gram takes F² floats. ``q`` costs
C_out/F of the layer. On the shipped MNIST samples ``full`` wins at every point (BENCHMARKS.md,
"Past the linear limit"), so ``auto`` takes ``full`` wherever that cost stays within a small multiple
of the layer, the Gram stays small and the samples determine the weights (with fewer than 4 rows per
feature ``full`` overfits: a Gemm after Flatten fitted on 48 samples ended further from the teacher on
held-out samples than the student), and ``q`` for the rest."""

from __future__ import annotations

from .features import full_refit_blocker
from .graph import GraphIndex
from .points import CorrectionPoint

SOLVERS = ("q", "full", "auto")
FULL_MAX_COST_RATIO = 16.0   # full's statistics at most this many times the layer's forward pass
FULL_MAX_FEATURES = 4608     # a 3×3 conv over 512 channels: a 170 MB float64 Gram
FULL_MIN_ROWS_PER_FEATURE = 4  # fewer rows (samples × output positions) per feature: full overfits


def choose_solver(option: str, point: CorrectionPoint, graph: GraphIndex, fit_samples: int) -> str:
    """``option`` itself for q/full; for auto, full where its statistics are cheap enough and the fit
    samples give enough rows to determine its C_out × F weights, else q."""
    if option != "auto":
        return option
    if full_refit_blocker(point, graph) is not None:
        return "q"
    features = patch_features(point, graph)
    if features > FULL_MAX_FEATURES or features > FULL_MAX_COST_RATIO * point.channels:
        return "q"
    if fit_samples * output_positions(point, graph) < FULL_MIN_ROWS_PER_FEATURE * features:
        return "q"
    return "full"


def output_positions(point: CorrectionPoint, graph: GraphIndex) -> int:
    """Rows each sample gives the point's statistics: its output size apart from batch and channels."""
    shape = graph.shapes.get(point.output) or ()
    positions = 1
    for axis, dim in enumerate(shape):
        if axis not in (0, point.channel_axis) and dim is not None:
            positions *= int(dim)
    return positions


def patch_features(point: CorrectionPoint, graph: GraphIndex) -> int:
    """F: the width of one input row of the full solver (C_in·kh·kw for a Conv, the input width else)."""
    weight = graph.constant(point.weight)
    major = point.op.to_output_major(graph.node_by_name[point.name], weight)
    size = 1
    for dim in major.shape[1:]:
        size *= int(dim)
    return size
