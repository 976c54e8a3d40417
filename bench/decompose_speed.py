"""Time `decompose` on a ResNet-50-size graph (random weights, built with onnx.helper: 53 convs, 25.5 M
params, bottleneck blocks 3-4-6-3, 224×224) — the Tucker-2/SVD work, per method.

    nice python bench/decompose_speed.py [--method tucker2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_fskd.compress import decompose_model


def resnet50(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(name, x, cin, cout, k, stride=1):
        w = rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, kernel_shape=[k, k],
                                      pads=[k // 2] * 4, strides=[stride] * 2))
        return name

    def relu(x):
        nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"], name=f"{x}.relu"))
        return f"{x}.relu"

    x = relu(conv("stem", "input", 3, 64, 7, 2))
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="pool", kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]))
    x, cin = "pool", 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for block in range(blocks):
            p, stride = f"s{stage}.b{block}", 2 if block == 0 and stage > 0 else 1
            h = relu(conv(f"{p}.c1", x, cin, width, 1))
            h = relu(conv(f"{p}.c2", h, width, width, 3, stride))
            h = conv(f"{p}.c3", h, width, width * 4, 1)
            skip = conv(f"{p}.proj", x, cin, width * 4, 1, stride) if block == 0 else x
            nodes.append(helper.make_node("Add", [h, skip], [f"{p}.add"], name=f"{p}.add"))
            x, cin = relu(f"{p}.add"), width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    inits.extend([numpy_helper.from_array(rng.normal(0, 0.01, (1000, 2048)).astype(np.float32), "fc.w"),
                  numpy_helper.from_array(np.zeros(1000, np.float32), "fc.b")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet50", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="tucker2,svd,auto")
    parser.add_argument("--rank-ratio", type=float, default=0.5)
    args = parser.parse_args()
    model = resnet50()
    print(f"ResNet-50-size graph: {len(model.graph.node)} nodes, "
          f"{sum(np.prod(t.dims) for t in model.graph.initializer) / 1e6:.1f} M params")
    for method in args.methods.split(","):
        start = time.perf_counter()
        result = decompose_model(model, rank_ratio=args.rank_ratio, method=method)
        print(f"decompose --method {method} --rank-ratio {args.rank_ratio}: {time.perf_counter() - start:.1f} s, "
              f"{len(result.layers)} layers factorised")


if __name__ == "__main__":
    main()
