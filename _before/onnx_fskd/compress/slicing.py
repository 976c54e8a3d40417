"""Cut channels out of a model's constants, once every group has decided what it keeps.

Removals are collected per (node, input) in the teacher's index space and applied in one pass, so a
constant cut by two groups (a layer reading a Concat of two groups) is cut once. A constant shared by
several nodes is cut in place when every use wants the same cut, else each cut use gets its own copy."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import FskdError
from ..graph import GraphIndex, fresh_name
from .groups import Group


class Removals:
    """Indices to remove, per (node, input index) and per activation tensor, in teacher positions."""

    def __init__(self):
        self.constants: dict[tuple[str, int], dict[int, set[int]]] = {}  # → {axis: removed}
        self.tensors: dict[str, set[int]] = {}
        self.depthwise: set[str] = set()
        self.shapes: dict[tuple[str, int], dict[int, int]] = {}  # Reshape shape constants → {element: shrink}

    def add(self, group: Group, pruned: np.ndarray) -> None:
        if len(pruned) == 0:
            return
        for edit in group.shape_edits:
            elements = self.shapes.setdefault((edit.node, edit.input_index), {})
            elements[edit.element] = elements.get(edit.element, 0) + edit.per_channel * len(pruned)
        for cut in group.slices:
            axes = self.constants.setdefault((cut.node, cut.input_index), {})
            axes.setdefault(cut.axis, set()).update(cut.positions[pruned].reshape(-1).tolist())
        for carrier in group.carriers.values():
            self.tensors.setdefault(carrier.tensor, set()).update(carrier.positions[pruned].reshape(-1).tolist())
        self.depthwise.update(group.depthwise)


def apply(model: onnx.ModelProto, removals: Removals) -> None:
    """Slice the constants of ``model`` in place (its nodes must be the ones the groups were traced on)."""
    graph = GraphIndex(model)
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.nodes:
        for index, name in enumerate(node.input):
            if name in graph.initializers:
                uses.setdefault(name, []).append((node, index))
    taken = set(graph.initializers)
    _rewrite(model, graph, uses, removals.constants, _cut, taken)
    _rewrite(model, graph, uses, removals.shapes, _shrink, taken)
    dims = {t.name: t.dims for t in model.graph.initializer}
    for name in removals.depthwise:
        node = graph.node_by_name[name]
        channels = dims[node.input[1]][0]
        for attr in node.attribute:
            if attr.name == "group":
                attr.i = channels
    _refresh_declared_shapes(model)


def _rewrite(model: onnx.ModelProto, graph: GraphIndex, uses: dict, changes: dict, change, taken: set[str]) -> None:
    """Apply ``change(value, how, name)`` to each (node, input) constant: in place when every use of the
    initializer wants the same change, else as a private copy per changed use."""
    wanted: dict[str, list] = {}
    for (node_name, index), how in changes.items():
        node = graph.node_by_name[node_name]
        wanted.setdefault(node.input[index], []).append((node, index, how))
    for name, cuts in wanted.items():
        tensor = graph.initializers[name]
        value = numpy_helper.to_array(tensor)
        same = all(how == cuts[0][2] for _, _, how in cuts)
        if same and len(cuts) == len(uses[name]):
            tensor.CopyFrom(numpy_helper.from_array(change(value, cuts[0][2], name), name))
            continue
        for node, index, how in cuts:
            private = fresh_name(f"{name}.{node.name}", taken)
            model.graph.initializer.append(numpy_helper.from_array(change(value, how, name), private))
            node.input[index] = private
        if len(cuts) == len(uses[name]):
            model.graph.initializer.remove(tensor)


def _shrink(value: np.ndarray, elements: dict[int, int], name: str) -> np.ndarray:
    """A Reshape target shape with the channel entries reduced by the pruned sizes."""
    shape = value.copy()
    flat = shape.reshape(-1)
    for element, shrink in elements.items():
        flat[element] -= shrink
        if flat[element] <= 0:
            raise FskdError(f"internal: the shape constant '{name}' would get a size {flat[element]}")
    return shape


def _cut(value: np.ndarray, axes: dict[int, set[int]], name: str) -> np.ndarray:
    for axis, removed in axes.items():
        keep = np.setdiff1d(np.arange(value.shape[axis]), np.fromiter(removed, dtype=np.int64))
        if len(keep) == 0:
            raise FskdError(f"internal: every channel of '{name}' on axis {axis} would be removed")
        value = np.take(value, keep, axis=axis)
    return np.ascontiguousarray(value)


def _refresh_declared_shapes(model: onnx.ModelProto) -> None:
    """Drop stale intermediate shapes; initializers that old exports also list as inputs get their new dims."""
    del model.graph.value_info[:]
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in dims:
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            for size in dims[value.name]:
                shape.dim.add().dim_value = size
