"""More small test nets for the compressors (on top of builders.py), and helpers to look inside them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from builders import NetBuilder


class Builder(NetBuilder):
    def const_int(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
        return name


def concat_net(seed: int = 0) -> onnx.ModelProto:
    """Inception/DenseNet-like: two branches concatenated, then a dense concat of the stem and a conv."""
    b = NetBuilder(seed)
    stem = b.conv_bn_relu("stem", "input", 3, 8)
    left = b.conv_bn_relu("br1", stem, 8, 6, k=1)
    right = b.conv_bn_relu("br2", stem, 8, 10)
    x = b.node("Concat", "cat1", [left, right], axis=1)                      # 16 channels
    mid = b.conv_bn_relu("mix", x, 16, 12)
    x = b.node("Concat", "cat2", [stem, mid], axis=-3)                       # 20 channels, negative axis
    x = b.conv_bn_relu("head", x, 20, 16, stride=2)
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    return b.model(b.gemm("fc", x, 16, 10), (3, 8, 8), 10, "concat")


def separable_net(seed: int = 0) -> onnx.ModelProto:
    """MobileNet-like: depthwise 3×3 + pointwise 1×1 blocks, one with stride 2 and a Clip (ReLU6)."""
    b = NetBuilder(seed)
    x = b.conv_bn_relu("stem", "input", 3, 16)
    x = b.conv_bn_relu("dw1", x, 16, 16, group=16)
    x = b.conv_bn_relu("pw1", x, 16, 24, k=1)
    x = b.bn("dw2.bn", b.conv("dw2", x, 24, 24, group=24, stride=2), 24)
    x = b.node("Clip", "dw2.relu6", [x, b.const("six.min", np.array(0.0)), b.const("six.max", np.array(6.0))])
    x = b.conv_bn_relu("pw2", x, 24, 32, k=1)
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    return b.model(b.gemm("fc", x, 32, 10), (3, 12, 12), 10, "separable")


def se_net(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV3/EfficientNet-like inverted residual: expand 1×1, depthwise, squeeze-and-excitation gate
    (ReduceMean → 1×1 → ReLU → 1×1 → Sigmoid → Mul), project 1×1, residual Add; GAP → Squeeze → Gemm."""
    b = Builder(seed)
    stem = b.conv_bn_relu("stem", "input", 3, 8)
    x = b.node("HardSwish", "expand.act", [b.bn("expand.bn", b.conv("expand", stem, 8, 24, k=1), 24)])
    x = b.conv_bn_relu("dw", x, 24, 24, group=24)
    pooled = b.node("ReduceMean", "se.pool", [x], axes=[2, 3], keepdims=1)
    gate = b.node("Relu", "se.relu", [b.conv("se.reduce", pooled, 24, 6, k=1)])
    gate = b.node("Sigmoid", "se.gate", [b.conv("se.expand", gate, 6, 24, k=1)])
    x = b.node("Mul", "se.mul", [x, gate])
    x = b.node("Add", "add", [b.bn("project.bn", b.conv("project", x, 24, 8, k=1), 8), stem])
    x = b.node("Squeeze", "squeeze", [b.node("GlobalAveragePool", "gap", [x]), b.const_int("squeeze.axes", [2, 3])])
    return b.model(b.gemm("fc", x, 8, 10), (3, 8, 8), 10, "se")


def reshape_net(seed: int = 0, extra_conv: bool = False, mixing: bool = False) -> onnx.ModelProto:
    """conv → ReLU → Reshape → Gemm. The Reshape flattens (N, 8, 6, 6) to (N, 288) with an explicit size
    the pruning must rewrite, or with ``mixing`` goes through (N, 6, 48), which splits channels apart."""
    b = Builder(seed)
    x = b.conv_bn_relu("c0", "input", 3, 8) if extra_conv else "input"
    x = b.node("Relu", "c1.relu", [b.conv("c1", x, 8 if extra_conv else 3, 8)])
    if mixing:
        x = b.node("Reshape", "mix", [x, b.const_int("mix.shape", [-1, 6, 48])])
    x = b.node("Reshape", "reshape", [x, b.const_int("shape", [-1, 8 * 6 * 6])])
    return b.model(b.gemm("fc", x, 8 * 6 * 6, 10), (3, 6, 6), 10, "reshape")


def single_gemm(seed: int = 0) -> onnx.ModelProto:
    b = NetBuilder(seed)
    return b.model(b.gemm("fc", "input", 12, 10), (12,), 10, "gemm")


def odd_conv_net(seed: int = 0) -> onnx.ModelProto:
    """Convs with strides, dilations, asymmetric pads and a 3×5 kernel, for exact decompositions."""
    b = NetBuilder(seed)
    w1 = b.const("a.w", b.rng.normal(0, 0.3, (12, 4, 3, 5)))
    x = b.node("Conv", "a", ["input", w1, b.const("a.b", b.rng.normal(0, 0.1, 12))], kernel_shape=[3, 5],
               strides=[2, 1], pads=[1, 2, 0, 1], dilations=[1, 2])
    x = b.node("Relu", "a.relu", [x])
    w2 = b.const("b.w", b.rng.normal(0, 0.3, (16, 12, 3, 3)))
    x = b.node("Conv", "b", [x, w2], kernel_shape=[3, 3], strides=[1, 2], pads=[2, 1, 1, 2], dilations=[2, 1])
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [b.node("Relu", "b.relu", [x])])], axis=1)
    return b.model(b.gemm("fc", x, 16, 10, trans_b=0), (4, 11, 13), 10, "odd")


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tensors: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run in ONNX Runtime (CPU), exposing intermediate ``tensors`` as extra outputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in tensors or []:
        if name not in present:
            exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
