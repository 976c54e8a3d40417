"""MatMul with a constant (K, N) right operand: Q mixes the N output columns. It has no bias of its
own; a following constant Add (found by the point's chain) carries the fitted bias."""

from __future__ import annotations

import numpy as np

from ..graph import GraphIndex
from .base import LinearOp
from .gemm import explicit_matmul_q


class MatMulOp(LinearOp):
    op_type = "MatMul"
    channel_axis = -1

    def weight_name(self, node, graph: GraphIndex):
        return node.input[1] if graph.is_constant(node.input[1]) else None

    def unsupported_reason(self, node, graph):
        weight = graph.constant(node.input[1])
        if weight is not None and weight.ndim != 2:
            return f"its weight has rank {weight.ndim}, not 2"
        return None

    def to_output_major(self, node, weight):
        return weight.T

    def from_output_major(self, node, weight):
        return np.ascontiguousarray(weight.T)

    def explicit_q(self, name, source, target, q, d, rank):
        return explicit_matmul_q(name, source, target, q, d)
