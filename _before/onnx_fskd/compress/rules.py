"""How channels travel through each op kind, for the group walk in groups.py.

A rule receives the node and the ``Carrier`` it was reached from (an input or its output), records the
constants to slice, enqueues the other tensors that carry the same channels, and returns the tensors it
accounted for. Anything it cannot follow raises ``Refused`` with the node's name."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx

from ..graph import GraphIndex
from ..ops.base import attribute
from ..pairing import CHANNEL_PRESERVING, ELEMENTWISE_UNARY
from .groups import Carrier, NeedsBlocks, Refused, Tracer, is_depthwise, producer_info

Rule = Callable[[Tracer, onnx.NodeProto, Carrier], list[str]]

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}
# Ops that work per channel on NCHW-like tensors: the channel axis must be 1.
SPATIAL = {"BatchNormalization", "InstanceNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
           "GlobalMaxPool", "LpPool", "Resize", "Upsample", "Pad"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd",
          "ReduceLogSumExp", "ReduceSumSquare"}
# Per-channel constants of the unary ops: input index → axis of that constant.
_CHANNEL_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


def rule_for(node: onnx.NodeProto, graph: GraphIndex) -> tuple[Rule | None, bool]:
    """(rule, whether the node's input and output sides are visited separately)."""
    if node.domain not in ("", "ai.onnx"):
        return None, False
    if node.op_type == "MatMul" and not any(graph.is_constant(name) for name in node.input):
        return batched_matmul, False
    if node.op_type in ("Conv", "Gemm", "MatMul"):
        if is_depthwise(node, graph):
            return depthwise, False
        return linear, True
    if node.op_type in ELEMENTWISE or node.op_type == "PRelu":
        return elementwise, False
    if node.op_type in CHANNEL_PRESERVING or node.op_type in ELEMENTWISE_UNARY:
        return unary, False
    if node.op_type in REDUCE:
        return reduce, False
    if node.op_type in SOFTMAX:
        return softmax, False
    return {"Flatten": flatten, "Concat": concat, "Squeeze": squeeze, "Unsqueeze": squeeze, "Transpose": transpose,
            "Reshape": reshape, "LayerNormalization": layer_norm}.get(node.op_type), False


def _refuse_extra_outputs(t: Tracer, node: onnx.NodeProto) -> None:
    for extra in node.output[1:]:
        if extra and (t.graph.consumers.get(extra) or extra in t.graph.graph_outputs):
            raise Refused(f"{node.op_type} '{node.name}' has a second output in use ('{extra}')")


def linear(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """Reached from its output: one more producer of the group. From its input: a layer that reads the
    channels, so its weight loses the matching input slices."""
    graph = t.graph
    if c.tensor == node.output[0]:
        info = producer_info(node, graph)
        if info is None:
            raise Refused(f"{node.op_type} '{node.name}' produces these channels but its weights cannot be "
                          f"sliced (grouped, computed at run time, or a full Gemm C)")
        if c.axis != info.output_axis or not np.array_equal(np.sort(c.positions, axis=None), np.arange(info.channels)):
            raise Refused(f"only part of the outputs of {node.op_type} '{node.name}' would be pruned with these channels")
        t.add_producer(node, info, c.positions)
        return [c.tensor]
    if node.input[0] != c.tensor or c.tensor in node.input[1:]:
        raise Refused(f"{node.op_type} '{node.name}' uses these channels as a weight or bias")
    weight = graph.constant(node.input[1])
    if weight is None:
        raise Refused(f"{node.op_type} '{node.name}' has a weight computed at run time")
    if node.op_type == "Conv":
        if int(attribute(node, "group", 1)) != 1:
            raise Refused(f"grouped Conv '{node.name}' (group={attribute(node, 'group', 1)}) cannot follow channel pruning")
        if c.axis != 1:
            raise Refused(f"Conv '{node.name}' reads these channels on axis {c.axis}, not 1")
        t.cut(node, 1, 1, c.positions)
    elif node.op_type == "Gemm":
        if int(attribute(node, "transA", 0)) or c.rank != 2 or c.axis != 1:
            raise Refused(f"Gemm '{node.name}' reads these channels transposed")
        t.cut(node, 1, 1 if attribute(node, "transB", 0) else 0, c.positions)
    else:
        if weight.ndim != 2 or c.axis != c.rank - 1:
            raise Refused(f"MatMul '{node.name}' does not read these channels on its last axis")
        t.cut(node, 1, 0, c.positions)
    return [c.tensor]


def depthwise(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """Depthwise Conv: channel c in, channel c out; weights, bias and the group count shrink together."""
    if c.axis != 1 or c.tensor not in (node.input[0], node.output[0]):
        raise Refused(f"depthwise Conv '{node.name}' is reached through its weights")
    t.cut(node, 1, 0, c.positions)
    if len(node.input) > 2 and node.input[2]:
        if not t.graph.is_constant(node.input[2]):
            raise Refused(f"depthwise Conv '{node.name}' has a bias computed at run time")
        t.cut(node, 2, 0, c.positions)
    t.group.depthwise.append(node.name)
    for tensor in (node.input[0], node.output[0]):
        t.enqueue(tensor, 1, c.rank, c.positions)
    return [node.input[0], node.output[0]]


def unary(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """One data input, one output, channel j stays channel j; per-channel parameters are sliced."""
    data, out = node.input[0], node.output[0]
    if c.tensor not in (data, out) or c.tensor in node.input[1:]:
        raise Refused(f"{node.op_type} '{node.name}' takes these channels as a parameter")
    if node.op_type in SPATIAL and c.axis != 1:
        raise Refused(f"{node.op_type} '{node.name}' works on axis 1, these channels sit on axis {c.axis}")
    _refuse_extra_outputs(t, node)
    for index in _CHANNEL_PARAMS.get(node.op_type, ()):
        if index >= len(node.input) or not t.graph.is_constant(node.input[index]):
            raise Refused(f"{node.op_type} '{node.name}' has parameters computed at run time")
        t.cut(node, index, 0, c.positions)
    if node.op_type == "BatchNormalization" and c.positions.shape[1] == 1:
        gamma = t.graph.constant(node.input[1]).astype(np.float64)
        t.group.bn_gammas.append(np.abs(gamma[c.positions[:, 0]]))
    if node.op_type == "Pad":
        _check_pad(t, node, c)
    if node.op_type in ("Resize", "Upsample") and len(node.input) > 3 and node.input[3]:
        raise Refused(f"Resize '{node.name}' sets explicit output sizes, channels included")
    for tensor in (data, out):
        t.enqueue(tensor, c.axis, c.rank, c.positions)
    return [data, out]


def _check_pad(t: Tracer, node: onnx.NodeProto, c: Carrier) -> None:
    if len(node.input) > 3 and node.input[3]:
        raise Refused(f"Pad '{node.name}' uses an axes input")
    pads = t.graph.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else attribute(node, "pads", None)
    if pads is None:
        raise Refused(f"Pad '{node.name}' has pads computed at run time")
    pads = np.asarray(pads).reshape(-1)
    if pads[c.axis] != 0 or pads[c.axis + len(pads) // 2] != 0:
        raise Refused(f"Pad '{node.name}' pads the channel axis")


def elementwise(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """Add/Sub/Mul/Div/PRelu: operands broadcast; a constant with one value per channel is sliced, an
    activation that carries the channels joins the group (this is how a residual Add couples layers)."""
    out = node.output[0]
    out_rank = t.rank(out) or c.rank
    out_axis = c.axis + (out_rank - c.rank) if c.tensor != out else c.axis
    total = t.dim(c.tensor, c.axis)
    if total is None:
        raise Refused(f"{node.op_type} '{node.name}': the channel count of '{c.tensor}' is unknown")
    carried: set[str] = set()
    for index, name in enumerate(node.input):
        if not name:
            continue
        value = t.graph.constant(name)
        rank = value.ndim if value is not None else t.rank(name)
        if rank is None:
            raise Refused(f"{node.op_type} '{node.name}': the shape of '{name}' is unknown")
        axis = out_axis - (out_rank - rank)
        size = 1 if axis < 0 else (value.shape[axis] if value is not None else t.dim(name, axis))
        if size == 1:
            continue
        if size != total:
            raise Refused(f"{node.op_type} '{node.name}' broadcasts '{name}' across the channels")
        if value is not None:
            t.cut(node, index, axis, c.positions)
        else:
            t.enqueue(name, axis, rank, c.positions)
            carried.add(name)
    if node.op_type in ("Add", "Sub") and len(carried) > 1:
        t.group.residual = True
    t.enqueue(out, out_axis, out_rank, c.positions)
    return [name for name in node.input if name] + [out]


def flatten(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """Flatten(axis=1) of (N, C, H, W): channel j becomes the H·W features j·HW … j·HW+HW-1."""
    data, out = node.input[0], node.output[0]
    shape = t.graph.shapes.get(data)
    axis = int(attribute(node, "axis", 1))
    if axis != 1 or c.axis != 1 and c.tensor == data:
        raise Refused(f"Flatten '{node.name}' does not keep the channels first (axis={axis})")
    if shape is None or any(d is None for d in shape[2:]):
        raise Refused(f"Flatten '{node.name}': the spatial size of '{data}' is unknown")
    spatial = int(np.prod(shape[2:], dtype=np.int64))
    if c.tensor == data:
        expanded = (c.positions[:, :, None] * spatial + np.arange(spatial)).reshape(len(c.positions), -1)
        t.enqueue(out, 1, 2, expanded)
        return [data, out]
    width = c.positions.shape[1]
    blocks = c.positions.reshape(len(c.positions), -1, spatial) if width % spatial == 0 else None
    if blocks is None or np.any(blocks[..., 0] % spatial) or not np.array_equal(blocks, blocks[..., :1] + np.arange(spatial)):
        raise Refused(f"Flatten '{node.name}': these features do not form whole channels of '{data}'")
    t.enqueue(data, 1, len(shape), blocks[..., 0] // spatial)
    return [data, out]


def concat(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """Concat on the channel axis: the channels keep their order, shifted by the inputs before them."""
    out = node.output[0]
    axis = int(attribute(node, "axis", 0))
    axis = axis + c.rank if axis < 0 else axis
    if axis != c.axis:
        raise Refused(f"Concat '{node.name}' joins on axis {axis}, not the channel axis {c.axis}")
    sizes = [t.dim(name, axis) for name in node.input]
    if any(size is None for size in sizes):
        raise Refused(f"Concat '{node.name}': the channel count of an input is unknown")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if c.tensor == out:
        low, high = c.positions.min(), c.positions.max()
        index = int(np.searchsorted(offsets, low, side="right") - 1)
        if high >= offsets[index + 1]:
            raise Refused(f"Concat '{node.name}': these channels span several of its inputs")
        source = node.input[index]
        t.enqueue(source, axis, c.rank, c.positions - offsets[index])
        return [source, out]
    inputs = list(node.input)
    if inputs.count(c.tensor) != 1:
        raise Refused(f"Concat '{node.name}' takes '{c.tensor}' more than once")
    t.enqueue(out, axis, c.rank, c.positions + offsets[inputs.index(c.tensor)])
    return [c.tensor, out]


def _axes(t: Tracer, node: onnx.NodeProto) -> list[int] | None:
    """The ``axes`` of a Reduce*/Squeeze/Unsqueeze (attribute in old opsets, constant input in new ones)."""
    if len(node.input) > 1 and node.input[1]:
        value = t.graph.constant(node.input[1])
        return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
    axes = attribute(node, "axes", None)
    return None if axes is None else [int(a) for a in axes]


def reduce(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """A reduction over other axes (ReduceMean over H, W in an SE block or a pooling head) keeps channels;
    with keepdims=0 the channel axis moves down by the reduced axes before it."""
    data, out = node.input[0], node.output[0]
    axes = _axes(t, node)
    if c.tensor != data and c.tensor != out or c.tensor in node.input[1:]:
        raise Refused(f"{node.op_type} '{node.name}' takes these channels as its axes")
    if axes is None or not axes and int(attribute(node, "noop_with_empty_axes", 0)) == 0:
        raise Refused(f"{node.op_type} '{node.name}' may reduce or drop the channel axis")
    rank_in = t.rank(data) or c.rank
    reduced = sorted(a + rank_in if a < 0 else a for a in axes)
    keep = int(attribute(node, "keepdims", 1))
    if c.tensor == data:
        if c.axis in reduced:
            raise Refused(f"{node.op_type} '{node.name}' reduces over the channels")
        axis = c.axis if keep else c.axis - sum(a < c.axis for a in reduced)
        t.enqueue(out, axis, rank_in if keep else rank_in - len(reduced), c.positions)
    else:
        remaining = list(range(rank_in)) if keep else [a for a in range(rank_in) if a not in reduced]
        if remaining[c.axis] in reduced:
            raise Refused(f"{node.op_type} '{node.name}' reduces over the channels")
        t.enqueue(data, remaining[c.axis], rank_in, c.positions)
    return [data, out]


def squeeze(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """Squeeze/Unsqueeze of other axes: the channels only move to another axis index."""
    data, out = node.input[0], node.output[0]
    axes = _axes(t, node)
    if axes is None:
        raise Refused(f"{node.op_type} '{node.name}' has no constant axes")
    if c.tensor not in (data, out) or c.tensor in node.input[1:]:
        raise Refused(f"{node.op_type} '{node.name}' takes these channels as its axes")
    rank = c.rank + (len(axes) if (c.tensor == data) == (node.op_type == "Unsqueeze") else -len(axes))
    wide, narrow = (rank, c.rank) if rank > c.rank else (c.rank, rank)
    moved = {a + wide if a < 0 else a for a in axes}
    remaining = [i for i in range(wide) if i not in moved]  # narrow axis j is wide axis remaining[j]
    if len(remaining) != narrow:
        raise Refused(f"{node.op_type} '{node.name}' has repeated axes")
    if c.rank == wide:
        if c.axis in moved:
            raise Refused(f"{node.op_type} '{node.name}' squeezes the channel axis")
        axis = remaining.index(c.axis)
    else:
        axis = remaining[c.axis]
    other = out if c.tensor == data else data
    t.enqueue(other, axis, rank, c.positions)
    return [data, out]


def transpose(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """Transpose moves the channel axis (NHWC exports wrap every Conv in a pair of them)."""
    data, out = node.input[0], node.output[0]
    perm = attribute(node, "perm", None)
    perm = list(range(c.rank))[::-1] if perm is None else [int(p) for p in perm]
    if c.tensor == data:
        t.enqueue(out, perm.index(c.axis), c.rank, c.positions)
    else:
        t.enqueue(data, perm[c.axis], c.rank, c.positions)
    return [data, out]


def softmax(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """Softmax over another axis (attention scores carrying heads on axis 1) keeps channels apart."""
    data, out = node.input[0], node.output[0]
    opset = t.graph.opset or 13
    axis = int(attribute(node, "axis", -1 if opset >= 13 else 1))
    axis = axis + c.rank if axis < 0 else axis
    # Before opset 13 the input is coerced to 2-D at ``axis``: only axes before it stay apart.
    if c.axis == axis or opset < 13 and c.axis > axis:
        raise Refused(f"{node.op_type} '{node.name}' normalises across these channels")
    for tensor in (data, out):
        t.enqueue(tensor, c.axis, c.rank, c.positions)
    return [data, out]


def layer_norm(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """LayerNormalization couples every channel of the axes it normalises (a transformer's residual
    stream); it passes channels that sit on an axis before those."""
    data, out = node.input[0], node.output[0]
    axis = int(attribute(node, "axis", -1))
    axis = axis + c.rank if axis < 0 else axis
    if c.tensor not in (data, out) or c.axis >= axis:
        raise Refused(f"LayerNormalization '{node.name}' normalises over these channels (a residual stream: "
                      f"kept whole)")
    _refuse_extra_outputs(t, node)
    for tensor in (data, out):
        t.enqueue(tensor, c.axis, c.rank, c.positions)
    return [data, out]


def batched_matmul(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """MatMul of two activations (attention scores Q·Kᵀ, probabilities·V): channels on a batch axis (the
    heads) stay apart and tie both operands; on the row axis of A they become the output's rows, on the
    column axis of B its columns; on the shared inner axis both operands lose them (the sum gets shorter)."""
    a, b, out = node.input[0], node.input[1], node.output[0]
    ranks = {name: t.rank(name) for name in (a, b, out)}
    if None in ranks.values() or min(ranks[a], ranks[b]) < 2:
        raise Refused(f"MatMul '{node.name}': the ranks of its operands are unknown or below 2")
    ra, rb, ro = ranks[a], ranks[b], ranks[out]
    if c.tensor == out:
        axis = c.axis
        if axis == ro - 2:
            t.enqueue(a, ra - 2, ra, c.positions)
        elif axis == ro - 1:
            t.enqueue(b, rb - 1, rb, c.positions)
        else:
            _enqueue_batch(t, node, c, {a: ra, b: rb}, axis - ro)
        return [a, b, out]
    r, other, r_other = (ra, b, rb) if c.tensor == a else (rb, a, ra)
    if c.tensor == a and c.tensor == b:
        raise Refused(f"MatMul '{node.name}' multiplies a tensor by itself")
    if c.axis == r - 2 and c.tensor == a:
        t.enqueue(out, ro - 2, ro, c.positions)
    elif c.axis == r - 1 and c.tensor == b:
        t.enqueue(out, ro - 1, ro, c.positions)
    elif c.axis == r - 1:       # A's inner axis meets B's rows
        t.enqueue(other, r_other - 2, r_other, c.positions)
    elif c.axis == r - 2:       # B's rows meet A's inner axis
        t.enqueue(other, r_other - 1, r_other, c.positions)
    else:
        _enqueue_batch(t, node, c, {other: r_other, out: ro}, c.axis - r)
    return [a, b, out]


def _enqueue_batch(t: Tracer, node: onnx.NodeProto, c: Carrier, ranks: dict[str, int], from_end: int) -> None:
    """Channels on a broadcast batch axis (``from_end`` < -2 counts from the last axis) of the other tensors."""
    total = t.dim(c.tensor, c.axis)
    for name, rank in ranks.items():
        axis = rank + from_end
        if axis < 0:
            continue
        size = t.dim(name, axis)
        if size == 1:
            continue
        if size != total or size is None:
            raise Refused(f"MatMul '{node.name}': '{name}' does not carry these channels on its batch axis")
        t.enqueue(name, axis, rank, c.positions)


def reshape(t: Tracer, node: onnx.NodeProto, c: Carrier) -> list[str]:
    """A Reshape that keeps the channel axis, merges it with the axes after it (a flatten, or heads back to
    the model width: channel j → its blocks of inner positions), or splits it into (outer, inner…) (the
    head split: whole blocks become one outer index, else the group is retraced per block). The target
    shape's entry for the channel axis is rewritten for the channels that remain."""
    data, out = node.input[0], node.output[0]
    if c.tensor not in (data, out) or c.tensor == node.input[1]:
        raise Refused(f"Reshape '{node.name}' takes these channels as its shape")
    source, target = t.graph.shapes.get(data), t.graph.shapes.get(out)
    if source is None or target is None:
        raise Refused(f"Reshape '{node.name}': the shapes around it are unknown")
    prefix = 0
    while prefix < min(len(source), len(target)) and source[prefix] == target[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(source), len(target)) - prefix and source[-1 - suffix] == target[-1 - suffix]:
        suffix += 1
    middle = {data: source[prefix:len(source) - suffix], out: target[prefix:len(target) - suffix]}
    rank = {data: len(source), out: len(target)}
    other = out if c.tensor == data else data
    if c.axis < prefix:
        axis, positions = c.axis, c.positions
    elif c.axis >= rank[c.tensor] - suffix:
        axis, positions = c.axis - rank[c.tensor] + rank[other], c.positions
    else:
        mine, theirs = middle[c.tensor], middle[other]
        fine, coarse = (mine, theirs) if len(mine) > len(theirs) else (theirs, mine)
        if len(coarse) != 1 or None in fine or None in coarse or math.prod(fine) != coarse[0]:
            raise Refused(f"Reshape '{node.name}' mixes these channels with other axes")
        inner = math.prod(fine[1:])
        axis = prefix
        if c.axis != prefix:
            raise Refused(f"Reshape '{node.name}': these channels are the inner part of a split axis")
        if len(mine) > len(theirs):   # fine → coarse: each channel becomes its block of inner positions
            positions = (c.positions[:, :, None] * inner + np.arange(inner)).reshape(len(c.positions), -1)
        else:                         # coarse → fine: whole blocks become one outer index
            positions = _whole_blocks(c.positions, inner)
            if positions is None:
                raise NeedsBlocks(f"Reshape '{node.name}' splits these channels into blocks of {inner}", inner)
    out_axis, out_width = (axis, positions.shape[1]) if other == out else (c.axis, c.positions.shape[1])
    _edit_target_shape(t, node, out_axis, out_width, zero_copies=out_axis < prefix)
    t.enqueue(other, axis, rank[other], positions)
    return [data, out]


def _whole_blocks(positions: np.ndarray, inner: int) -> np.ndarray | None:
    """Outer indices when every channel's positions are whole aligned blocks of ``inner``, else None."""
    if positions.shape[1] % inner:
        return None
    blocks = positions.reshape(len(positions), -1, inner)
    if np.any(blocks[..., 0] % inner) or not np.array_equal(blocks, blocks[..., :1] + np.arange(inner)):
        return None
    return blocks[..., 0] // inner


def _edit_target_shape(t: Tracer, node: onnx.NodeProto, element: int, width: int, zero_copies: bool) -> None:
    """Record the rewrite of the target shape's ``element`` (-1 needs none; 0 copies the input's size, right
    only when the input carries the channels at the same place), found in a constant or in the constant
    piece of a Concat that assembles the shape at run time."""
    owner, index, offset = node, 1, element
    value = t.graph.constant(node.input[1])
    if value is None:
        concat_node = t.graph.producer.get(node.input[1])
        if concat_node is None or concat_node.op_type != "Concat":
            raise Refused(f"Reshape '{node.name}' computes its target shape at run time")
        for piece_index, piece in enumerate(concat_node.input):
            size = (t.graph.shapes.get(piece) or (None,))[0]
            if size is None:
                raise Refused(f"Reshape '{node.name}': its target shape has pieces of unknown size")
            if offset < size:
                value = t.graph.constant(piece)
                if value is None:
                    raise Refused(f"Reshape '{node.name}' computes the size of the channel axis at run time")
                owner, index = concat_node, piece_index
                break
            offset -= size
    entry = int(np.asarray(value).reshape(-1)[offset])
    if entry == -1 or entry == 0 and zero_copies:
        return
    if entry <= 0:
        raise Refused(f"Reshape '{node.name}' copies the channel axis size from another axis (0 in its shape)")
    t.edit_shape(owner, index, offset, width)
