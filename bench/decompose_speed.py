"""Time `decompose` on a ResNet-50-size graph (random weights, built with onnx.helper: 53 convs, 25.5 M
params, bottleneck blocks 3-4-6-3, 224×224) — the Tucker-2/SVD work, per method — and, in the same run,
the Tucker-2 factorisation of ResNet-50's 3×3 conv weights the old way (two full SVDs and the per-element
``einsum`` core) against ``factorize.conv_tucker2`` (Gram eigh and two matrix products).

    nice python bench/decompose_speed.py [--methods tucker2,svd,auto] [--rank-ratio 0.5] [--skip-core]
"""

from __future__ import annotations

import argparse
import os
import time

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one BLAS thread: on a shared machine more threads only contend

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_fskd.compress import decompose_model
from onnx_fskd.compress.factorize import conv_tucker2, tucker_matrices


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


def tucker2_before(weight: np.ndarray, r1: int, r2: int) -> np.ndarray:
    """The factorisation as it was: full SVDs of both unfoldings, the core by one einsum (for comparison)."""
    w = weight.astype(np.float64)
    unfold_in, unfold_out = tucker_matrices(w)
    u_in = np.linalg.svd(unfold_in, full_matrices=False)[0][:, :r1]
    u_out = np.linalg.svd(unfold_out, full_matrices=False)[0][:, :r2]
    return np.einsum("oa,ib,oi...->ab...", u_out, u_in, w)


def core_comparison(ratio: float) -> None:
    rng = np.random.default_rng(0)
    for width, count in ((64, 3), (128, 4), (256, 6)):  # 512 wide: the old einsum alone runs for tens of minutes
        weight = rng.normal(size=(width, width, 3, 3)).astype(np.float32)
        r = max(1, int(np.ceil(ratio * width)))
        start = time.perf_counter()
        old = tucker2_before(weight, r, r)
        middle = time.perf_counter()
        new = conv_tucker2(weight, r, r)[1]
        end = time.perf_counter()
        same = np.allclose(np.abs(old), np.abs(new), atol=1e-6 * np.abs(old).max())  # vectors are defined up to sign
        print(f"tucker2 {width}x{width}x3x3 r={r} (x{count} in ResNet-50): before {middle - start:.2f} s, "
              f"after {end - middle:.3f} s ({(middle - start) / (end - middle):.0f}x), same core up to sign: {same}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="tucker2,svd,auto")
    parser.add_argument("--rank-ratio", type=float, default=0.5)
    parser.add_argument("--skip-core", action="store_true", help="Time only the whole-graph decompositions.")
    args = parser.parse_args()
    if not args.skip_core:
        core_comparison(args.rank_ratio)
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
