"""Low-rank decomposition of Conv, Gemm and MatMul layers, with the map ``fit`` reads.

Each decomposed layer becomes a short chain of the same op; the LAST op keeps the original node name
and output tensor, so it pairs with the teacher's layer and is the correction point that ``fit`` fixes.
A layer is skipped (with a note) when no applicable factorisation cuts its MACs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import FskdError, UsageError
from ..graph import GraphIndex, fresh_name
from ..normalize import normalise
from ..ops.base import attribute, explicit_pads
from ..pairing import MapEntry
from ..points import find_points
from ..shapes import infer_tensor_shapes
from .factorize import (RankChoice, conv_spatial, conv_svd, conv_tucker2, linear_svd, spatial_matrix, svd_matrix,
                        tucker_matrices)
from .result import CompressResult, LayerChange, write_map

METHODS = ("svd", "tucker2", "spatial", "auto")

Built = tuple[list[onnx.NodeProto], list[onnx.TensorProto]]


@dataclass
class Plan:
    """One way to factorise one layer; ``build`` makes its nodes and initializers."""

    method: str
    rank: str
    macs_before: int
    macs_after: int
    build: Callable[["_Namer"], Built]
    min_rank: int = 0  # the smallest rank of its factors


def check_decompose_options(rank_ratio: float | None, method: str, energy: float | None) -> RankChoice:
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if (rank_ratio is None) == (energy is None):
        raise UsageError("give exactly one of --rank-ratio and --energy")
    if rank_ratio is not None and not 0 < rank_ratio <= 1:
        raise UsageError(f"--rank-ratio must be in (0, 1] (a fraction of the full rank), got {rank_ratio}")
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy must be in (0, 1] (a fraction of the squared singular values), got {energy}")
    return RankChoice(rank_ratio, energy)


def decompose_model(model: onnx.ModelProto, rank_ratio: float | None = None, method: str = "auto",
                    energy: float | None = None, *, keep_ends: bool = True, require_saving: bool = True,
                    input_shapes: dict[str, tuple[int, ...]] | None = None) -> CompressResult:
    """Factorise every Conv (group=1), Gemm and MatMul with a constant weight. ``method`` picks the conv
    factorisation (auto: per layer the one with the fewest MACs); Gemm/MatMul always become two low-rank
    products. ``keep_ends`` leaves the layers that read a graph input or write a graph output alone, also
    through layout wrappers (Transpose, Cast, Reshape, input normalisation; they save few MACs, and a
    low-rank output layer cannot be corrected by any later point). A ``--rank-ratio`` that leaves a rank of
    1 where the layer has more is skipped: one direction cannot carry a layer. ``require_saving=False``
    keeps factorisations that do not cut MACs (for exactness checks); ``input_shapes`` fixes dynamic input
    sizes for the MAC estimates."""
    choice = check_decompose_options(rank_ratio, method, energy)
    teacher = normalise(model)
    graph = GraphIndex(teacher)
    if input_shapes:
        graph.shapes = infer_tensor_shapes(teacher, 1, input_shapes)  # replaces the cached inference
    namer = _Namer(graph)
    ends = _end_layers(graph) if keep_ends else {}
    notes: list[str] = []
    changes: list[LayerChange] = []
    replaced: dict[str, Built] = {}
    for node in graph.nodes:
        if node.name in ends:
            notes.append(f"{node.name}: kept, {ends[node.name]} (--decompose-ends factorises it too)")
            continue
        plans, reason = _plans(graph, node, method, choice)
        if reason:
            notes.append(f"{node.name}: {reason}")
        if not plans:
            continue
        best = min(plans, key=lambda plan: plan.macs_after)
        full = _full_rank(graph, node)
        if require_saving and choice.energy is None and best.min_rank == 1 < full:
            notes.append(f"{node.name}: skipped, {best.method} at rank 1 would wreck it (of full rank "
                         f"{full}); a larger --rank-ratio or --energy keeps more")
            continue
        if require_saving and best.macs_after >= best.macs_before:
            notes.append(f"{node.name}: skipped, {best.method} at {best.rank} would not cut its MACs "
                         f"({best.macs_before:,} → {best.macs_after:,})")
            continue
        replaced[node.name] = best.build(namer)
        changes.append(LayerChange(node.name, node.op_type, str(full), f"{best.method} {best.rank}",
                                   tuple(n.name for n in replaced[node.name][0])))
    if not replaced:
        raise FskdError("no layer to decompose: " + ("; ".join(notes) if notes else
                                                      "the model has no Conv, Gemm or MatMul with constant weights"))
    student = _rewrite(teacher, graph, replaced)
    entries = _map_entries(graph, student)
    write_map(student, entries)
    return CompressResult(student, entries, notes, changes, len(model.graph.node) - len(teacher.graph.node))


# Ops between a graph input or output and the first or last layer that change no learned computation.
_WRAPPERS = {"Transpose", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Softmax", "LogSoftmax",
             "Sigmoid", "Add", "Sub", "Mul", "Div"}


def _end_layers(graph: GraphIndex) -> dict[str, str]:
    """Layers (with their affine chain) that read a graph input or write a graph output, directly or
    through layout wrappers (Transpose, Cast, Reshape…, constant normalisation), and which."""
    ends = {}
    for point in find_points(graph).points:
        output = _through_wrappers(graph, point.output, forward=True)
        source = _through_wrappers(graph, point.input, forward=False)
        if output in graph.graph_outputs:
            ends[point.name] = f"it writes the graph output '{output}'"
        elif source in graph.graph_inputs:
            ends[point.name] = f"it reads the graph input '{source}'"
    return ends


def _through_wrappers(graph: GraphIndex, tensor: str, forward: bool) -> str:
    """Follow ``tensor`` through single-path wrapper nodes (their other inputs constant) to where it ends."""
    for _ in range(len(graph.nodes)):
        if forward:
            consumers = graph.consumers.get(tensor, [])
            if tensor in graph.graph_outputs or len(consumers) != 1:
                return tensor
            node = consumers[0]
        else:
            node = graph.producer.get(tensor)
            if node is None:
                return tensor
        data = [name for name in node.input if name and not graph.is_constant(name)]
        if node.op_type not in _WRAPPERS or node.domain not in ("", "ai.onnx") or len(data) != 1:
            return tensor
        tensor = node.output[0] if forward else data[0]
    return tensor


def _plans(graph: GraphIndex, node: onnx.NodeProto, method: str, choice: RankChoice) -> tuple[list[Plan], str | None]:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul"):
        return [], None
    weight = graph.constant(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return [], None if node.op_type == "MatMul" else "skipped, its weight is computed at run time"
    if node.op_type == "Conv":
        if int(attribute(node, "group", 1)) != 1:
            return [], f"skipped, grouped/depthwise Conv (group={attribute(node, 'group', 1)})"
        if len(node.input) > 2 and node.input[2] and not graph.is_constant(node.input[2]):
            return [], "skipped, its bias is computed at run time"
        return _conv_plans(graph, node, weight, method, choice)
    if weight.ndim != 2:
        return [], f"skipped, its weight has rank {weight.ndim}"
    return [_linear_plan(graph, node, weight, choice)], None


def _conv_plans(graph, node, weight, method, choice) -> tuple[list[Plan], str | None]:
    wanted = ("svd", "tucker2", "spatial") if method == "auto" else (method,)
    hw_out = _spatial(graph, node.output[0]) or 1
    hw_in = _spatial(graph, node.input[0]) or hw_out
    c, cin, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    k = math.prod(kernel)
    before = hw_out * c * cin * k
    plans, reasons = [], []
    if "svd" in wanted:
        r = choice.rank(svd_matrix(weight))
        plans.append(Plan("svd", f"r={r}", before, hw_out * r * (cin * k + c),
                          lambda namer: _conv_chain(graph, node, namer, "svd", zip(conv_svd(weight, r), ({}, None))), r))
    if "tucker2" in wanted:
        r1, r2 = (choice.rank(m) for m in tucker_matrices(weight))
        plans.append(Plan("tucker2", f"r1={r1},r2={r2}", before, hw_in * cin * r1 + hw_out * (r1 * r2 * k + r2 * c),
                          lambda namer: _conv_chain(graph, node, namer, "tucker2",
                                                    zip(conv_tucker2(weight, r1, r2), (None, {}, None))), min(r1, r2)))
    if "spatial" in wanted:
        reason = _spatial_reason(node, weight)
        if reason:
            reasons.append(reason)
        else:
            rs = choice.rank(spatial_matrix(weight))
            shape_in, shape_out = graph.shapes.get(node.input[0]), graph.shapes.get(node.output[0])
            mid = _known(shape_out, 2) * _known(shape_in, 3, _known(shape_out, 3))
            after = mid * rs * cin * kernel[0] + hw_out * c * rs * kernel[1]
            plans.append(Plan("spatial", f"r={rs}", before, after,
                              lambda namer: _conv_chain(graph, node, namer, "spatial",
                                                        zip(conv_spatial(weight, rs), _spatial_attributes(node))), rs))
    return plans, ("; ".join(reasons) if reasons and not plans else None)


def _spatial_reason(node, weight) -> str | None:
    if weight.ndim != 4 or weight.shape[2] < 2 or weight.shape[3] < 2:
        return f"skipped, spatial SVD needs a 2-D k×k kernel (this one is {'×'.join(map(str, weight.shape[2:]))})"
    if not explicit_pads(node):
        return "skipped, spatial SVD needs explicit pads (auto_pad is set)"
    return None


def _spatial_attributes(node) -> tuple[dict, dict]:
    """Split strides, pads and dilations: the vertical conv takes the H parts, the horizontal one the W parts."""
    sh, sw = attribute(node, "strides", [1, 1])
    dh, dw = attribute(node, "dilations", [1, 1])
    top, left, bottom, right = attribute(node, "pads", [0, 0, 0, 0])
    return ({"strides": [sh, 1], "dilations": [dh, 1], "pads": [top, 0, bottom, 0]},
            {"strides": [1, sw], "dilations": [1, dw], "pads": [0, left, 0, right]})


def _linear_plan(graph: GraphIndex, node: onnx.NodeProto, weight: np.ndarray, choice: RankChoice) -> Plan:
    major = weight if node.op_type == "Gemm" and attribute(node, "transB", 0) else weight.T
    n, k = major.shape
    r = choice.rank(major)
    build = _gemm_chain if node.op_type == "Gemm" else _matmul_chain
    return Plan("svd", f"r={r}", k * n, r * (k + n), lambda namer: build(graph, node, namer, *linear_svd(major, r)), r)


def _conv_chain(graph, node, namer, method, parts) -> Built:
    """Consecutive convs; a part's attrs: {} = the original conv's, None = a plain 1×1, else given ones.
    The last part takes the original bias, name and output."""
    dtype = graph.constant(node.input[1]).dtype
    bias = list(node.input[2:3]) if len(node.input) > 2 and node.input[2] else []
    original = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    parts = list(parts)
    nodes, inits, source = [], [], node.input[0]
    for index, (weight, attrs) in enumerate(parts):
        last = index == len(parts) - 1
        if attrs is None:
            attrs = {}
        elif not attrs:
            attrs = {key: value for key, value in original.items() if key != "kernel_shape"}
        weight_name = namer.tensor(f"{node.input[1]}/{method}.{index}")
        inits.append(numpy_helper.from_array(weight.astype(dtype), weight_name))
        out = node.output[0] if last else namer.tensor(f"{node.output[0]}/{method}.{index}")
        name = node.name if last else namer.node(f"{node.name}/{method}.{index}")
        nodes.append(helper.make_node("Conv", [source, weight_name] + (bias if last else []), [out], name=name,
                                      kernel_shape=list(weight.shape[2:]), **attrs))
        source = out
    return nodes, inits


def _gemm_chain(graph, node, namer, first, second) -> Built:
    dtype = graph.constant(node.input[1]).dtype
    names = [namer.tensor(f"{node.input[1]}/svd.{i}") for i in (0, 1)]
    middle = namer.tensor(f"{node.output[0]}/svd.0")
    bias = list(node.input[2:3]) if len(node.input) > 2 and node.input[2] else []
    head = helper.make_node("Gemm", [node.input[0], names[0]], [middle], name=namer.node(f"{node.name}/svd.0"),
                            transA=int(attribute(node, "transA", 0)), transB=1, alpha=float(attribute(node, "alpha", 1.0)))
    tail = helper.make_node("Gemm", [middle, names[1]] + bias, [node.output[0]], name=node.name,
                            transB=1, beta=float(attribute(node, "beta", 1.0)))
    inits = [numpy_helper.from_array(w.astype(dtype), n) for w, n in zip((first, second), names)]
    return [head, tail], inits


def _matmul_chain(graph, node, namer, first, second) -> Built:
    dtype = graph.constant(node.input[1]).dtype
    names = [namer.tensor(f"{node.input[1]}/svd.{i}") for i in (0, 1)]
    middle = namer.tensor(f"{node.output[0]}/svd.0")
    head = helper.make_node("MatMul", [node.input[0], names[0]], [middle], name=namer.node(f"{node.name}/svd.0"))
    tail = helper.make_node("MatMul", [middle, names[1]], [node.output[0]], name=node.name)
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T).astype(dtype), n) for w, n in zip((first, second), names)]
    return [head, tail], inits


def _rewrite(teacher: onnx.ModelProto, graph: GraphIndex, replaced: dict[str, Built]) -> onnx.ModelProto:
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    nodes = []
    for node in student.graph.node:
        if node.name in replaced:
            new_nodes, inits = replaced[node.name]
            nodes.extend(new_nodes)
            student.graph.initializer.extend(inits)
        else:
            nodes.append(node)
    del student.graph.node[:]
    student.graph.node.extend(nodes)
    used = {name for node in student.graph.node for name in node.input}
    unused = [t for t in student.graph.initializer if t.name not in used]
    for tensor in unused:
        student.graph.initializer.remove(tensor)
    declared = {t.name for t in unused}
    kept_inputs = [value for value in student.graph.input if value.name not in declared]
    del student.graph.input[:]
    student.graph.input.extend(kept_inputs)
    del student.graph.value_info[:]
    try:
        onnx.checker.check_model(student, full_check=True)
    except Exception as exc:  # checker and strict shape inference raise several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FskdError(f"internal: the decomposed model is not valid ({first})") from None
    return student


def _map_entries(teacher: GraphIndex, student: onnx.ModelProto) -> list[MapEntry]:
    """Each teacher point → the student node of the same name (the last op of its replacement)."""
    student_points = find_points(GraphIndex(student)).by_name()
    return [MapEntry(point.name, point.name, None) for point in find_points(teacher).points
            if point.name in student_points]


def _full_rank(graph: GraphIndex, node: onnx.NodeProto) -> int:
    weight = graph.constant(node.input[1])
    return min(weight.shape[0], int(np.prod(weight.shape[1:]))) if node.op_type == "Conv" else min(weight.shape)


def _spatial(graph: GraphIndex, tensor: str) -> int | None:
    """H·W (·D) of an NC… tensor, or None when shape inference left it unknown."""
    shape = graph.shapes.get(tensor)
    if shape is None or len(shape) < 3 or any(d is None for d in shape[2:]):
        return None
    return math.prod(shape[2:])


def _known(shape, axis: int, default: int = 1) -> int:
    return shape[axis] if shape is not None and len(shape) > axis and shape[axis] is not None else default


class _Namer:
    """Fresh node and tensor names that collide with nothing in the graph."""

    def __init__(self, graph: GraphIndex):
        self.nodes = {n.name for n in graph.nodes}
        self.tensors = set(graph.initializers) | {o for n in graph.nodes for o in n.output} | set(graph.graph_inputs)

    def node(self, name: str) -> str:
        return fresh_name(name, self.nodes)

    def tensor(self, name: str) -> str:
        return fresh_name(name, self.tensors)
