"""A read-only index over an ONNX graph: producers, consumers, constants and shapes."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import onnx
from onnx import numpy_helper


class GraphIndex:
    """Lookups the pipeline needs repeatedly; built once per model (onnx has no such index itself)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.nodes = list(self.graph.node)
        self.node_by_name = {n.name: n for n in self.nodes}
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = [v.name for v in self.graph.input if v.name not in self.initializers]
        self.graph_outputs = [v.name for v in self.graph.output]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer, or None when the tensor is computed at run time."""
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def consumer_count(self, name: str) -> int:
        return len(self.consumers.get(name, [])) + (name in self.graph_outputs)

    @cached_property
    def shapes(self) -> dict[str, tuple[int | None, ...]]:
        """Tensor shapes from onnx shape inference (symbolic dimensions as None)."""
        inferred = onnx.shape_inference.infer_shapes(_without_weights(self.model))
        shapes = {}
        for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tensor_type = value.type.tensor_type
            if tensor_type.HasField("shape"):
                shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                           for d in tensor_type.shape.dim)
        for name, tensor in self.initializers.items():
            shapes[name] = tuple(tensor.dims)
        return shapes

    def ancestors(self, tensor: str) -> set[str]:
        """Names of all nodes the tensor depends on."""
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(i for i in node.input if i)
        return seen


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference only needs initializer shapes; dropping their bytes keeps it under protobuf's 2 GB limit."""
    light = onnx.ModelProto()
    light.CopyFrom(model) if model.ByteSize() < 2**30 else _copy_without_raw(model, light)
    return light


def _copy_without_raw(model: onnx.ModelProto, light: onnx.ModelProto) -> None:
    graph = model.graph
    saved = list(graph.initializer)
    del graph.initializer[:]
    light.CopyFrom(model)
    graph.initializer.extend(saved)
    for tensor in saved:
        stub = light.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        # A stub of the right shape: shape inference reads dims, not values.
        stub.data_location = onnx.TensorProto.DEFAULT
        stub.raw_data = b""
