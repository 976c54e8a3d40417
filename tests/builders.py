"""Small ONNX graphs built with onnx.helper for the tests, and ways to compress them without metadata."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnx 1.23 would write IR 14, which onnxruntime refuses
OPSET = 17


class NetBuilder:
    """Appends named nodes and initializers; tensor names follow the node names."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, name: str, inputs: list[str], **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, name: str, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = True) -> str:
        w = self.rng.normal(0, np.sqrt(2.0 / (cin // group * k * k)), (cout, cin // group, k, k))
        inputs = [x, self.const(f"{name}.w", w)] + ([self.const(f"{name}.b", self.rng.normal(0, 0.1, cout))] if bias else [])
        return self.node("Conv", name, inputs, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2, group=group)

    def bn(self, name: str, x: str, c: int) -> str:
        params = [self.rng.uniform(0.5, 1.5, c), self.rng.normal(0, 0.1, c), self.rng.normal(0, 0.1, c), self.rng.uniform(0.5, 1.5, c)]
        names = [self.const(f"{name}.{p}", v) for p, v in zip(("scale", "bias", "mean", "var"), params)]
        return self.node("BatchNormalization", name, [x] + names, epsilon=1e-5)

    def conv_bn_relu(self, name: str, x: str, cin: int, cout: int, **kw) -> str:
        return self.node("Relu", f"{name}.relu", [self.bn(f"{name}.bn", self.conv(name, x, cin, cout, **kw), cout)])

    def gemm(self, name: str, x: str, cin: int, cout: int, trans_b: int = 1) -> str:
        w = self.rng.normal(0, np.sqrt(2.0 / cin), (cout, cin))
        return self.node("Gemm", name, [x, self.const(f"{name}.w", w if trans_b else w.T),
                                        self.const(f"{name}.b", self.rng.normal(0, 0.1, cout))], transB=trans_b)

    def model(self, output: str, input_shape: tuple, out_dims: int, name: str = "net") -> onnx.ModelProto:
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_dims])
        assert self.nodes[-1].output[0] == output, "the output must be the last node's"
        self.nodes[-1].output[0] = "logits"
        graph = helper.make_graph(self.nodes, name, [x], [y], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
        onnx.checker.check_model(model)
        return model


def vgg_net(seed: int = 0) -> onnx.ModelProto:
    """conv-BN-ReLU ×4 with MaxPool, Flatten → Gemm → ReLU → Gemm."""
    b = NetBuilder(seed)
    x = b.conv_bn_relu("c1", "input", 3, 16)
    x = b.node("MaxPool", "p1", [b.conv_bn_relu("c2", x, 16, 16)], kernel_shape=[2, 2], strides=[2, 2])
    x = b.conv_bn_relu("c3", x, 16, 32)
    x = b.node("MaxPool", "p2", [b.conv_bn_relu("c4", x, 32, 32)], kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Flatten", "flat", [x], axis=1)
    x = b.node("Relu", "f1.relu", [b.gemm("f1", x, 32 * 4 * 4, 48)])
    return b.model(b.gemm("f2", x, 48, 10, trans_b=0), (3, 16, 16), 10, "vgg")


def resnet_net(seed: int = 0) -> onnx.ModelProto:
    """Stem, an identity block, a projection block (stride 2), GlobalAveragePool → Gemm."""
    b = NetBuilder(seed)
    stem = b.conv_bn_relu("stem", "input", 3, 16)
    h = b.conv_bn_relu("b1.c1", stem, 16, 16)
    h = b.bn("b1.c2.bn", b.conv("b1.c2", h, 16, 16), 16)
    x = b.node("Relu", "b1.relu", [b.node("Add", "b1.add", [h, stem])])
    h = b.conv_bn_relu("b2.c1", x, 16, 32, stride=2)
    h = b.bn("b2.c2.bn", b.conv("b2.c2", h, 32, 32), 32)
    skip = b.bn("b2.proj.bn", b.conv("b2.proj", x, 16, 32, k=1, stride=2), 32)
    x = b.node("Relu", "b2.relu", [b.node("Add", "b2.add", [h, skip])])
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    return b.model(b.gemm("fc", x, 32, 10), (3, 16, 16), 10, "resnet")


def decomposed_bn_net(seed: int = 0) -> onnx.ModelProto:
    """Convs without bias followed by BN spelled out as constant Mul and Add, as some exporters emit it,
    and a Gemm followed by a real BatchNormalization."""
    b = NetBuilder(seed)
    x = "input"
    for name, cin, cout in (("c1", 3, 8), ("c2", 8, 16)):
        y = b.conv(name, x, cin, cout, bias=False)
        y = b.node("Mul", f"{name}.mul", [y, b.const(f"{name}.s", b.rng.uniform(0.5, 1.5, (cout, 1, 1)))])
        y = b.node("Add", f"{name}.add", [y, b.const(f"{name}.t", b.rng.normal(0, 0.1, (1, cout, 1, 1)))])
        x = b.node("Relu", f"{name}.relu", [y])
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    x = b.node("Relu", "f1.relu", [b.bn("f1.bn", b.gemm("f1", x, 16, 24), 24)])
    return b.model(b.gemm("f2", x, 24, 10), (3, 10, 10), 10, "decomposed_bn")


def mobile_net(seed: int = 0) -> onnx.ModelProto:
    """Depthwise-separable and grouped convs."""
    b = NetBuilder(seed)
    x = b.conv_bn_relu("stem", "input", 3, 16)
    x = b.conv_bn_relu("dw1", x, 16, 16, group=16)
    x = b.conv_bn_relu("pw1", x, 16, 32, k=1)
    x = b.conv_bn_relu("gc1", x, 32, 32, group=4)
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    return b.model(b.gemm("fc", x, 32, 10), (3, 12, 12), 10, "mobile")


def matmul_mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul + Add bias + ReLU layers, the form transformer-style exporters emit."""
    b = NetBuilder(seed)
    x = "input"
    for i, (cin, cout) in enumerate([(20, 64), (64, 64), (64, 10)]):
        w = b.rng.normal(0, np.sqrt(2.0 / cin), (cin, cout))
        x = b.node("MatMul", f"m{i}", [x, b.const(f"m{i}.w", w)])
        x = b.node("Add", f"m{i}.add", [x, b.const(f"m{i}.b", b.rng.normal(0, 0.1, cout))])
        if i < 2:
            x = b.node("Relu", f"m{i}.relu", [x])
    return b.model(x, (20,), 10, "mlp")


def token_mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul layers over a (N, tokens, features) input, as transformer MLP blocks are exported."""
    b = NetBuilder(seed)
    x = "input"
    for i, (cin, cout) in enumerate([(12, 32), (32, 16)]):
        w = b.rng.normal(0, np.sqrt(2.0 / cin), (cin, cout))
        x = b.node("MatMul", f"t{i}", [x, b.const(f"t{i}.w", w)])
        x = b.node("Add", f"t{i}.add", [x, b.const(f"t{i}.b", b.rng.normal(0, 0.1, cout))])
        x = b.node("Relu", f"t{i}.relu", [x])
    x = b.node("ReduceMean", "pool", [x], axes=[1], keepdims=0)
    w = b.rng.normal(0, np.sqrt(1.0 / 16), (16, 10))
    return b.model(b.node("MatMul", "head", [x, b.const("head.w", w)]), (6, 12), 10, "tokens")


def prune_by_slicing(model: onnx.ModelProto, keep: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A channel-pruned student the way another tool would make it (no metadata): for each layer in
    ``keep`` slice its output channels (weights, bias, following BN) and the next layer's inputs.

    ``keep`` maps a layer name to kept output channels; ``consumers`` of each layer are found by the
    naming convention of NetBuilder (the next conv/gemm in graph order)."""
    student = onnx.ModelProto()
    student.CopyFrom(model)
    inits = {t.name: t for t in student.graph.initializer}

    def sliced(name: str, index: np.ndarray, axis: int) -> None:
        value = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(numpy_helper.from_array(np.take(value, index, axis=axis), name))

    layers = [n for n in student.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    for position, node in enumerate(layers):
        if node.name not in keep:
            continue
        kept = np.asarray(keep[node.name])
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        out_axis = 1 if node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b) else 0
        sliced(node.input[1], kept, out_axis)
        for extra in list(node.input[2:]) + [f"{node.name}.bn.{p}" for p in ("scale", "bias", "mean", "var")] + [f"{node.name}.b"]:
            if extra in inits and numpy_helper.to_array(inits[extra]).shape[0] != len(kept):
                sliced(extra, kept, 0)
        follower = layers[position + 1]
        f_trans = any(a.name == "transB" and a.i == 1 for a in follower.attribute)
        in_axis = 1 if follower.op_type == "Conv" or (follower.op_type == "Gemm" and f_trans) else 0
        weight = numpy_helper.to_array(inits[follower.input[1]])
        fan_in = weight.shape[in_axis]
        teacher_out = [t for t in model.graph.initializer if t.name == node.input[1]][0].dims[out_axis]
        spatial = fan_in // teacher_out
        index = (kept[:, None] * spatial + np.arange(spatial)).reshape(-1)
        sliced(follower.input[1], index, in_axis)
    return student


def random_inputs(model: onnx.ModelProto, count: int, seed: int = 1) -> dict[str, np.ndarray]:
    value = model.graph.input[0]
    shape = [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
    return {value.name: np.random.default_rng(seed).normal(size=(count, *shape)).astype(np.float32)}
