"""Loading, normalising and writing: external data, constant sub-graphs, fixed batch sizes, atomic writes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_fskd.model_io as model_io
from builders import prune_by_slicing, random_inputs, vgg_net
from onnx_fskd.data import Samples, input_specs
from onnx_fskd.errors import FskdError
from onnx_fskd.model_io import load_model
from onnx_fskd.outputs import save_model_atomic
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
    del changed.opset_import[:]
    changed.opset_import.extend([helper.make_opsetid("", 21), helper.make_opsetid("com.example", 1)])
    save_model_atomic(changed, out, like=model)
    written = onnx.load(out)
    assert written.ir_version == 8
    assert [(o.domain, o.version) for o in written.opset_import] == [("", 17)]


def test_models_are_written_as_binary_protobuf_whatever_the_extension(tmp_path):
    for name in ("m.json", "m.txt", "m.textproto"):
        save_model_atomic(vgg_net(), tmp_path / name)
        written = onnx.ModelProto()
        written.ParseFromString((tmp_path / name).read_bytes())  # text would not parse as binary
        assert written.graph.node


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_io.onnx, "save_model", broken)
    with pytest.raises(FskdError, match="disk full"):
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


def test_constant_and_identity_weights_are_found_and_written_where_they_are_held():
    teacher = vgg_net()
    student = _with_constant_nodes(prune_by_slicing(vgg_net(), {"c2": np.arange(8)}))
    result = fit(teacher, student, Samples(random_inputs(teacher, 48)))
    names = {p.student for p in result.report.points}
    assert {"c1", "c2", "c3", "c4", "f1", "f2"} == names
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in student.graph.node]
    assert [n.name for n in result.model.graph.node] == [n.name for n in student.graph.node]
    kept = {p.student for p in result.report.points if p.status == "kept"}
    changed = {n.name.removesuffix(".w_const") for n, before in zip(result.model.graph.node, student.graph.node)
               if n.op_type == "Constant" and n != before}
    assert kept and kept <= changed  # each kept point's Constant-held weight was rewritten in place
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
