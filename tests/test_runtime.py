"""Provider choice: CUDA when present, a clean CPU fallback otherwise (CI has no GPU)."""

from __future__ import annotations

import warnings

import numpy as np
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


def test_cuda_request_runs_on_cuda_or_falls_back_to_cpu():
    """Asking for CUDA gives a CUDA session where onnxruntime-gpu can use it, else a working CPU session
    reported as 'cpu'; either way the outputs are the CPU ones."""
    model = vgg_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = runtime.make_session(model, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    cuda = "CUDAExecutionProvider" in session.get_providers()
    assert runtime.session_device(session) == ("cuda" if cuda else "cpu")
    if not cuda:  # the fallback is never silent: onnxruntime says so itself
        assert any("CUDAExecutionProvider" in str(w.message) for w in caught)
    feeds = random_inputs(model, 3)
    out = runtime.run_batched(session, feeds, ["logits"], 2)["logits"]
    expected = runtime.run_batched(runtime.make_session(model, ["CPUExecutionProvider"]), feeds, ["logits"], 2)["logits"]
    np.testing.assert_allclose(out, expected, rtol=1e-3 if cuda else 0, atol=1e-4 if cuda else 0)


def test_fixed_batch_pads_the_last_batch():
    model = vgg_net()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    session = runtime.make_session(model, ["CPUExecutionProvider"])
    feeds = random_inputs(model, 6)
    out = runtime.run_batched(session, feeds, ["logits"], 64, fixed_batch=4)["logits"]
    assert out.shape == (6, 10)
    first = runtime.run_batched(session, {"input": feeds["input"][:4]}, ["logits"], 4, fixed_batch=4)["logits"]
    np.testing.assert_allclose(out[:4], first, rtol=1e-6)
