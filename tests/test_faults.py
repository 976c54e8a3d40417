"""Faults through the real CLI (click's runner, and real subprocesses where a resource limit or a signal
is involved): every case ends with exit code 1 (2 for usage), exactly one 'error:' line, no traceback,
the inputs byte-identical and the folder holding exactly what it held before."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnx_fskd.outputs as outputs_module
from builders import IR_VERSION, OPSET, prune_by_slicing, random_inputs, vgg_net
from onnx_fskd.cli.main import main


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error(result, code: int, fragment: str = "") -> str:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert fragment.lower() in errors[0].lower(), errors[0]
    return errors[0]


@pytest.fixture
def files(tmp_path):
    teacher = vgg_net()
    student = prune_by_slicing(teacher, {"c2": np.arange(8), "f1": np.arange(0, 48, 2)})
    paths = {"teacher": tmp_path / "teacher.onnx", "student": tmp_path / "student.onnx",
             "data": tmp_path / "data.npz", "map": tmp_path / "map.json", "out": tmp_path / "out.onnx"}
    onnx.save_model(teacher, paths["teacher"], save_as_external_data=True, location="teacher.onnx.data",
                    size_threshold=0)
    onnx.save(student, paths["student"])
    np.savez(paths["data"], **random_inputs(teacher, 24), labels=np.arange(24) % 10)
    paths["map"].write_text(json.dumps({"points": [{"teacher": n, "student": n, "kept": None}
                                                   for n in ("c1", "c3", "c4", "f2")]}))
    return paths


def fit_args(files, *extra, **changes):
    args = {"--student": files["student"], "--data": files["data"], "-o": files["out"]} | changes
    return ["fit", files["teacher"], *[x for pair in args.items() for x in pair if x is not None], *extra]


def refused(files, tmp_path, code: int, fragment: str, *args):
    """Run, expect one error line, and check nothing changed in the folder."""
    before = snapshot(tmp_path)
    message = assert_one_error(run(*args), code, fragment)
    assert snapshot(tmp_path) == before
    return message


# --- 2. never overwrite an input -------------------------------------------------------------------

def test_output_onto_the_teachers_external_data_is_refused(files, tmp_path):
    assert (tmp_path / "teacher.onnx.data").exists()
    refused(files, tmp_path, 2, "same file as input", *fit_args(files, "--force", **{"-o": tmp_path / "teacher.onnx.data"}))


def test_output_through_a_link_to_an_input_is_refused(files, tmp_path):
    (tmp_path / "link.onnx").symlink_to(files["student"])
    os.link(files["data"], tmp_path / "hard.npz")
    for target in ("link.onnx", "hard.npz"):
        refused(files, tmp_path, 2, "same file as input", *fit_args(files, "--force", **{"-o": tmp_path / target}))


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_output_onto_the_map_is_refused(files, tmp_path, option):
    args = fit_args(files, "--force", **{"--map": files["map"], option: files["map"]})
    refused(files, tmp_path, 2, "same file as input", *args)


def test_report_onto_the_output_is_refused(files, tmp_path):
    refused(files, tmp_path, 2, "same file as -o", *fit_args(files, **{"--report": files["out"]}))


@pytest.mark.parametrize("option", ["--report", "--student-out"])
def test_existing_report_or_student_out_needs_force(files, tmp_path, option):
    existing = tmp_path / "existing.bin"
    existing.write_bytes(b"keep me")
    args = ["fit", files["teacher"], "--prune", "0.3", "--data", files["data"], "-o", files["out"], option, existing]
    refused(files, tmp_path, 2, "exists; pass --force", *args)
    result = run(*args, "--force")
    assert result.exit_code == 0, result.output
    assert existing.read_bytes() != b"keep me"


def test_model_is_binary_protobuf_whatever_the_extension(files, tmp_path):
    out = tmp_path / "recovered.json"
    assert run(*fit_args(files, **{"-o": out})).exit_code == 0
    model = onnx.ModelProto()
    model.ParseFromString(out.read_bytes())
    assert len(model.graph.node) == len(onnx.load(files["student"]).graph.node)


def test_empty_output_name_is_a_usage_error(files, tmp_path):
    refused(files, tmp_path, 2, "-o . is a folder", *fit_args(files, **{"-o": ""}))  # click reads "" as "."


def test_device_as_output_is_refused(files, tmp_path):
    refused(files, tmp_path, 2, "not a regular file", *fit_args(files, **{"--report": "/dev/full"}))


def test_prune_decompose_and_eval_protect_their_inputs(files, tmp_path):
    refused(files, tmp_path, 2, "same file as input", "prune", files["teacher"], "--ratio", "0.3", "-o",
            tmp_path / "teacher.onnx.data", "--force")
    refused(files, tmp_path, 2, "same file as input", "decompose", files["student"], "--rank-ratio", "0.5", "-o",
            files["student"], "--force")
    refused(files, tmp_path, 2, "same file as input", "eval", files["student"], "--data", files["data"],
            "--json", files["data"])


# --- 3. a failed run leaves nothing behind --------------------------------------------------------

def test_report_failing_after_the_model_was_staged_leaves_nothing(files, tmp_path, monkeypatch):
    def disk_full(document, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(outputs_module, "write_json", disk_full)
    monkeypatch.setattr("onnx_fskd.cli.fit_cmd.write_json_file", disk_full)
    refused(files, tmp_path, 1, "no space left", *fit_args(files, **{"--report": tmp_path / "r.json"}))


def test_failure_at_the_final_rename_restores_what_was_there(files, tmp_path, monkeypatch):
    files["out"].write_bytes(b"the old output")
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if Path(target).name == "r.json":  # the last rename, after the old output was replaced by the new one
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_replace(source, target)

    monkeypatch.setattr(outputs_module.os, "replace", replace)
    message = refused(files, tmp_path, 1, "cross-device", *fit_args(files, "--force", **{"--report": tmp_path / "r.json"}))
    assert "nothing was written" in message
    assert files["out"].read_bytes() == b"the old output"
    # the old output was set aside, the new one moved in, the report failed, the old one put back
    assert [Path(c).name for c in calls] == [".previous.out.onnx", "out.onnx", "r.json", "out.onnx"]


def test_unwritable_staging_folder_is_one_error(files, tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(outputs_module.tempfile, "mkdtemp", denied)
    refused(files, tmp_path, 1, "permission denied", *fit_args(files))


@pytest.mark.parametrize("command", ["prune", "decompose", "eval"])
def test_other_commands_leave_nothing_when_writing_fails(files, tmp_path, monkeypatch, command):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("onnx_fskd.model_io.onnx.save_model", disk_full)
    monkeypatch.setattr("onnx_fskd.cli.eval_cmd.write_json_file", disk_full)
    args = {"prune": ["prune", files["student"], "--ratio", "0.3", "-o", files["out"]],
            "decompose": ["decompose", files["student"], "--rank-ratio", "0.5", "-o", files["out"]],
            "eval": ["eval", files["student"], "--data", files["data"], "--json", tmp_path / "e.json"]}[command]
    refused(files, tmp_path, 1, "no space left", *args)


def _cli_subprocess(args, cwd, file_size_limit=None):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    import resource
    return subprocess.run([sys.executable, "-c", "from onnx_fskd.cli.main import main; main()", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit if file_size_limit else None)


def test_file_size_limit_midway_through_the_model_leaves_nothing(files, tmp_path):
    """A real process whose writes fail after 20 kB: the model (~60 kB) breaks off midway."""
    before = snapshot(tmp_path)
    done = _cli_subprocess(fit_args(files, **{"--report": tmp_path / "r.json"}), tmp_path, file_size_limit=20_000)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "too large" in errors[0].lower(), done.stderr
    assert snapshot(tmp_path) == before


def test_real_process_prints_usage_errors_in_one_line(files, tmp_path):
    done = _cli_subprocess(["fit", files["teacher"], "--student", files["student"]], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: ")
    assert "--data" in done.stderr


@pytest.mark.parametrize("args, fragment", [(["nosuch"], "No such command"), (["--bogus"], "No such option"),
                                            (["prune", "--ratio", "x"], "not a number")])
def test_group_and_command_usage_errors_are_one_line(tmp_path, args, fragment):
    refused(None, tmp_path, 2, fragment, *args)


# --- 4. one error line instead of a traceback -----------------------------------------------------

def _token_model(seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(10, 8)).astype(np.float32), "embedding"),
             numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["tokens"], name="embed"),
             helper.make_node("MatMul", ["tokens", "w"], ["out"], name="proj")]
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def test_onnxruntime_run_error_is_one_line(tmp_path):
    onnx.save(_token_model(0), tmp_path / "t.onnx")
    onnx.save(_token_model(1), tmp_path / "s.onnx")
    np.save(tmp_path / "ids.npy", np.full((8, 5), 50, dtype=np.int64))  # ids past the embedding's 10 rows
    refused(None, tmp_path, 1, "onnxruntime could not run the model", "fit", tmp_path / "t.onnx", "--student",
            tmp_path / "s.onnx", "--data", tmp_path / "ids.npy", "-o", tmp_path / "o.onnx")


def test_onnxruntime_run_error_in_eval_is_one_line(tmp_path):
    onnx.save(_token_model(0), tmp_path / "t.onnx")
    np.save(tmp_path / "ids.npy", np.full((8, 5), 50, dtype=np.int64))
    refused(None, tmp_path, 1, "onnxruntime could not run the model", "eval", tmp_path / "t.onnx", "--data",
            tmp_path / "ids.npy", "--reference", tmp_path / "t.onnx", "--json", tmp_path / "e.json")


def _edited(files, tmp_path, edit) -> Path:
    model = onnx.load(files["student"])
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m.graph.input[0].type.tensor_type.__setattr__("elem_type", TensorProto.DOUBLE), "different inputs"),
    (lambda m: m.graph.output[0].type.tensor_type.shape.dim[1].__setattr__("dim_value", 7), "different outputs"),
    (lambda m: m.graph.output[0].type.tensor_type.__setattr__("elem_type", TensorProto.DOUBLE), "different outputs"),
    (lambda m: helper.set_model_props(m, {"onnx_fskd.map": "{not json"}), "not valid JSON"),
    (lambda m: helper.set_model_props(m, {"onnx_fskd.map": '{"points": 5}'}), "a 'points' list"),
    (lambda m: helper.set_model_props(m, {"onnx_fskd.map": '{"points": [{"teacher": "c1"}]}'}), "needs 'teacher' and"),
])
def test_incompatible_student_or_bad_metadata_is_one_line(files, tmp_path, edit, fragment):
    student = _edited(files, tmp_path, edit)
    refused(files, tmp_path, 1, fragment, *fit_args(files, **{"--student": student}))


@pytest.mark.parametrize("points, fragment", [
    ([{"teacher": "c2", "student": "c2", "kept": "abc"}], "distinct non-negative integers"),
    ([{"teacher": "c2", "student": "c2", "kept": [0, 0, 1, 2, 3, 4, 5, 6]}], "distinct"),
    ([{"teacher": "c2", "student": "c2", "kept": [0, 1.5]}], "integers"),
    ([{"teacher": "c2", "student": "c2", "kept": list(range(7)) + [99]}], "up to 99"),
    ([{"teacher": "c2", "student": "c2", "kept": None}], "'kept' is null"),
    ([{"teacher": "f1", "student": "c3", "kept": None}], "same kind"),
])
def test_bad_map_content_is_one_line(files, tmp_path, points, fragment):
    files["map"].write_text(json.dumps({"points": points}))
    refused(files, tmp_path, 1, fragment, *fit_args(files, **{"--map": files["map"]}))


def _eval_accuracy(files, tmp_path, labels) -> str:
    np.savez(tmp_path / "labelled.npz", input=np.load(files["data"])["input"], labels=labels)
    return run("eval", files["student"], "--data", tmp_path / "labelled.npz")


def test_eval_accepts_column_and_one_hot_labels(files, tmp_path):
    ids = np.arange(24) % 10
    plain = _eval_accuracy(files, tmp_path, ids)
    assert plain.exit_code == 0, plain.output
    accuracy = next(line for line in plain.stdout.splitlines() if "accuracy" in line)
    for labels in (ids[:, None], np.eye(10)[ids], np.eye(10, dtype=np.uint8)[ids]):
        result = _eval_accuracy(files, tmp_path, labels)
        assert result.exit_code == 0, result.output
        assert next(line for line in result.stdout.splitlines() if "accuracy" in line) == accuracy


def test_eval_rejects_labels_that_are_neither(files, tmp_path):
    np.savez(tmp_path / "bad.npz", input=np.load(files["data"])["input"], labels=np.full((24, 10), 0.5))
    refused(files, tmp_path, 1, "neither class ids", "eval", files["student"], "--data", tmp_path / "bad.npz")


# --- 5. honest numbers ----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--ridge", "nan"], ["--ridge", "inf"], ["--holdout", "nan"], ["--mean", "nan"], ["--std", "inf"],
    ["--scale", "nan"], ["--ridge", "-1"], ["--holdout", "1"],
])
def test_non_finite_or_out_of_range_fit_options_are_usage_errors(files, tmp_path, args):
    refused(files, tmp_path, 2, "", *fit_args(files, *args))


@pytest.mark.parametrize("args", [
    ["fit", "TEACHER", "--prune", "nan", "--data", "DATA", "-o", "OUT"],
    ["fit", "TEACHER", "--decompose", "inf", "--data", "DATA", "-o", "OUT"],
    ["prune", "TEACHER", "--ratio", "nan", "-o", "OUT"],
    ["decompose", "TEACHER", "--rank-ratio", "nan", "-o", "OUT"],
    ["decompose", "TEACHER", "--energy", "inf", "-o", "OUT"],
])
def test_non_finite_compression_options_are_usage_errors(files, tmp_path, args):
    names = {"TEACHER": files["teacher"], "DATA": files["data"], "OUT": files["out"]}
    refused(files, tmp_path, 2, "not a finite number", *[names.get(a, a) for a in args])


@pytest.mark.parametrize("count, holdout", [(1, "0.2"), (24, "0")])
def test_no_held_out_claim_without_held_out_samples(files, tmp_path, count, holdout):
    result = run(*fit_args(files, "--num-samples", count, "--holdout", holdout))
    assert result.exit_code == 0, result.output
    assert "output vs teacher, held-out" not in result.stdout and "held-out error" not in result.stdout
    assert "in-sample" in result.stdout
    assert "warning: nothing is held out" in result.stderr and "the guard is off" in result.stderr


def test_held_out_figures_are_labelled_and_in_sample_ones_too(files, tmp_path):
    report = tmp_path / "r.json"
    result = run(*fit_args(files, **{"--report": report}))
    assert result.exit_code == 0, result.output
    assert "output vs teacher, held-out (5 samples no correction was fitted on)" in result.stdout
    assert "in-sample" in result.stdout
    document = json.loads(report.read_text())
    assert document["measured_on"] == "held-out" and document["written_in_sample"] is not None


def test_integer_samples_for_a_float_model_warn_once(files, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (24, 3, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "raw.npy", pixels)
    done = _cli_subprocess(fit_args(files, **{"--data": tmp_path / "raw.npy"}), tmp_path)  # the real logging set-up
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "integer samples" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "uint8" in warnings[0], done.stderr
    assert "/ 255" in warnings[0]


def test_python_api_raises_fskd_error_for_the_same_faults(tmp_path):
    import onnx_fskd

    ids = {"ids": np.full((8, 5), 50, dtype=np.int64)}
    with pytest.raises(onnx_fskd.FskdError, match="onnxruntime could not run the model"):
        onnx_fskd.fit(_token_model(0), _token_model(1), ids)
    result = onnx_fskd.fit(_token_model(0), _token_model(1), {"ids": np.arange(40).reshape(8, 5) % 10})
    (tmp_path / "taken.onnx").write_bytes(b"keep")
    with pytest.raises(onnx_fskd.FskdError, match="exists; pass --force"):
        result.save(tmp_path / "taken.onnx")
    assert (tmp_path / "taken.onnx").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]
