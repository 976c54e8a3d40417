"""ImageNet-size nets with random weights, built with onnx.helper, for the benchmarks."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
OPSET = 17


class _Net:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op, name, inputs, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv_bn(self, name, x, cin, cout, k, stride=1, group=1, relu=True):
        w = self.rng.normal(0, np.sqrt(2.0 / (cin // group * k * k)), (cout, cin // group, k, k))
        y = self.node("Conv", name, [x, self.const(f"{name}.w", w)], kernel_shape=[k, k], pads=[k // 2] * 4,
                      strides=[stride] * 2, group=group)
        bn = [self.rng.uniform(0.5, 1.0, cout), self.rng.normal(0, 0.05, cout), self.rng.normal(0, 0.05, cout),
              self.rng.uniform(0.8, 1.2, cout)]
        y = self.node("BatchNormalization", f"{name}.bn", [y] + [self.const(f"{name}.bn.{i}", v) for i, v in enumerate(bn)])
        return self.node("Relu", f"{name}.relu", [y]) if relu else y

    def model(self, out, classes, name):
        self.nodes[-1].output[0] = "logits"
        graph = helper.make_graph(self.nodes, name,
                                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def resnet18(seed: int = 0, classes: int = 1000) -> onnx.ModelProto:
    """ResNet-18 topology (basic blocks, projection shortcuts, BN) at 224×224."""
    n = _Net(seed)
    x = n.conv_bn("stem", "input", 3, 64, 7, stride=2)
    x = n.node("MaxPool", "pool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"s{stage}b{block}"
            h = n.conv_bn(f"{name}.c1", x, cin, cout, 3, stride)
            h = n.conv_bn(f"{name}.c2", h, cout, cout, 3, relu=False)
            skip = n.conv_bn(f"{name}.proj", x, cin, cout, 1, stride, relu=False) if (stride != 1 or cin != cout) else x
            x = n.node("Relu", f"{name}.relu", [n.node("Add", f"{name}.add", [h, skip])])
            cin = cout
    x = n.node("Flatten", "flat", [n.node("GlobalAveragePool", "gap", [x])], axis=1)
    w = n.rng.normal(0, np.sqrt(1.0 / cin), (classes, cin))
    n.node("Gemm", "fc", [x, n.const("fc.w", w), n.const("fc.b", np.zeros(classes))], transB=1)
    return n.model("fc", classes, "resnet18")


def mobilenet_v2ish(seed: int = 0, classes: int = 1000) -> onnx.ModelProto:
    """Inverted residual blocks (1×1 expand, 3×3 depthwise, 1×1 project) at 224×224."""
    n = _Net(seed)
    x = n.conv_bn("stem", "input", 3, 32, 3, stride=2)
    cin = 32
    for index, (expand, cout, stride) in enumerate([(1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1),
                                                    (6, 64, 2), (6, 64, 1), (6, 96, 1), (6, 160, 2), (6, 320, 1)]):
        name = f"ir{index}"
        hidden = cin * expand
        h = n.conv_bn(f"{name}.expand", x, cin, hidden, 1) if expand != 1 else x
        h = n.conv_bn(f"{name}.dw", h, hidden, hidden, 3, stride, group=hidden)
        h = n.conv_bn(f"{name}.project", h, hidden, cout, 1, relu=False)
        x = n.node("Add", f"{name}.add", [h, x]) if stride == 1 and cin == cout else h
        cin = cout
    x = n.conv_bn("head", x, cin, 1280, 1)
    x = n.node("Flatten", "flat", [n.node("GlobalAveragePool", "gap", [x])], axis=1)
    w = n.rng.normal(0, np.sqrt(1.0 / 1280), (classes, 1280))
    n.node("Gemm", "fc", [x, n.const("fc.w", w), n.const("fc.b", np.zeros(classes))], transB=1)
    return n.model("fc", classes, "mobilenet")


def perturbed(model: onnx.ModelProto, scale: float = 0.2, seed: int = 1) -> onnx.ModelProto:
    """Same graph, noisy weights: a stand-in student with the teacher's cost."""
    student = onnx.ModelProto()
    student.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for tensor in student.graph.initializer:
        if tensor.name.endswith(".w"):
            value = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array((value * (1 + scale * rng.normal(size=value.shape))).astype(np.float32), tensor.name))
    return student
