"""Input features of a point for the full-weight solver: the rows X such that op(x) = X·Wᵀ + b.

For a Conv these are its im2col patches (padding, strides and dilations honoured); for Gemm and
MatMul the input rows themselves. Built a few samples at a time: patches are C_in·k² wide."""

from __future__ import annotations

import numpy as np
from .graph import GraphIndex
from .ops.base import attribute
from .points import CorrectionPoint


def full_refit_blocker(point: CorrectionPoint, graph: GraphIndex) -> str | None:
    """Why the full-weight solver cannot take this point (it then uses Q), or None."""
    node = graph.node_by_name[point.name]
    if point.op_type == "Conv":
        if point.rank != 4:
            return "only 2-D convs"
        if point.groups != 1:
            return "grouped conv"
        if attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad"
    if point.op_type == "Gemm" and attribute(node, "transA", 0):
        return "transA"
    return None


def point_features(point: CorrectionPoint, graph: GraphIndex, x: np.ndarray, stride: int = 1) -> np.ndarray:
    """(rows, features) for the samples in x, rows in the order of stats.as_rows of the op's output (of
    every ``stride``-th row and column of a conv's output), features in the order of the output-major
    weight flattened per output channel."""
    if point.op_type != "Conv":
        return x.reshape(-1, x.shape[-1])
    node = graph.node_by_name[point.name]
    kh, kw = graph.shapes[point.weight][2:]
    sh, sw = attribute(node, "strides", [1, 1])
    dh, dw = attribute(node, "dilations", [1, 1])
    top, left, bottom, right = attribute(node, "pads", [0, 0, 0, 0])
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::sh * stride, ::sw * stride, ::dh, ::dw]    # (N, C, Ho, Wo, kh, kw)
    n, c, ho, wo = windows.shape[:4]
    return np.ascontiguousarray(windows.transpose(0, 2, 3, 1, 4, 5)).reshape(n * ho * wo, c * kh * kw)
