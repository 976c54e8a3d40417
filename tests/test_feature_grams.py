"""Feature Grams computed inside ONNX Runtime against float64 NumPy on the same activations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_fskd.feature_grams as feature_grams_module
import onnx_fskd.runtime as runtime
from builders import NetBuilder, random_inputs, token_mlp, vgg_net
from onnx_fskd.feature_grams import feature_grams
from onnx_fskd.graph import GraphIndex
from onnx_fskd.runtime import make_session, run_batched

CPU = ["CPUExecutionProvider"]


def wide_net() -> onnx.ModelProto:
    """40×40 maps: 1,600 positions per sample, the per-sample product path."""
    b = NetBuilder(4)
    x = b.conv_bn_relu("c1", "input", 3, 12)
    x = b.conv_bn_relu("c2", x, 12, 10)
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    return b.model(b.gemm("fc", x, 10, 5), (3, 40, 40), 5, "wide")


def reference(model: onnx.ModelProto, tensors: dict[str, int], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[X 1]ᵀ[X 1] in float64 from the activations themselves."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in tensors)
    values = run_batched(make_session(probe, CPU), feeds, list(tensors), 64)
    grams = {}
    for name, axis in tensors.items():
        rows = np.moveaxis(values[name], axis, -1).reshape(-1, values[name].shape[axis]).astype(np.float64)
        rows = np.hstack([rows, np.ones((len(rows), 1))])
        grams[name] = rows.T @ rows
    return grams


def padding_checked(make_session, rows: int):
    """make_session whose sessions assert that every run is fed ``rows`` samples."""

    class Checked:
        def __init__(self, session):
            self.session = session

        def run(self, outputs, feeds):
            assert {len(v) for v in feeds.values()} == {rows}
            return self.session.run(outputs, feeds)

        def __getattr__(self, name):
            return getattr(self.session, name)

    return lambda *args, **kwargs: Checked(make_session(*args, **kwargs))


CASES = {
    "nchw-few-positions": (vgg_net, {"c2.relu": 1, "p2": 1, "f1.relu": 1}),
    "nchw-many-positions": (wide_net, {"c1.relu": 1, "c2.relu": 1}),
    "tokens-channels-last": (token_mlp, {"t0.relu": 2, "t1.relu": 2}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fixed_batch,one_shape", [(None, False), (8, False), (None, True)])
def test_in_graph_grams_match_float64_numpy(case, fixed_batch, one_shape, monkeypatch):
    """Shift, per-sample sums and the centred Gram, added up in float64 on the host, give NumPy's Gram to
    float32 rounding; with a fixed batch size, or CUDA's one batch shape per session (forced onto the CPU
    provider), the padded rows of the short last batch count for nothing."""
    if one_shape:
        monkeypatch.setattr(runtime, "_ONE_SHAPE_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(feature_grams_module, "make_session", padding_checked(runtime.make_session, 16))
    build, tensors = CASES[case]
    model = build()
    feeds = random_inputs(model, 21, seed=5)
    feeds = {k: v * 3.0 + 2.0 for k, v in feeds.items()}  # an offset: the shift has something to remove
    if fixed_batch:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = fixed_batch
    got = feature_grams(GraphIndex(model), tensors, feeds, CPU, batch_size=16)
    if fixed_batch:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    want = reference(model, tensors, feeds)
    for name in tensors:
        assert got[name].shape == want[name].shape
        assert got[name][-1, -1] == want[name][-1, -1]  # the row count, pads excluded
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=2e-6 * np.abs(want[name]).max(), err_msg=name)
