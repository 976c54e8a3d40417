"""A read-only index over an ONNX graph: producers, consumers, constants and shapes."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import onnx
from onnx import numpy_helper

from .shapes import infer_tensor_shapes


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
        return infer_tensor_shapes(self.model)

    @cached_property
    def opset(self) -> int | None:
        """The default (ai.onnx) domain's opset version, or None when the model imports none."""
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), None)

    def per_sample(self, tensor: str) -> int | None:
        """Elements per sample of a tensor, when shape inference knows all of its dimensions past the batch."""
        shape = self.shapes.get(tensor)
        if shape is None or any(d is None for d in shape[1:]):
            return None
        return int(np.prod(shape[1:], dtype=np.int64))

    def largest_per_sample(self) -> int:
        """Elements per sample of the model's largest node output that shape inference sizes (0: none)."""
        return max((self.per_sample(name) or 0 for node in self.nodes for name in node.output if name), default=0)

    def known_per_sample(self, tensors: list[str]) -> int:
        """Elements per sample of the tensors together, counting those shape inference does not size as 0."""
        return sum(self.per_sample(name) or 0 for name in tensors)

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


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``… — the first not in ``taken``, which it then joins."""
    candidate, suffix = base, 1
    while candidate in taken:
        suffix += 1
        candidate = f"{base}_{suffix}"
    taken.add(candidate)
    return candidate
