"""Feature Grams inside ONNX Runtime: ``[X 1]ᵀ[X 1]`` of chosen tensors of a model (the statistics of
channel re-selection), from nodes appended to the model, so that only C×C matrices leave the runtime.

Per batch and tensor the graph returns a per-channel shift ``s`` (the batch mean), the centred sums per
sample and the Gram of the centred values; the host adds the shift terms back and accumulates in
float64 (the same guard against float32 cancellation as the point probes, probes.py). A 0/1 weight per
sample drops the rows that pad a short last batch of a model with a fixed batch size."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .data import input_specs
from .errors import FskdError
from .graph import GraphIndex
from .probes import PER_SAMPLE_POSITIONS, GraphBuilder
from .runtime import batches, make_session, pad_rows

_VALID = "fskd/valid"


def gram_model(graph: GraphIndex, tensors: dict[str, int]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The graph's model, its outputs replaced by the sums of each tensor's features on its channel axis
    (name → axis), and the output prefix of each tensor. Without the model's own outputs, ORT skips
    whatever no tensor needs."""
    g = GraphBuilder(graph.opset or 13, "")
    weight = g.op("Reshape", _VALID, g.const("valid_shape", np.array([-1, 1, 1, 1])))
    prefixes = {}
    for index, (name, axis) in enumerate(tensors.items()):
        shape = graph.shapes.get(name)
        axis = axis % len(shape) if shape else axis
        if shape is None or not isinstance(shape[axis], int) or len(shape) < 2:
            raise FskdError(f"internal: {name} has no known channel count")
        channels, prefix = shape[axis], f"fskd/gram{index}/"
        positions = [d for i, d in enumerate(shape) if i not in (0, axis)]
        tensor = name
        if axis not in (1, len(shape) - 1):  # channels to axis 1 first (planes takes first or last)
            tensor = g.op("Transpose", name, perm=[0, axis] + [i for i in range(1, len(shape)) if i != axis])
            axis = 1
        planes = g.planes(tensor, 1 if axis == 1 else -1, 1, channels, channels)  # (N, 1, C, L)
        shift = g.reduce("ReduceMean", planes, [0, 3], 1)
        g.output(shift, prefix + "s")
        centred = g.op("Mul", g.op("Sub", planes, shift), weight)
        g.output(g.reduce("ReduceSum", centred, [3], 0), prefix + "S")  # (N, 1, C): summed in float64
        g.output(g.op("Shape", planes), prefix + "shape")
        count = int(np.prod(positions)) if all(isinstance(d, int) for d in positions) else 0
        if count >= PER_SAMPLE_POSITIONS and channels <= count:  # per-sample C×C products: no larger than X
            products = g.op("MatMul", centred, g.op("Transpose", centred, perm=[0, 1, 3, 2]))
            g.output(g.reduce("ReduceSum", products, [0], 0), prefix + "G")
        else:  # few positions, or more channels than positions: samples and positions as one row axis
            rows = g.rows(centred)
            g.output(g.op("MatMul", rows, g.op("Transpose", rows, perm=[0, 2, 1])), prefix + "G")
        prefixes[name] = prefix
    probe = onnx.ModelProto()
    probe.CopyFrom(graph.model)
    probe.graph.node.extend(g.nodes)
    probe.graph.initializer.extend(g.initializers)
    probe.graph.input.append(helper.make_tensor_value_info(_VALID, TensorProto.FLOAT, ["N"]))
    outputs = [node.output[0] for node in g.nodes if node.name.startswith("fskd/out_")]
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(
        name, TensorProto.INT64 if name.endswith("shape") else TensorProto.FLOAT, None) for name in outputs)
    return probe, prefixes


def feature_grams(graph: GraphIndex, tensors: dict[str, int], samples: dict[str, np.ndarray],
                  providers: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """``[X 1]ᵀ[X 1]`` (float64, (C+1)×(C+1)) of each tensor of the graph's model over all samples,
    streamed in batches."""
    if not tensors:
        return {}
    probe, prefixes = gram_model(graph, tensors)
    session = make_session(probe, providers, exact=True)  # no TF32 in the products on CUDA
    names = [output.name for output in session.get_outputs()]
    fixed_batch = input_specs(graph.model)[0].batch_dim
    sums = {name: _Sums() for name in tensors}
    count = len(next(iter(samples.values())))
    # Batches run here, not through runtime.run_batched: the outputs are per-batch sums, not per-sample rows.
    for window in batches(count, fixed_batch or batch_size):
        real = window.stop - window.start
        feeds = {name: array[window] for name, array in samples.items()}
        valid = np.ones(real, np.float32)
        if fixed_batch and real < fixed_batch:
            feeds = {name: pad_rows(array, fixed_batch) for name, array in feeds.items()}
            valid = np.concatenate([valid, np.zeros(fixed_batch - real, np.float32)])
        values = dict(zip(names, session.run(names, {**feeds, _VALID: valid})))
        for name, prefix in prefixes.items():
            sums[name].add(values[prefix + "s"], values[prefix + "S"][:real], values[prefix + "G"],
                           real * int(values[prefix + "shape"][3]))
    return {name: total.gram() for name, total in sums.items()}


class _Sums:
    """Float64 n, Σx and Σx·xᵀ over batches, from each batch's shift s, centred sums Σ(x−s) and Gram."""

    def __init__(self) -> None:
        self.n = 0.0
        self.x: np.ndarray | float = 0.0
        self.xx: np.ndarray | float = 0.0

    def add(self, shift: np.ndarray, centred_sums: np.ndarray, centred_gram: np.ndarray, rows: int) -> None:
        s = shift.astype(np.float64).reshape(-1)
        c = centred_sums.astype(np.float64).reshape(len(centred_sums), -1).sum(axis=0)
        self.xx = self.xx + centred_gram.astype(np.float64).reshape(len(s), len(s)) \
            + np.outer(s, c) + np.outer(c, s) + rows * np.outer(s, s)
        self.x = self.x + c + rows * s
        self.n += rows

    def gram(self) -> np.ndarray:
        features = len(self.x)
        gram = np.empty((features + 1, features + 1))
        gram[:features, :features] = self.xx
        gram[:features, features] = gram[features, :features] = self.x
        gram[features, features] = self.n
        return gram
