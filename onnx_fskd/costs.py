"""Parameter and multiply-accumulate (MAC) counts per layer, from ONNX shape inference.

They show what a compression saved: a repaired student must keep the student's costs, not regain the teacher's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from .shapes import Shape, infer_tensor_shapes


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


def count_costs(model: onnx.ModelProto, batch: int = 1) -> ModelCost:
    """Count parameters and the MACs of one run, with symbolic batch dimensions taken as ``batch``.

    A node whose shapes inference cannot resolve counts 0 MACs instead of failing, so one exotic op
    does not hide the cost of every other layer.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    shapes = infer_tensor_shapes(model, batch)
    layers = []
    for index, node in enumerate(graph.node):
        params = sum(_numel(initializers[name].dims) for name in node.input if name in initializers)
        counter = _MAC_COUNTERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if counter is None and params == 0:
            continue
        macs = counter(node, shapes) if counter else 0
        name = node.name or (node.output[0] if node.output else f"{node.op_type}_{index}")
        layers.append(LayerCost(name, node.op_type, params, macs))
    total_params = sum(_numel(t.dims) for t in graph.initializer)
    return ModelCost(layers, total_params, sum(layer.macs for layer in layers))


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
