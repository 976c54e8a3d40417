"""Parameter and multiply-accumulate (MAC) counts per layer, from ONNX shape inference.

They show what a compression saved: a repaired student must keep the student's costs, not regain the teacher's.
Dynamic dimensions beyond the batch (a transformer's sequence length, an NHWC export's H and W) leave
MACs unknown: ``input_shapes`` (``--input-shapes name:dim,dim,...``) fixes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from .errors import UsageError
from .shapes import Shape, infer_tensor_shapes

InputShapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class LayerCost:
    """One node that multiplies (Conv, ConvTranspose, Gemm, MatMul) or carries initializers."""

    name: str
    op: str
    params: int
    macs: int


@dataclass(frozen=True)
class ModelCost:
    """Per-layer costs and totals; ``params`` counts every initializer once, even when layers share it."""

    layers: list[LayerCost]
    params: int
    macs: int
    batch: int = 1  # samples per run the MACs are counted for (the first input's first dimension)
    unknown: tuple[str, ...] = ()  # layers whose MACs are unknown (dynamic shapes), counted as 0

    @property
    def macs_per_sample(self) -> int:
        return self.macs // max(self.batch, 1)


def check_input_shapes(model: onnx.ModelProto, input_shapes: InputShapes | None) -> None:
    """Each named input exists, with the rank it declares and no declared size contradicted (UsageError)."""
    declared = {v.name: v for v in model.graph.input}
    initializers = {t.name for t in model.graph.initializer}
    names = [name for name in declared if name not in initializers]
    for name, dims in (input_shapes or {}).items():
        if name not in names:
            raise UsageError(f"--input-shapes: '{name}' is not an input of the model (inputs: {', '.join(names)})")
        if any(d <= 0 for d in dims):
            raise UsageError(f"--input-shapes: sizes of '{name}' must be positive, got {list(dims)}")
        shape = declared[name].type.tensor_type.shape
        if shape.dim and len(shape.dim) != len(dims):
            raise UsageError(f"--input-shapes: '{name}' has rank {len(shape.dim)}, got {len(dims)} sizes")
        for axis, (dim, size) in enumerate(zip(shape.dim, dims)):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise UsageError(f"--input-shapes: '{name}' has size {dim.dim_value} on axis {axis}, got {size}")


def count_costs(model: onnx.ModelProto, batch: int = 1, input_shapes: InputShapes | None = None) -> ModelCost:
    """Count parameters and the MACs of one run, with symbolic batch dimensions taken as ``batch`` and the
    inputs in ``input_shapes`` (validated) at those shapes.

    A node whose shapes inference cannot resolve counts 0 MACs instead of failing (listed in ``unknown``),
    so one exotic op or a dynamic sequence length does not hide the cost of every other layer.
    """
    check_input_shapes(model, input_shapes)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    shapes = infer_tensor_shapes(model, batch, input_shapes)
    layers, unknown = [], []
    for index, node in enumerate(graph.node):
        params = sum(_numel(initializers[name].dims) for name in node.input if name in initializers)
        counter = _MAC_COUNTERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if counter is None and params == 0:
            continue
        macs = counter(node, shapes) if counter else 0
        name = node.name or (node.output[0] if node.output else f"{node.op_type}_{index}")
        if counter is not None and macs == 0:
            unknown.append(name)
        layers.append(LayerCost(name, node.op_type, params, macs))
    total_params = sum(_numel(t.dims) for t in graph.initializer)
    inputs = [value.name for value in graph.input if value.name not in initializers]
    first = shapes.get(inputs[0]) if inputs else None
    runs = first[0] if first and first[0] else 1
    return ModelCost(layers, total_params, sum(layer.macs for layer in layers), runs, tuple(unknown))


def _numel(shape) -> int:
    return math.prod(shape)


def _known(shapes: dict[str, Shape], *names: str) -> list[Shape] | None:
    """The shapes of ``names``, or None when any of them (or any dimension) is unknown."""
    found = [shapes.get(name) for name in names]
    if any(shape is None or None in shape for shape in found):
        return None
    return found


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _conv_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int:
    """Each output element: C_in/groups x kernel MACs, i.e. the weight's shape after its first axis."""
    known = _known(shapes, node.output[0], node.input[1])
    return _numel(known[0]) * _numel(known[1][1:]) if known else 0


def _conv_transpose_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int:
    """Each input element is scattered through C_out/groups x kernel weights."""
    known = _known(shapes, node.input[0], node.input[1])
    return _numel(known[0]) * _numel(known[1][1:]) if known else 0


def _gemm_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int:
    """Output elements x K, with K read from B (usually a weight, so known even when inference fails)."""
    known = _known(shapes, node.output[0], node.input[1])
    if not known:
        return 0
    out, b = known
    return _numel(out) * b[1 if _attr(node, "transB", 0) else 0]


def _matmul_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int:
    """Output elements x K, K being A's last axis; B may be a weight or a computed tensor."""
    known = _known(shapes, node.output[0], node.input[0])
    return _numel(known[0]) * known[1][-1] if known and known[1] else 0


_MAC_COUNTERS: dict[str, Callable[[onnx.NodeProto, dict[str, Shape]], int]] = {
    "Conv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
}
