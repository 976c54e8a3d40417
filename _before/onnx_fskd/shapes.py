"""Tensor shapes from onnx shape inference, run on a copy without weight bytes (fast, and fine > 2 GiB)."""

from __future__ import annotations

import math

import onnx
from onnx import helper

# Initializers up to this many elements stay in the copy given to shape inference: they are the shape and
# axes constants that Reshape or Slice need. Larger ones (weights) become inputs, so no weight bytes are copied.
_SHAPE_CONSTANT_LIMIT = 64

Shape = tuple[int | None, ...]  # None where a dimension is unknown


def infer_tensor_shapes(model: onnx.ModelProto, batch: int | None = None,
                        input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Shape]:
    """Every tensor shape inference can reach; a graph input's symbolic first dimension becomes ``batch``
    (None: stays unknown); ``input_shapes`` fixes whole input shapes (dynamic sequence lengths)."""
    shapes: dict[str, Shape] = {t.name: tuple(t.dims) for t in model.graph.initializer}
    batch_symbols = {value.type.tensor_type.shape.dim[0].dim_param for value in model.graph.input
                     if value.type.tensor_type.shape.dim} - {""}
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless_copy(model, input_shapes), data_prop=True).graph
    except Exception:  # inference refuses some graphs (unknown custom ops): keep the declared shapes
        inferred = model.graph
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        tensor_type = value.type.tensor_type
        if value.name not in shapes and tensor_type.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") else batch if d.dim_param in batch_symbols else None
                for d in tensor_type.shape.dim)
    return shapes


def weightless_copy(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """The model with its weights declared as inputs of the same shape, for fast inference at any model size
    (serialising weights beyond 2 GiB would fail); inputs named in ``input_shapes`` get those shapes."""
    graph = model.graph
    inputs = [helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type, list(input_shapes[value.name]))
              if input_shapes and value.name in input_shapes else value for value in graph.input]
    declared = {value.name for value in graph.input}
    kept = [t for t in graph.initializer
            if math.prod(t.dims) <= _SHAPE_CONSTANT_LIMIT and t.data_location != onnx.TensorProto.EXTERNAL]
    kept_names = {t.name for t in kept}
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer
               if t.name not in kept_names and t.name not in declared]
    copy = helper.make_graph(list(graph.node), graph.name, [*inputs, *weights], list(graph.output),
                             kept, value_info=list(graph.value_info))
    return helper.make_model(copy, ir_version=model.ir_version, opset_imports=list(model.opset_import),
                             functions=list(model.functions))
