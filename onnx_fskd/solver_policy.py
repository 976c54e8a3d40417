"""Which solver each point gets under ``--solver auto``: a policy the point loop asks, kept apart
from the solvers themselves (correct.py).

``full`` refits the op's whole weight from its input patches; its statistics cost about F/C_out times
the layer's own forward pass (F = C_in·k² patch features) and its Gram takes F² floats. ``q`` costs
C_out/F of the layer. On the shipped MNIST samples ``full`` wins at every point (BENCHMARKS.md,
"Solver per point"), so ``auto`` takes ``full`` wherever that cost stays within a small multiple of
the layer and the Gram stays small, and ``q`` for the rest (wide late layers of ImageNet-size nets)."""

from __future__ import annotations

from .features import full_refit_blocker
from .graph import GraphIndex
from .points import CorrectionPoint

SOLVERS = ("q", "full", "auto")
FULL_MAX_COST_RATIO = 16.0   # full's statistics at most this many times the layer's forward pass
FULL_MAX_FEATURES = 4608     # a 3×3 conv over 512 channels: a 170 MB float64 Gram


def choose_solver(option: str, point: CorrectionPoint, graph: GraphIndex) -> str:
    """``option`` itself for q/full; for auto, full where its statistics are cheap enough, else q."""
    if option != "auto":
        return option
    if full_refit_blocker(point, graph) is not None:
        return "q"
    features = patch_features(point, graph)
    if features > FULL_MAX_FEATURES or features > FULL_MAX_COST_RATIO * point.channels:
        return "q"
    return "full"


def patch_features(point: CorrectionPoint, graph: GraphIndex) -> int:
    """F: the width of one input row of the full solver (C_in·kh·kw for a Conv, the input width else)."""
    weight = graph.constant(point.weight)
    major = point.op.to_output_major(graph.node_by_name[point.name], weight)
    size = 1
    for dim in major.shape[1:]:
        size *= int(dim)
    return size
