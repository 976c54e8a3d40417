"""Conv: Q mixes output channels; grouped and depthwise convs take a block-diagonal / diagonal Q."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from ..graph import GraphIndex
from .base import LinearOp, attribute


class ConvOp(LinearOp):
    op_type = "Conv"
    channel_axis = 1

    def weight_name(self, node, graph: GraphIndex):
        return node.input[1] if graph.is_constant(node.input[1]) else None

    def unsupported_reason(self, node, graph):
        if len(node.input) > 2 and node.input[2] and not graph.is_constant(node.input[2]):
            return "its bias is computed at run time"
        return None

    def to_output_major(self, node, weight):
        return weight

    def from_output_major(self, node, weight):
        return weight

    def groups(self, node):
        return int(attribute(node, "group", 1))

    def bias_slot(self, node):
        return 2

    def explicit_q(self, name, source, target, q, d, rank, group=1):
        """``group`` > 1: ``q`` is the (C, C/group) kernel of a grouped 1×1 conv, Q's diagonal blocks stacked."""
        kernel = q.reshape(q.shape + (1,) * (rank - 2)).astype(np.float32)
        inits = [numpy_helper.from_array(kernel, f"{name}/Q"), numpy_helper.from_array(d.astype(np.float32), f"{name}/d")]
        node = helper.make_node("Conv", [source, f"{name}/Q", f"{name}/d"], [target], name=f"{name}/explicit_Q",
                                group=group)
        return [node], inits


