"""Provider choice: CUDA when present, a clean CPU fallback otherwise (CI has no GPU)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

import onnx_fskd.runtime as runtime
from builders import random_inputs, vgg_net
from onnx_fskd.errors import FskdError


def test_auto_takes_cuda_only_when_onnxruntime_has_it(monkeypatch):
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert runtime.resolve_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(FskdError, match="no CUDA provider"):
        runtime.resolve_providers("cuda")
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime.resolve_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.resolve_providers("cpu") == ["CPUExecutionProvider"]


def test_cuda_sessions_for_checked_numbers_turn_tf32_off():
    """What a CUDA session is given: TF32 off where float32 numbers are compared, ORT's default elsewhere;
    cuDNN's heuristic algorithm choice unless the session is tuned (timed, or runs many batches)."""
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    heuristic = {"cudnn_conv_algo_search": "HEURISTIC"}
    assert runtime.session_providers(both, exact=True) == [("CUDAExecutionProvider", {"use_tf32": "0", **heuristic}),
                                                           "CPUExecutionProvider"]
    assert runtime.session_providers(both, exact=False) == [("CUDAExecutionProvider", heuristic), "CPUExecutionProvider"]
    assert runtime.session_providers(both, exact=True, tuned=True) == [("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                                       "CPUExecutionProvider"]
    assert runtime.session_providers(both, exact=False, tuned=True) == both
    assert runtime.session_providers(["CPUExecutionProvider"], exact=True) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("exact", [False, True])
def test_cuda_request_runs_on_cuda_or_falls_back_to_cpu(exact):
    """Asking for CUDA gives a working session: on CUDA (TF32 off when exact) where onnxruntime can use
    it, else on the CPU, reported as 'cpu'; the outputs match the CPU's."""
    model = vgg_net()
    cuda_usable = "CUDAExecutionProvider" in runtime.ort.get_available_providers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = runtime.make_session(model, ["CUDAExecutionProvider", "CPUExecutionProvider"], exact=exact)
    cuda = runtime.session_device(session) == "cuda"
    assert cuda or not cuda_usable or caught
    if not cuda:  # the fallback is never silent: onnxruntime says so itself
        assert any("CUDAExecutionProvider" in str(w.message) for w in caught)
        assert runtime.session_precision(session) == "fp32"
    else:
        assert runtime.session_precision(session) == ("fp32" if exact else "tf32")
    feeds = random_inputs(model, 3)
    out = runtime.run_batched(session, feeds, ["logits"], 2)["logits"]
    expected = runtime.run_batched(runtime.make_session(model, ["CPUExecutionProvider"]), feeds, ["logits"], 2)["logits"]
    np.testing.assert_allclose(out, expected, rtol=0 if not cuda else 1e-4 if exact else 1e-3,
                               atol=0 if not cuda else 1e-4)


def test_fixed_batch_pads_the_last_batch():
    model = vgg_net()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    session = runtime.make_session(model, ["CPUExecutionProvider"])
    feeds = random_inputs(model, 6)
    out = runtime.run_batched(session, feeds, ["logits"], 64, fixed_batch=4)["logits"]
    assert out.shape == (6, 10)
    first = runtime.run_batched(session, {"input": feeds["input"][:4]}, ["logits"], 4, fixed_batch=4)["logits"]
    np.testing.assert_allclose(out[:4], first, rtol=1e-6)


def test_batches_written_in_place_equal_one_run():
    """Later batches go through IO binding straight into the result arrays; nothing may differ from
    one run over all samples."""
    model = vgg_net()
    model.graph.output.append(onnx.helper.make_tensor_value_info("c2.relu", onnx.TensorProto.FLOAT, None))
    session = runtime.make_session(model, ["CPUExecutionProvider"])
    feeds = random_inputs(model, 7)
    whole = session.run(["logits", "c2.relu"], feeds)
    batched = runtime.run_batched(session, feeds, ["logits", "c2.relu"], 2)
    np.testing.assert_allclose(batched["logits"], whole[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched["c2.relu"], whole[1], rtol=1e-5, atol=1e-6)


class ShapeRecorder:
    """A session whose ``run`` calls record their feeds' batch sizes (IO-bound runs are full batches)."""

    def __init__(self, session):
        self.session, self.sizes = session, []

    def run(self, outputs, feeds):
        self.sizes.append({len(v) for v in feeds.values()})
        return self.session.run(outputs, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.mark.parametrize("one_shape", [False, True])
def test_cuda_sessions_pad_a_short_batch_to_one_shape(one_shape, monkeypatch):
    """On CUDA every new input shape sets up cuDNN for every conv again: a short last batch is padded
    there, and its extra rows are dropped. (CUDA's rule, forced here onto the CPU provider.)"""
    if one_shape:
        monkeypatch.setattr(runtime, "_ONE_SHAPE_DEVICES", ("cuda", "cpu"))
    model = vgg_net()
    session = ShapeRecorder(runtime.make_session(model, ["CPUExecutionProvider"]))
    feeds = random_inputs(model, 7)
    out = runtime.run_batched(session, feeds, ["logits"], 3)["logits"]
    assert session.sizes == [{3 if one_shape else 1}]  # the short batch; the full ones went through IO binding
    whole = runtime.make_session(model, ["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-6)
    assert runtime.padded_rows(session, 7, 3, None) == (3 if one_shape else None)
    assert runtime.padded_rows(session, 3, 3, None) is None  # one batch: nothing to pad
    assert runtime.padded_rows(session, 7, 3, 4) == 4  # the model's own fixed batch size first


def test_one_batch_shape_is_cudas_rule():
    assert runtime.one_batch_shape(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not runtime.one_batch_shape(["CPUExecutionProvider"])


def test_cpu_batches_keep_their_intermediates_within_the_arena_bound(monkeypatch):
    """On the CPU a batch is cut to the rows whose intermediates fit ARENA_BATCH_BYTES (at least one row);
    a GPU session keeps the batch size."""
    session = runtime.make_session(vgg_net(), ["CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "ARENA_BATCH_BYTES", 10_000)
    assert runtime.rows_within_arena(session, 3_000, 64) == 3
    assert runtime.rows_within_arena(session, 3_000, 2) == 2
    assert runtime.rows_within_arena(session, 50_000, 64) == 1
    assert runtime.rows_within_arena(session, 0, 64) == 64  # nothing known about the intermediates
    monkeypatch.setattr(runtime, "session_device", lambda session: "cuda")
    assert runtime.rows_within_arena(session, 3_000, 64) == 64
