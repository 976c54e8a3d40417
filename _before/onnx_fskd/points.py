"""Find correction points: linear ops with constant weights, each with the per-channel affine chain
(BatchNormalization, constant Mul/Div/Add/Sub) that follows it before any nonlinearity. Layout
wrappers of NHWC exports (a Transpose that only moves the channel axis, a Cast to float) are part of
the chain too, so the point's output is the tensor a residual Add reads.

The chain is how BatchNorm is "folded first": the fit treats op+chain as one linear map and the
merge maps Q through the chain, so the written model keeps every BN node the student had."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from .graph import GraphIndex
from .ops import LinearOp, linear_op_for
from .ops.base import attribute

log = logging.getLogger(__name__)

AFFINE_OPS = ("BatchNormalization", "Mul", "Div", "Add", "Sub")
LAYOUT_OPS = ("Transpose", "Cast")  # identity steps of a chain: they only move the channel axis or re-type


@dataclass(frozen=True, eq=False)
class AffineStep:
    """One chain node, as y = scale·x + shift per channel. ``bias_capable`` nodes can absorb a new shift."""

    node: str
    op_type: str
    scale: np.ndarray
    shift: np.ndarray

    @property
    def bias_capable(self) -> bool:
        return self.op_type in ("BatchNormalization", "Add", "Sub")

    @property
    def layout(self) -> bool:
        """A Transpose or Cast: scale 1, shift 0, only the channel axis of the tensor may move."""
        return self.op_type in LAYOUT_OPS


@dataclass(frozen=True, eq=False)
class CorrectionPoint:
    """A place where Q can sit: after ``name`` and its affine chain, acting on tensor ``output``."""

    name: str
    op_type: str
    weight: str
    input: str
    output: str
    chain: tuple[AffineStep, ...]
    channels: int
    groups: int
    rank: int
    block_end: bool = True
    residual_skip: str | None = None  # the other operand of the residual Add fed by ``output``
    output_axis: int | None = None    # channel axis of ``output`` when a Transpose in the chain moved it

    @property
    def group_size(self) -> int:
        return self.channels // self.groups

    @property
    def channel_axis(self) -> int:
        """The channel axis of ``output``."""
        if self.output_axis is not None:
            return self.output_axis
        return 1 if self.op_type == "Conv" else self.rank - 1

    def explicit_q(self, source: str, target: str, q: np.ndarray, d: np.ndarray):
        """Nodes computing target = Q·source + d on the channel axis of ``output`` (for exactness checks)."""
        op = self.op if self.output_axis is None else linear_op_for_type("MatMul")
        return op.explicit_q(self.name, source, target, q, d, self.rank)

    @property
    def op(self) -> LinearOp:
        return linear_op_for_type(self.op_type)


@dataclass
class PointSet:
    points: list[CorrectionPoint]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)

    def by_name(self) -> dict[str, CorrectionPoint]:
        return {p.name: p for p in self.points}


def linear_op_for_type(op_type: str) -> LinearOp:
    op = linear_op_for(onnx.helper.make_node(op_type, [], []))
    assert op is not None, op_type
    return op


def find_points(graph: GraphIndex) -> PointSet:
    """Every Conv, Gemm or MatMul with a constant weight, in graph order; unsupported ones are skipped."""
    found = PointSet([])
    for node in graph.nodes:
        op = linear_op_for(node)
        if op is None:
            continue
        weight_name = op.weight_name(node, graph)
        if weight_name is None:
            if node.op_type != "MatMul":  # activation x activation MatMuls are not layers
                found.skipped.append((node.name, "its weight is computed at run time"))
            continue
        reason = op.unsupported_reason(node, graph)
        if reason:
            found.skipped.append((node.name, reason))
            log.warning("skipping %s (%s): %s", node.name, node.op_type, reason)
            continue
        weight = op.to_output_major(node, graph.constant(weight_name))
        channels = weight.shape[0]
        rank = len(graph.shapes.get(node.output[0], ())) or (weight.ndim if node.op_type == "Conv" else 2)
        axis = 1 if node.op_type == "Conv" else rank - 1
        chain, output, output_axis = _affine_chain(graph, node.output[0], channels, rank, axis,
                                                   layout=op.bias_slot(node) is not None)
        found.points.append(CorrectionPoint(
            name=node.name, op_type=node.op_type, weight=weight_name, input=node.input[0], output=output,
            chain=tuple(chain), channels=channels, groups=op.groups(node), rank=rank,
            residual_skip=_residual_skip(graph, output), output_axis=None if output_axis == axis else output_axis))
    _mark_block_ends(graph, found.points)
    return found


def _affine_chain(graph: GraphIndex, tensor: str, channels: int, rank: int, axis: int, layout: bool):
    """Follow single-consumer per-channel affine nodes; stop at anything else (a nonlinearity, a fork).
    With ``layout`` (the op has its own bias slot, so the merge never reshapes a chain constant that sits
    before a Transpose), layout wrappers join the chain and the channel axis follows them."""
    chain: list[AffineStep] = []
    while graph.consumer_count(tensor) == 1 and tensor in graph.consumers:
        node = graph.consumers[tensor][0]
        moved = _layout_axis(node, axis, rank) if layout else None
        if moved is not None:
            step = AffineStep(node.name, node.op_type, np.ones(channels), np.zeros(channels))
            axis = moved
        else:
            step = _as_affine(graph, node, tensor, channels, rank, axis)
        if step is None:
            break
        chain.append(step)
        tensor = node.output[0]
    return chain, tensor, axis


def _layout_axis(node: onnx.NodeProto, axis: int, rank: int) -> int | None:
    """Where the channel axis goes through a Cast to float or a Transpose that moves only it (NCHW ↔ NHWC,
    so the order of the rows the fit reads stays the same); None for anything else."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Cast":
        return axis if attribute(node, "to", 0) == onnx.TensorProto.FLOAT else None
    if node.op_type != "Transpose":
        return None
    perm = [int(p) for p in attribute(node, "perm", list(range(rank))[::-1])]
    moved = perm.index(axis)
    others = [p for p in perm if p != axis]
    keeps_rows = len(perm) == rank >= 3 and others == sorted(others) and moved in (1, rank - 1)
    return moved if keeps_rows else None


def _as_affine(graph: GraphIndex, node, tensor: str, channels: int, rank: int, axis: int) -> AffineStep | None:
    if node.op_type not in AFFINE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    if node.op_type == "BatchNormalization":
        if axis != 1 or len(node.output) > 1 and any(node.output[1:]):
            return None
        params = [graph.constant(name) for name in node.input[1:5]]
        if any(p is None for p in params):
            return None
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + float(attribute(node, "epsilon", 1e-5)))
        return AffineStep(node.name, node.op_type, scale, beta - scale * mean)
    if node.input[0] == tensor:
        other, data_first = node.input[1], True
    else:
        other, data_first = node.input[0], False
    value = graph.constant(other)
    vector = None if value is None else _per_channel(value, channels, rank, axis)
    if vector is None:
        return None
    if node.op_type == "Mul":
        return AffineStep(node.name, "Mul", vector, zeros)
    if node.op_type == "Div" and data_first and np.all(vector != 0):
        return AffineStep(node.name, "Div", 1.0 / vector, zeros)
    if node.op_type == "Add":
        return AffineStep(node.name, "Add", ones, vector)
    if node.op_type == "Sub" and data_first:
        return AffineStep(node.name, "Sub", ones, -vector)
    return None


def _per_channel(value: np.ndarray, channels: int, rank: int, axis: int) -> np.ndarray | None:
    """The constant as a (C,) vector if it broadcasts along the channel axis only, else None."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(size != 1 for i, size in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,)).copy()


def _residual_skip(graph: GraphIndex, tensor: str) -> str | None:
    consumers = graph.consumers.get(tensor, [])
    if len(consumers) != 1 or consumers[0].op_type != "Add":
        return None
    add = consumers[0]
    other = add.input[1] if add.input[0] == tensor else add.input[0]
    return None if graph.is_constant(other) else other


def _mark_block_ends(graph: GraphIndex, points: list[CorrectionPoint]) -> None:
    """A point is interior when it sits inside a residual block (on one side only of an Add's two
    branches) without feeding that Add itself; everything else ends a block (the paper's choice)."""
    interior: set[str] = set()
    for node in graph.nodes:
        if node.op_type != "Add" or any(graph.is_constant(i) for i in node.input):
            continue
        left, right = (graph.ancestors(i) for i in node.input[:2])
        interior |= left ^ right
    for index, point in enumerate(points):
        if point.residual_skip is None and point.name in interior:
            points[index] = replace(point, block_end=False)

