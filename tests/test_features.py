"""im2col patches for the full-weight solver reproduce ONNX Runtime's Conv and Gemm exactly."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import IR_VERSION, OPSET
from onnx_fskd.features import point_features
from onnx_fskd.graph import GraphIndex
from onnx_fskd.points import find_points
from onnx_fskd.runtime import make_session
from onnx_fskd.stats import as_rows


@pytest.mark.parametrize("kernel,strides,dilations,pads", [
    ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    ((3, 5), (2, 1), (1, 2), (0, 2, 1, 3)),
    ((1, 1), (2, 2), (1, 1), (0, 0, 0, 0)),
])
def test_conv_patches_match_onnxruntime(kernel, strides, dilations, pads):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(6, 4, *kernel)).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=list(kernel),
                            strides=list(strides), dilations=list(dilations), pads=list(pads))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 11, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    x = rng.normal(size=(3, 4, 11, 13)).astype(np.float32)
    expected = make_session(model, ["CPUExecutionProvider"]).run(None, {"x": x})[0]
    index = GraphIndex(model)
    point = find_points(index).points[0]
    patches = point_features(point, index, x)
    np.testing.assert_allclose(patches @ weight.reshape(6, -1).T + bias, as_rows(expected, 1), rtol=1e-4, atol=1e-4)
