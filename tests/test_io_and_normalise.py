"""Loading, normalising and writing: external data, constant sub-graphs, fixed batch sizes, atomic writes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_fskd.model_io as model_io
from builders import prune_by_slicing, random_inputs, vgg_net
from onnx_fskd.data import Samples, input_specs
from onnx_fskd.model_io import load_model, save_model_atomic
from onnx_fskd.pipeline import fit
from onnx_fskd.runtime import make_session, run_batched


def outputs(model, feeds):
    return run_batched(make_session(model, ["CPUExecutionProvider"]), feeds, ["logits"], 64)["logits"]


def test_external_data_model_loads_and_fits(tmp_path):
    teacher = vgg_net()
    path = tmp_path / "teacher.onnx"
    onnx.save_model(teacher, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="teacher.onnx.data", size_threshold=0)
    loaded = load_model(path)
    assert (tmp_path / "teacher.onnx.data").exists()
    student = prune_by_slicing(loaded, {"c3": np.arange(16)})
    result = fit(loaded, student, Samples(random_inputs(teacher, 48)))
    assert result.report.after.relative_error < result.report.before.relative_error


def test_large_models_are_written_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "_PROTOBUF_LIMIT", 1000)  # pretend the model is over 2 GB
    model = vgg_net()
    out = tmp_path / "big.onnx"
    save_model_atomic(model, out, like=model)
    assert (tmp_path / "big.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    feeds = random_inputs(model, 4)
    np.testing.assert_array_equal(outputs(load_model(out), feeds), outputs(model, feeds))


def test_write_keeps_ir_version_and_opsets(tmp_path):
    model = vgg_net()
    model.ir_version = 8
    out = tmp_path / "m.onnx"
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.ir_version = 14
    save_model_atomic(changed, out, like=model)
    assert onnx.load(out).ir_version == 8


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_io.onnx, "save_model", broken)
    with pytest.raises(OSError):
        save_model_atomic(vgg_net(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def _with_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The form some exporters emit: weights as Constant nodes, read through Identity."""
    graph = model.graph
    nodes = []
    for tensor in list(graph.initializer):
        if tensor.name.endswith(".w"):
            nodes.append(helper.make_node("Constant", [], [tensor.name + "_c"], name=tensor.name + "_const", value=tensor))
            nodes.append(helper.make_node("Identity", [tensor.name + "_c"], [tensor.name], name=tensor.name + "_id"))
            graph.initializer.remove(tensor)
    merged = nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(merged)
    return model


def test_constant_and_identity_weights_are_normalised():
    teacher = vgg_net()
    student = _with_constant_nodes(prune_by_slicing(vgg_net(), {"c2": np.arange(8)}))
    result = fit(teacher, student, Samples(random_inputs(teacher, 48)))
    names = {p.student for p in result.report.points}
    assert {"c1", "c2", "c3", "c4", "f1", "f2"} == names
    assert not any(n.op_type in ("Constant", "Identity") for n in result.model.graph.node)
    assert result.report.exactness <= 1e-4


def test_fixed_batch_dimension_is_honoured():
    teacher = vgg_net()
    for model in (teacher,):
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    student = prune_by_slicing(teacher, {"c3": np.arange(16)})
    assert input_specs(student)[0].batch_dim == 4
    result = fit(teacher, student, Samples(random_inputs(teacher, 22)))  # 22 = 5 batches of 4 + 2 padded
    assert result.report.samples_fit + result.report.samples_heldout == 22
    assert result.report.after.relative_error < result.report.before.relative_error


def test_sessions_for_models_over_the_protobuf_limit(monkeypatch):
    import onnx_fskd.runtime as runtime
    monkeypatch.setattr(runtime, "_PROTOBUF_LIMIT", 1000)  # take the from-files path a > 2 GB model needs
    model = vgg_net()
    feeds = random_inputs(model, 4)
    expected = run_batched(runtime.ort.InferenceSession(model.SerializeToString()), feeds, ["logits"], 4)["logits"]
    np.testing.assert_array_equal(outputs(model, feeds), expected)
