"""Merge each fitted Q, d into the student's initializers: W' = Q·W and a new bias, no node added.

With a per-channel chain y = a·(W·x) + e after the op (BatchNorm, constant Mul/Add), the merge is
W' = diag(1/a)·Q·diag(a)·W and the chain's bias slot takes e' = Q·e + d, so the chain stays in place."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import FskdError
from .graph import GraphIndex, fresh_name
from .points import AffineStep, CorrectionPoint
from .solve import Adapter

_DEAD_SCALE = 1e-12  # channels the chain scales to ~0 are constant: Q cannot act through them


@dataclass(frozen=True, eq=False)
class BiasSlot:
    """Where the fitted offset goes: the op's own bias (step -1) or a chain node that adds a shift."""

    step: int
    scale_after: np.ndarray  # product of chain scales after the slot's shift
    shift_after: np.ndarray  # chain offset added after the slot
    shift: np.ndarray        # the slot's current shift, as seen at its position


def chain_scale(point: CorrectionPoint) -> np.ndarray:
    """The per-channel factor the whole chain applies to the op's output."""
    return _fold(point.chain, point.channels)[0]


def _fold(steps: tuple[AffineStep, ...], channels: int) -> tuple[np.ndarray, np.ndarray]:
    scale, shift = np.ones(channels), np.zeros(channels)
    for step in steps:
        scale, shift = scale * step.scale, shift * step.scale + step.shift
    return scale, shift


def bias_slot(point: CorrectionPoint, graph: GraphIndex) -> BiasSlot | None:
    """The op's bias when it has (or can take) one, else the first chain node that adds a shift."""
    node = graph.node_by_name[point.name]
    op = point.op
    if op.bias_slot(node) is not None:
        scale_after, shift_after = _fold(point.chain, point.channels)
        return BiasSlot(-1, scale_after, shift_after, _op_bias(point, graph) * op.bias_scale(node))
    for index, step in enumerate(point.chain):
        if step.bias_capable:
            scale_after, shift_after = _fold(point.chain[index + 1:], point.channels)
            return BiasSlot(index, scale_after, shift_after, step.shift)
    return None


def _op_bias(point: CorrectionPoint, graph: GraphIndex) -> np.ndarray:
    node = graph.node_by_name[point.name]
    slot = point.op.bias_slot(node)
    if slot is not None and len(node.input) > slot and node.input[slot]:
        return graph.constant(node.input[slot]).astype(np.float64).reshape(-1) * np.ones(point.channels)
    return np.zeros(point.channels)


def mergeable(adapter: Adapter, point: CorrectionPoint) -> Adapter:
    """Rows of Q for channels the chain kills (scale ≈ 0) cannot be merged: reset them to identity."""
    dead = np.flatnonzero(~_live(chain_scale(point)))
    if not len(dead):
        return adapter
    blocks, d = adapter.blocks.copy(), adapter.d.copy()
    size = blocks.shape[1]
    blocks[dead // size, dead % size, :] = 0.0
    blocks[dead // size, dead % size, dead % size] = 1.0
    d[dead] = 0.0
    return Adapter(blocks, d)


class ModelWriter:
    """Writes point updates in place into ``model``, the model that is written out. The points were found
    in ``analysed`` (the folded copy normalize.py reads; by default the model itself), so each of their
    tensors is traced back to what holds it in ``model``: an initializer, or a Constant node's ``value``,
    through any Identity nodes. Nodes, names, order and attributes stay as they were; the only addition
    is a new bias initializer (and input) for an op that had none."""

    def __init__(self, model: onnx.ModelProto, analysed: GraphIndex | None = None):
        self.model = model
        self.target = GraphIndex(model)
        self.graph = analysed if analysed is not None else self.target
        self.taken = set(self.target.initializers) | set(self.target.producer) | set(self.target.graph_inputs)

    def set_input(self, node: onnx.NodeProto, slot: int, value: np.ndarray, like_dtype: np.dtype) -> None:
        """Write ``value`` as the node's input ``slot``: in place where it is held, or as a new bias."""
        node = self.target.node_by_name[node.name]
        current = node.input[slot] if len(node.input) > slot else ""
        if not current:
            name = fresh_name(f"{node.name}/fskd_bias{slot}", self.taken)
            self.model.graph.initializer.append(numpy_helper.from_array(value.astype(like_dtype), name))
            while len(node.input) <= slot:
                node.input.append("")
            node.input[slot] = name
            return
        holder = tensor_holder(self.target, current)
        if holder is None:  # _analyse skips such points (unwritable_reason), so this is a bug
            raise FskdError(f"internal: input {current!r} of {node.name} cannot be written in place")
        dtype = helper.tensor_dtype_to_np_dtype(holder.data_type)
        holder.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=dtype), holder.name))


def tensor_holder(graph: GraphIndex, name: str) -> onnx.TensorProto | None:
    """The TensorProto that holds tensor ``name`` and is read by one consumer only (through Identity
    nodes): an initializer or a Constant node's ``value``. None where writing it would change another
    node too (a shared weight), or where the tensor is computed at run time."""
    while graph.consumer_count(name) == 1:
        if name in graph.initializers:
            return graph.initializers[name]
        producer = graph.producer.get(name)
        if producer is None:
            return None
        if producer.op_type == "Identity":
            name = producer.input[0]
            continue
        if producer.op_type == "Constant":
            value = [a for a in producer.attribute if a.name == "value"]
            return value[0].t if value and not value[0].t.data_location else None
        return None
    return None


def written_inputs(point: CorrectionPoint, graph: GraphIndex) -> list[tuple[str, int]]:
    """The (node, input slot) pairs the merge rewrites for this point, existing tensors only."""
    node = graph.node_by_name[point.name]
    written = [(point.name, 1)]
    slot = bias_slot(point, graph)
    if slot is None:
        return written
    if slot.step < 0:
        index = point.op.bias_slot(node)
        if len(node.input) > index and node.input[index]:
            written.append((point.name, index))
        return written
    step = point.chain[slot.step]
    chain_node = graph.node_by_name[step.node]
    if step.op_type == "BatchNormalization":
        return written + [(step.node, 2)]
    return written + [(step.node, 1 if graph.is_constant(chain_node.input[1]) else 0)]


def unwritable_reason(point: CorrectionPoint, analysed: GraphIndex, target: GraphIndex) -> str | None:
    """Why this point's merge cannot be written into ``target`` in place (None when it can)."""
    for node_name, slot in written_inputs(point, analysed):
        node = target.node_by_name.get(node_name)
        if node is None:
            return f"{node_name} is not a node of the model as loaded"
        if tensor_holder(target, node.input[slot]) is None:
            return (f"input {node.input[slot]!r} of {node_name} is shared with other nodes or computed at run "
                    f"time; rewriting it would change more than this op")
    return None


@dataclass(frozen=True, eq=False)
class WeightUpdate:
    """New parameters for one point: the output-major weight, and the bias slot's new shift (if any)."""

    weight: np.ndarray
    shift: np.ndarray | None


def adapter_update(point: CorrectionPoint, graph: GraphIndex, adapter: Adapter) -> WeightUpdate:
    """The weights that make op+chain compute Q·y + d, block by block of Q (a depthwise conv's diagonal Q
    scales its rows: no C×C matrix is formed)."""
    node = graph.node_by_name[point.name]
    count, size, _ = adapter.blocks.shape
    scale = chain_scale(point)
    safe = np.where(_live(scale), scale, 1.0)
    mixing = adapter.blocks * scale.reshape(count, 1, size) / safe.reshape(count, size, 1)
    major = point.op.to_output_major(node, graph.constant(point.weight).astype(np.float64))
    merged = np.matmul(mixing, major.reshape(count, size, -1)).reshape(major.shape)
    slot = bias_slot(point, graph)
    if slot is None:
        return WeightUpdate(merged, None)
    offset = slot.scale_after * slot.shift + slot.shift_after
    new_offset = np.matmul(adapter.blocks, offset.reshape(count, size, 1)).reshape(-1) + adapter.d
    live = _live(slot.scale_after)
    shift = np.where(live, (new_offset - slot.shift_after) / np.where(live, slot.scale_after, 1.0), slot.shift)
    return WeightUpdate(merged, shift)


def write_update(writer: ModelWriter, point: CorrectionPoint, update: WeightUpdate) -> None:
    graph = writer.graph
    node = graph.node_by_name[point.name]
    dtype = graph.constant(point.weight).dtype
    writer.set_input(node, 1, point.op.from_output_major(node, update.weight), dtype)
    if update.shift is not None:
        _write_shift(writer, point, bias_slot(point, graph), update.shift, dtype)


def _live(scale: np.ndarray) -> np.ndarray:
    return np.abs(scale) > _DEAD_SCALE * max(np.abs(scale).max(), 1.0)


def _write_shift(writer: ModelWriter, point: CorrectionPoint, slot: BiasSlot, shift: np.ndarray,
                 dtype: np.dtype) -> None:
    graph = writer.graph
    if slot.step < 0:
        node = graph.node_by_name[point.name]
        writer.set_input(node, point.op.bias_slot(node), shift / point.op.bias_scale(node), dtype)
        return
    step = point.chain[slot.step]
    node = graph.node_by_name[step.node]
    if step.op_type == "BatchNormalization":
        mean = graph.constant(node.input[3]).astype(np.float64)
        writer.set_input(node, 2, shift + step.scale * mean, graph.constant(node.input[2]).dtype)
        return
    const_index = 1 if graph.is_constant(node.input[1]) else 0
    old = graph.constant(node.input[const_index])
    value = shift if step.op_type == "Add" else -shift
    shape = [1] * point.rank
    shape[point.channel_axis] = point.channels
    keeps_rank = old.ndim >= point.rank - point.channel_axis  # the old shape already spans the channel axis
    writer.set_input(node, const_index, value.reshape(shape[-old.ndim:] if keeps_rank else shape), old.dtype)
