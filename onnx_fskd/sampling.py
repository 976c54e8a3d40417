"""Which output positions a point's statistics read: every s-th row and column of a conv's output map.

A 56×56 map gives 3136 least-squares rows per sample, and neighbouring positions are strongly
correlated, while a fit with F features needs a few dozen rows per feature, not thousands. Reading
every s-th row and column cuts the statistics work s²-fold (the statistics-only copy of the conv runs
with s times its strides and the teacher's tensors are sliced with step s), as long as each sample
still gives a grid of at least ``MIN_GRID`` positions, the fit samples at least ``ROWS_PER_FEATURE``
rows per feature and at least ``MIN_ROWS`` rows in all (below that the sums are cheap anyway: small
fits, like the shipped MNIST samples' 80 digits × 784 positions, keep every row). Everything else (the segments, the written model, the
verification) runs on every position. BENCHMARKS.md, "Fit cost", measures speed and accuracy of both."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from .graph import GraphIndex
from .ops.base import attribute, explicit_pads
from .points import CorrectionPoint

POSITIONS = ("auto", "all")
MAX_STRIDE = 4
MIN_GRID = 196            # a 14×14 grid per sample at least
ROWS_PER_FEATURE = 64     # over the fit samples, per feature of the solve
MIN_ROWS = 1 << 15        # over the fit samples, in all


def position_stride(option: str, point: CorrectionPoint, graph: GraphIndex, features: int, fit_samples: int) -> int:
    """s ≥ 1: the point's statistics read output positions (s·i, s·j). 1 under ``--stats-positions all``
    and for anything but a 2-D channels-first conv with explicit padding and known output size."""
    if option == "all" or point.op_type != "Conv" or point.rank != 4 or point.channel_axis != 1:
        return 1
    if not explicit_pads(graph.node_by_name[point.name]):
        return 1
    shape = graph.shapes.get(point.output)
    if shape is None or len(shape) != 4 or shape[2] is None or shape[3] is None:
        return 1
    height, width = int(shape[2]), int(shape[3])
    stride = 1
    for candidate in range(2, MAX_STRIDE + 1):
        grid = math.ceil(height / candidate) * math.ceil(width / candidate)
        if grid < MIN_GRID or fit_samples * grid < max(ROWS_PER_FEATURE * (features + 1), MIN_ROWS):
            break
        stride = candidate
    return stride


def sample_positions(tensor: np.ndarray, stride: int) -> np.ndarray:
    """Every ``stride``-th row and column of an (N, C, H, W) tensor, as a view (the tensor for 1)."""
    return tensor if stride == 1 else tensor[:, :, ::stride, ::stride]


def grid_node(tensor: str, output: str, stride: int) -> onnx.NodeProto:
    """A node writing every ``stride``-th row and column of an (N, C, H, W) float tensor: sample_positions
    inside a graph. A 1×1 MaxPool with strides s picks exactly those positions, and ORT runs it 2–3× faster
    than the equivalent Slice with steps (CPU, 64 rows: 64×56×56 at s = 4 7.6 → 3.6 ms, 128×28×28 at
    s = 2 5.2 → 1.7 ms, 64×112×112 at s = 4 28.3 → 17.4 ms)."""
    return helper.make_node("MaxPool", [tensor], [output], name=f"{output}/grid", kernel_shape=[1, 1],
                            strides=[stride, stride])


def strided_copies(nodes: list[onnx.NodeProto], outputs: list[str], stride: int, prefix: str,
                   inputs: dict[str, str] | None = None) -> list[onnx.NodeProto]:
    """Copies of a conv (first) and the per-position ops after it, node i writing ``outputs[i]`` and each
    reading its predecessor's copy (and ``inputs``' renames), named ``prefix``0, 1, …: the conv with s
    times its strides and pads unchanged, so the chain computes output positions (s·i, s·j) only."""
    renamed = dict(inputs or {})
    copies = []
    for index, (node, output) in enumerate(zip(nodes, outputs)):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}{index}"
        copy.input[:] = [renamed.get(name, name) for name in copy.input]
        renamed[node.output[0]] = output
        del copy.output[:]
        copy.output.append(output)
        if index == 0 and stride > 1:
            strides = attribute(node, "strides", [1, 1])
            kept = [a for a in copy.attribute if a.name != "strides"]
            del copy.attribute[:]
            copy.attribute.extend(kept + [helper.make_attribute("strides", [v * stride for v in strides])])
        copies.append(copy)
    return copies


# Ops that map each position to itself: one computed input, any other input a constant with no spatial extent.
_POSITIONWISE = frozenset({"Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                           "Elu", "Selu", "Softplus", "BatchNormalization", "Add", "Sub", "Mul", "Div"})


def strided_tail(nodes: list[onnx.NodeProto], target: str, stride: int,
                 constants: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto] | None:
    """``nodes`` (a sub-graph computing ``target``) with the conv that ends it run with ``stride`` times its
    strides, so that ``target`` comes on positions (s·i, s·j) only: for a reader of those positions alone
    (a 1×1 conv sampled so), the tail conv then computes 1/s² of its output instead of all of it. The conv
    may be followed by position-wise ops (``constants``: the sub-graph's initializers) whose tensors
    nothing else reads. None when ``target`` is not such a conv's output."""
    producer = {output: node for node in nodes for output in node.output}
    reads = [name for node in nodes for name in node.input]
    name = target
    while (node := producer.get(name)) is not None and node.op_type != "Conv":
        computed = [i for i in node.input if i and i not in constants]
        if node.op_type not in _POSITIONWISE or len(computed) != 1 or node.op_type != "BatchNormalization" and not all(
                _positionless(constants[i]) for i in node.input if i in constants):  # BN's are per channel
            return None
        name = computed[0]
        if reads.count(name) != 1:
            return None
    if node is None or not explicit_pads(node):
        return None
    strided = strided_copies([node], [node.output[0]], stride, node.name)[0]
    strided.name = node.name
    return [strided if other is node else other for other in nodes]


def _positionless(constant: onnx.TensorProto) -> bool:
    """Whether a constant broadcast against an (N, C, H, W) tensor is the same at every position."""
    dims = list(constant.dims)
    return int(np.prod(dims)) == 1 or len(dims) >= 3 and dims[-1] == dims[-2] == 1
