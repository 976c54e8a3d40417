"""Gemm (Y = alpha·A·op(B) + beta·C): Q mixes the columns of Y, i.e. the output rows of op(B)."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from ..graph import GraphIndex
from .base import LinearOp, attribute


def explicit_matmul_q(name, source, target, q, d):
    """target = source·Qᵀ + d, the explicit form for ops whose channels sit on the last axis."""
    inits = [numpy_helper.from_array(np.ascontiguousarray(q.T).astype(np.float32), f"{name}/QT"),
             numpy_helper.from_array(d.astype(np.float32), f"{name}/d")]
    nodes = [helper.make_node("MatMul", [source, f"{name}/QT"], [f"{name}/Qy"], name=f"{name}/explicit_Q"),
             helper.make_node("Add", [f"{name}/Qy", f"{name}/d"], [target], name=f"{name}/explicit_d")]
    return nodes, inits


class GemmOp(LinearOp):
    op_type = "Gemm"
    channel_axis = -1

    def weight_name(self, node, graph: GraphIndex):
        return node.input[1] if graph.is_constant(node.input[1]) else None

    def unsupported_reason(self, node, graph):
        if len(node.input) > 2 and node.input[2]:
            if not graph.is_constant(node.input[2]):
                return "its C input is computed at run time"
            if graph.constant(node.input[2]).ndim == 2 and graph.constant(node.input[2]).shape[0] != 1:
                return "its C input is a full matrix, not a per-column bias"
        if float(attribute(node, "beta", 1.0)) == 0.0:
            return "beta = 0 leaves no bias to fit"
        return None

    def _trans_b(self, node) -> bool:
        return bool(attribute(node, "transB", 0))

    def to_output_major(self, node, weight):
        return weight if self._trans_b(node) else weight.T

    def from_output_major(self, node, weight):
        return weight if self._trans_b(node) else np.ascontiguousarray(weight.T)

    def bias_slot(self, node):
        return 2

    def bias_scale(self, node):
        return float(attribute(node, "beta", 1.0))

    def explicit_q(self, name, source, target, q, d, rank):
        return explicit_matmul_q(name, source, target, q, d)
