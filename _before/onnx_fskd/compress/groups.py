"""Dependency groups for structured channel pruning (the idea of Torch-Pruning's DepGraph, on ONNX).

A group starts at a layer whose output channels can be removed (a Conv with group=1, a Gemm, a MatMul
with a constant weight) and collects everything those channels reach: forwards through ops that keep
channels apart (BN, activations, pooling, depthwise convs, Concat, Flatten) to the layers that read them
(their input weights are sliced), and backwards from every tensor reached to where it was produced, so a
residual Add ties both of its producers into one group with one shared kept set.

Each tensor the group reaches is a ``Carrier``: ``positions[j]`` are the indices along its channel axis
that hold group channel j (several after Flatten, shifted after Concat). Each constant to cut is a
``Slice`` of the same shape. The per-op rules live in rules.py; an op no rule covers refuses the group."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import GraphIndex
from ..ops.base import attribute


class Refused(Exception):
    """The group cannot be pruned; the message names the node and why."""


@dataclass(frozen=True, eq=False)
class Carrier:
    tensor: str
    axis: int
    rank: int
    positions: np.ndarray  # (channels, m) indices along ``axis``


@dataclass(frozen=True, eq=False)
class Slice:
    node: str
    input_index: int
    axis: int
    positions: np.ndarray  # (channels, m) indices along ``axis`` of that constant


@dataclass(frozen=True, eq=False)
class ShapeEdit:
    """A Reshape target-shape constant whose ``element`` shrinks by ``per_channel`` for each pruned channel."""

    node: str
    input_index: int
    element: int
    per_channel: int


class NeedsBlocks(Refused):
    """A Reshape splits the channel axis into blocks of ``width``: the group must be traced per block (head)."""

    def __init__(self, message: str, width: int):
        super().__init__(message)
        self.width = width


@dataclass(frozen=True)
class ProducerInfo:
    """Where a layer's output channels live in its constants."""

    channels: int
    weight_index: int
    weight_axis: int
    bias: tuple[int, int] | None  # (input index, axis) of a per-channel bias, if any
    output_axis: int


@dataclass
class Group:
    root: str
    channels: int
    producers: list[str] = field(default_factory=list)
    slices: list[Slice] = field(default_factory=list)
    carriers: dict[str, Carrier] = field(default_factory=dict)
    depthwise: list[str] = field(default_factory=list)
    bn_gammas: list[np.ndarray] = field(default_factory=list)
    refused: str | None = None
    residual: bool = False  # an Add/Sub sums two tensors carrying these channels (a residual connection)
    unit: int = 1  # root output channels per group channel: 1, or the head size when heads are pruned
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    producer_positions: dict[str, np.ndarray] = field(default_factory=dict)  # producer → (channels, m) rows

    @property
    def heads(self) -> bool:
        """Whether the group's channels are attention heads (blocks of ``unit`` channels)."""
        return self.unit > 1


def producer_info(node: onnx.NodeProto, graph: GraphIndex) -> ProducerInfo | None:
    """How to cut the output channels of ``node``, or None when it is not a prunable layer."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    weight = graph.constant(node.input[1])
    if weight is None or graph.is_constant(node.input[0]):
        return None
    if node.op_type == "Conv":
        if int(attribute(node, "group", 1)) != 1:
            return None
        bias = None
        if len(node.input) > 2 and node.input[2]:
            if not graph.is_constant(node.input[2]):
                return None
            bias = (2, 0)
        return ProducerInfo(weight.shape[0], 1, 0, bias, 1)
    if node.op_type == "Gemm":
        if weight.ndim != 2:
            return None
        trans_b = bool(attribute(node, "transB", 0))
        channels = weight.shape[0 if trans_b else 1]
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = graph.constant(node.input[2])
            if c is None:
                return None
            if c.ndim >= 1 and c.shape[-1] == channels and c.size == channels and channels > 1:
                bias = (2, c.ndim - 1)
            elif c.size != 1:
                return None  # a full C matrix
        return ProducerInfo(channels, 1, 0 if trans_b else 1, bias, 1)
    if node.op_type == "MatMul":
        if weight.ndim != 2:
            return None
        rank = len(graph.shapes.get(node.output[0], ())) or 2
        return ProducerInfo(weight.shape[1], 1, 1, None, rank - 1)
    return None


def is_depthwise(node: onnx.NodeProto, graph: GraphIndex) -> bool:
    """A Conv whose every output channel reads its own input channel (group = C_in = C_out)."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return False
    weight = graph.constant(node.input[1]) if len(node.input) > 1 else None
    groups = int(attribute(node, "group", 1))
    return weight is not None and groups > 1 and weight.shape[0] == groups and weight.shape[1] == 1


class Tracer:
    """Builds the group of one root layer by a breadth-first walk over the tensors its channels reach."""

    def __init__(self, graph: GraphIndex, root: onnx.NodeProto, unit: int = 1):
        from .rules import rule_for  # rules import Tracer's types

        self._rule_for = rule_for
        self.graph = graph
        info = producer_info(root, graph)
        self.group = Group(root.name, info.channels // unit, unit=unit)
        self.queue: deque[Carrier] = deque()
        self.done: dict[object, set[str]] = {}

    # --- helpers the rules call -------------------------------------------------------------------
    def rank(self, tensor: str) -> int | None:
        shape = self.graph.shapes.get(tensor)
        return None if shape is None else len(shape)

    def dim(self, tensor: str, axis: int) -> int | None:
        shape = self.graph.shapes.get(tensor)
        if shape is None or not 0 <= axis < len(shape):
            return None
        return shape[axis]

    def enqueue(self, tensor: str, axis: int, rank: int, positions: np.ndarray) -> None:
        self.queue.append(Carrier(tensor, axis, rank, positions))

    def cut(self, node: onnx.NodeProto, index: int, axis: int, positions: np.ndarray) -> None:
        self.group.slices.append(Slice(node.name, index, axis, positions))

    def edit_shape(self, node: onnx.NodeProto, index: int, element: int, per_channel: int) -> None:
        self.group.shape_edits.append(ShapeEdit(node.name, index, element, per_channel))

    def add_producer(self, node: onnx.NodeProto, info: ProducerInfo, positions: np.ndarray) -> None:
        self.group.producers.append(node.name)
        self.group.producer_positions[node.name] = positions
        self.cut(node, info.weight_index, info.weight_axis, positions)
        if info.bias is not None:
            self.cut(node, info.bias[0], info.bias[1], positions)

    # --- the walk ---------------------------------------------------------------------------------
    def trace(self) -> Group:
        try:
            return self.trace_or_raise()
        except Refused as exc:
            self.group.refused = str(exc)
        return self.group

    def trace_or_raise(self) -> Group:
        """The walk; a Refused (or NeedsBlocks, for a head split met per channel) propagates."""
        root = self.graph.node_by_name[self.group.root]
        # The root is visited from its output like any other producer of the group.
        info = producer_info(root, self.graph)
        rank = len(self.graph.shapes.get(root.output[0], ())) or info.output_axis + 1
        self.enqueue(root.output[0], info.output_axis, rank, np.arange(info.channels).reshape(-1, self.group.unit))
        while self.queue:
            self._step(self.queue.popleft())
        return self.group

    def _step(self, carrier: Carrier) -> None:
        seen = self.group.carriers.get(carrier.tensor)
        if seen is not None:
            if seen.axis != carrier.axis or not np.array_equal(seen.positions, carrier.positions):
                raise Refused(f"tensor '{carrier.tensor}' would carry these channels at two different places")
            return
        self.group.carriers[carrier.tensor] = carrier
        if carrier.tensor in self.graph.graph_outputs:
            raise Refused(f"its channels reach the graph output '{carrier.tensor}', which must not change")
        producer = self.graph.producer.get(carrier.tensor)
        if producer is None:
            raise Refused(f"its channels are tied to the graph input '{carrier.tensor}', which must not change")
        self._visit(producer, carrier)
        for consumer in self.graph.consumers.get(carrier.tensor, []):
            self._visit(consumer, carrier)

    def _visit(self, node: onnx.NodeProto, carrier: Carrier) -> None:
        rule, per_tensor = self._rule_for(node, self.graph)
        key = (node.name, carrier.tensor) if per_tensor else node.name
        if key in self.done:
            if carrier.tensor in self.done[key]:
                return
            raise Refused(f"{node.op_type} '{node.name}' combines these channels along two paths")
        if rule is None:
            raise Refused(f"{node.op_type} '{node.name}' is an op the channel grouping cannot follow")
        self.done[key] = set(rule(self, node, carrier)) | {carrier.tensor}


def trace_group(graph: GraphIndex, root: onnx.NodeProto) -> Group:
    """The group of ``root``'s output channels; per head when a Reshape splits them into heads."""
    tracer = Tracer(graph, root)
    try:
        return tracer.trace_or_raise()
    except NeedsBlocks as split:
        channels = producer_info(root, graph).channels
        if channels % split.width or channels == split.width:
            tracer.group.refused = str(split)
            return tracer.group
        return Tracer(graph, root, split.width).trace()
    except Refused as exc:
        tracer.group.refused = str(exc)
        return tracer.group


def find_groups(graph: GraphIndex) -> list[Group]:
    """One group per set of layers whose output channels must be pruned together, in graph order."""
    claimed: set[str] = set()
    groups = []
    for node in graph.nodes:
        if node.name in claimed or producer_info(node, graph) is None:
            continue
        group = trace_group(graph, node)
        claimed.update(group.producers or [node.name])
        groups.append(group)
    return groups
