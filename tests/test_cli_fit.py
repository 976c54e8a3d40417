"""`onnx-fskd fit` from the command line: a good run writes a model and a report; every bad input gets
one 'error:' line, exit code 1 (failure) or 2 (usage), and nothing written."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from builders import IR_VERSION, OPSET, NetBuilder, prune_by_slicing, random_inputs, vgg_net
from onnx_fskd.cli.main import main


@pytest.fixture
def files(tmp_path):
    teacher = vgg_net()
    student = prune_by_slicing(teacher, {"c2": np.arange(8), "f1": np.arange(0, 48, 2)})
    paths = {"teacher": tmp_path / "teacher.onnx", "student": tmp_path / "student.onnx",
             "data": tmp_path / "data.npz", "out": tmp_path / "out.onnx"}
    onnx.save(teacher, paths["teacher"])
    onnx.save(student, paths["student"])
    np.savez(paths["data"], **random_inputs(teacher, 48), labels=np.zeros(48, dtype=np.int64))
    return paths


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def fit_args(files, **changes):
    args = {"teacher": files["teacher"], "--student": files["student"], "--data": files["data"], "-o": files["out"]}
    args.update(changes)
    return ["fit", args.pop("teacher")] + [item for pair in args.items() for item in pair]


def assert_error(result, code: int, fragment: str, out=None):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    if out is not None:
        assert not out.exists()


def test_fit_writes_model_and_report(files, tmp_path):
    report = tmp_path / "report.json"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(*fit_args(files), "--report", report)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    model = onnx.load(files["out"])
    assert model.ir_version == IR_VERSION
    document = json.loads(report.read_text())
    assert document["after"]["relative_error"] < document["before"]["relative_error"]
    assert {p["status"] for p in document["points"]} <= {"kept", "rejected"}
    assert document["exactness"] <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["out.onnx", "report.json"])  # no staging left


def test_npy_samples_and_num_samples(files, tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, random_inputs(vgg_net(), 40)["input"])
    result = run(*fit_args(files, **{"--data": npy}), "--num-samples", 20, "--mode", "parallel")
    assert result.exit_code == 0, result.output
    assert "16 fit + 4 held-out" in result.output


def test_missing_model(files, tmp_path):
    assert_error(run(*fit_args(files, teacher=tmp_path / "nope.onnx")), 1, "model not found", files["out"])


def test_corrupt_model(files, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    assert_error(run(*fit_args(files, **{"--student": bad})), 1, "not a", files["out"])


def test_not_onnx_text_file(files, tmp_path):
    text = tmp_path / "readme.onnx"
    text.write_text("hello, I am not a model\n")
    assert_error(run(*fit_args(files, teacher=text)), 1, "not a", files["out"])


def test_different_inputs(files, tmp_path):
    other = NetBuilder()
    x = other.conv("c1", "input", 3, 4)
    model = other.model(other.node("Flatten", "flat", [other.node("GlobalAveragePool", "gap", [x])], axis=1), (3, 8, 8), 4)
    path = tmp_path / "other.onnx"
    onnx.save(model, path)
    assert_error(run(*fit_args(files, **{"--student": path})), 1, "different inputs", files["out"])


def _with_nan() -> np.ndarray:
    values = random_inputs(vgg_net(), 8)["input"]
    values[3, 0, 0, 0] = np.nan
    return values


@pytest.mark.parametrize("make,message", [
    (lambda: np.zeros((4, 3, 8, 8), np.float32), "expects shape"),
    (lambda: np.full((4, 3, 16, 16), "a"), "expects float32"),
    (_with_nan, "NaN or Inf"),
    (lambda: np.zeros((0, 3, 16, 16), np.float32), "no samples"),
], ids=["wrong-shape", "wrong-dtype", "nan", "empty"])
def test_bad_samples(files, tmp_path, make, message):
    data = tmp_path / "samples.npy"
    np.save(data, make())
    assert_error(run(*fit_args(files, **{"--data": data})), 1, message, files["out"])


def test_no_correction_points(files, tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["r"], name="r"),
                               helper.make_node("GlobalAveragePool", ["r"], ["g"], name="g"),
                               helper.make_node("Flatten", ["g"], ["f"], name="f"),
                               helper.make_node("Pad", ["f", "pads"], ["logits"], name="pad")], "nopoints", [x], [y],
                              [onnx.numpy_helper.from_array(np.array([0, 0, 0, 7], np.int64), "pads")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    path = tmp_path / "nopoints.onnx"
    onnx.save(model, path)
    assert_error(run(*fit_args(files, teacher=path, **{"--student": path})), 1, "no correction points", files["out"])


def test_ambiguous_pairing_asks_for_map(files, tmp_path):
    student = onnx.load(files["teacher"])
    pool = next(n for n in student.graph.node if n.name == "p2")
    extra = helper.make_node("Conv", ["c4.relu", "extra.w"], ["extra"], name="extra", kernel_shape=[1, 1])
    student.graph.initializer.append(onnx.numpy_helper.from_array(np.eye(32, dtype=np.float32).reshape(32, 32, 1, 1), "extra.w"))
    pool.input[0] = "extra"
    nodes = list(student.graph.node)
    nodes.insert(nodes.index(pool), extra)
    for node in nodes:
        node.name = "renamed_" + node.name  # no names in common, and one layer more: nothing pairs
    del student.graph.node[:]
    student.graph.node.extend(nodes)
    path = tmp_path / "renamed.onnx"
    onnx.save(student, path)
    assert_error(run(*fit_args(files, **{"--student": path})), 1, "pass --map", files["out"])


def test_output_is_an_input(files):
    assert_error(run(*fit_args(files, **{"-o": files["student"]})), 2, "same file as input")


def test_existing_output_needs_force(files):
    files["out"].write_bytes(b"keep me")
    assert_error(run(*fit_args(files)), 2, "--force")
    assert files["out"].read_bytes() == b"keep me"
    assert run(*fit_args(files), "--force").exit_code == 0
    assert onnx.load(files["out"]).graph.node


def test_output_folder_missing(files, tmp_path):
    out = tmp_path / "missing" / "out.onnx"
    assert_error(run(*fit_args(files, **{"-o": out})), 1, "does not exist", out)


def test_unsupported_point_is_skipped_with_warning(files, tmp_path):
    b = NetBuilder()
    x = b.conv("c1", "input", 3, 8)
    weight = b.node("Mul", "w_dyn", [b.const("c2.wsrc", np.ones((8, 8, 3, 3))), b.node("ReduceMean", "m", ["input"], keepdims=1)])
    x = b.node("Conv", "c2", [x, weight], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    model = b.model(b.gemm("fc", x, 8, 10), (3, 16, 16), 10)
    path = tmp_path / "dyn.onnx"
    onnx.save(model, path)
    result = run(*fit_args(files, teacher=path, **{"--student": path}))
    assert result.exit_code == 0, result.output
    assert "skipped c2: its weight is computed at run time" in result.output


def test_one_step_prune_and_fit(files, tmp_path):
    student_out, report = tmp_path / "student.pruned.onnx", tmp_path / "r.json"
    args = ["fit", files["teacher"], "--prune", "0.5", "--data", files["data"], "-o", files["out"],
            "--student-out", student_out, "--report", report]
    result = run(*args)
    assert result.exit_code == 0, result.output
    document = json.loads(report.read_text())
    assert {p["channel_map"] for p in document["points"]} <= {"metadata", "reselected"}  # re-selection is on
    costs = {c["name"]: c for c in document["costs"]}
    assert costs["student"]["macs"] == costs["recovered"]["macs"] < costs["teacher"]["macs"]
    assert costs["student"]["params"] < 0.5 * costs["teacher"]["params"]
    assert onnx.load(student_out).metadata_props and onnx.load(files["out"]).graph.node


def test_one_step_decompose_and_fit(files):
    result = run("fit", files["teacher"], "--decompose", "0.5", "--data", files["data"], "-o", files["out"])
    assert result.exit_code == 0, result.output
    assert "recovered" in result.output


def test_student_and_prune_together_is_a_usage_error(files):
    assert_error(run(*fit_args(files), "--prune", "0.5"), 2, "at most one of", files["out"])
