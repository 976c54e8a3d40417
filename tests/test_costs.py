"""MAC and parameter counts against hand computations from the layer shapes."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_fskd.costs import count_costs

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, weights) -> onnx.ModelProto:
    initializers = [numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)
                    for name, shape in weights.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


C_IN, H, W = 3, 9, 9
C1, K1, S1, P1 = 8, 3, 2, 1         # conv1: 3 -> 8, 3x3, stride 2
C2, K2, G2 = 8, 1, 4                # conv2: grouped 1x1, 4 groups
CLASSES = 10


def _conv_gemm_net() -> onnx.ModelProto:
    """conv(stride 2) -> relu -> grouped 1x1 conv -> flatten -> gemm, with a symbolic batch."""
    h1, w1 = _conv_out(H, K1, S1, P1), _conv_out(W, K1, S1, P1)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[K1, K1],
                         strides=[S1, S1], pads=[P1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", group=G2),
        helper.make_node("Flatten", ["c2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    weights = {"w1": (C1, C_IN, K1, K1), "b1": (C1,), "w2": (C2, C1 // G2, K2, K2),
               "wf": (CLASSES, C2 * h1 * w1), "bf": (CLASSES,), "unused": (5,)}
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C_IN, H, W])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])], weights)


def test_conv_gemm_net_matches_hand_count():
    model = _conv_gemm_net()
    h1, w1 = _conv_out(H, K1, S1, P1), _conv_out(W, K1, S1, P1)
    flat = C2 * h1 * w1
    # The model runs and gives the shapes the hand count assumes.
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": RNG.standard_normal((2, C_IN, H, W)).astype(np.float32)})
    assert y.shape == (2, CLASSES)

    expected = {
        "conv1": (C1 * C_IN * K1 * K1 + C1, (C1 * h1 * w1) * C_IN * K1 * K1),
        "conv2": (C2 * (C1 // G2) * K2 * K2, (C2 * h1 * w1) * (C1 // G2) * K2 * K2),
        "fc": (CLASSES * flat + CLASSES, CLASSES * flat),
    }
    cost = count_costs(model)
    assert {layer.name: (layer.params, layer.macs) for layer in cost.layers} == expected
    assert {layer.name: layer.op for layer in cost.layers} == {"conv1": "Conv", "conv2": "Conv", "fc": "Gemm"}
    assert cost.macs == sum(macs for _, macs in expected.values())
    all_weights = sum(math.prod(t.dims) for t in model.graph.initializer)
    assert cost.params == all_weights == sum(p for p, _ in expected.values()) + 5


def test_symbolic_batch_counts_as_batch():
    model = _conv_gemm_net()
    assert count_costs(model, batch=4).macs == 4 * count_costs(model).macs
    assert count_costs(model, batch=4).params == count_costs(model).params


def test_matmul_with_dynamic_and_constant_second_input():
    m, k, n, j = 5, 6, 7, 3
    nodes = [helper.make_node("MatMul", ["a", "b"], ["ab"], name="dyn"),
             helper.make_node("MatMul", ["ab", "w"], ["y"], name="const")]
    model = _model(nodes,
                   [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", m, k]),
                    helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", k, n])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m, j])], {"w": (n, j)})
    cost = count_costs(model, batch=2)
    assert {layer.name: (layer.params, layer.macs) for layer in cost.layers} == {
        "dyn": (0, 2 * m * n * k), "const": (n * j, 2 * m * j * n)}


def test_conv_transpose_counts_input_elements_times_kernel():
    c_in, c_out, size, kernel, stride = 4, 6, 5, 3, 2
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[stride, stride])]
    out = (size - 1) * stride + kernel
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, out, out])],
                   {"w": (c_in, c_out, kernel, kernel)})
    (layer,) = count_costs(model).layers
    assert layer.macs == (c_in * size * size) * c_out * kernel * kernel
    assert layer.params == c_in * c_out * kernel * kernel


def test_unknown_shapes_count_zero_macs_without_crashing():
    """A MatMul fed by a Reshape to a runtime shape has no inferable output shape."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12]),
                           helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])], {"w": (4, 2)})
    cost = count_costs(model)
    assert [(layer.name, layer.params, layer.macs) for layer in cost.layers] == [("mm", 8, 0)]
    assert cost.macs == 0 and cost.params == 8
