"""The Python API: every data form gives the same fit as the command line's file, results save like the
CLI's, and errors are FskdError."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

import onnx_fskd
from builders import matmul_mlp, prune_by_slicing, random_inputs
from onnx_fskd.pairing import MAP_METADATA_KEY

COUNT = 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    teacher = matmul_mlp()
    student = prune_by_slicing(teacher, {"m0": np.arange(0, 64, 2), "m1": np.arange(40)})
    arrays = random_inputs(teacher, COUNT)
    paths = {"teacher": folder / "teacher.onnx", "student": folder / "student.onnx", "data": folder / "data.npz"}
    onnx.save(teacher, paths["teacher"])
    onnx.save(student, paths["student"])
    np.savez(paths["data"], **arrays)
    reference = onnx_fskd.fit(paths["teacher"], paths["student"], paths["data"], provider="cpu")
    return paths, arrays, reference


class Reader:
    """ONNX Runtime's CalibrationDataReader protocol: get_next() until None."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int):
        self.batches = iter([{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, COUNT, batch)])

    def get_next(self):
        return next(self.batches, None)


def _forms(arrays):
    return {
        "dict": arrays,
        "iterable of feed dicts": [{k: v[i:i + 16] for k, v in arrays.items()} for i in range(0, COUNT, 16)],
        "generator": ({k: v[i:i + 7] for k, v in arrays.items()} for i in range(0, COUNT, 7)),
        "get_next reader": Reader(arrays, 25),
    }


def test_path_form_recovers_and_reports(setup):
    paths, _, result = setup
    assert isinstance(result.model, onnx.ModelProto)
    report = result.report
    assert report["measured_on"] == "held-out"  # after: the guard's corrections on samples they never saw
    assert report["after"]["relative_error"] < 0.8 * report["before"]["relative_error"]
    assert report["written_in_sample"]["relative_error"] < 0.5 * report["before"]["relative_error"]
    assert report["run"]["inputs"]["data"]["sha256"] == hashlib.sha256(paths["data"].read_bytes()).hexdigest()
    assert report["run"]["options"]["solver"] == "auto" and report["run"]["seed"] == 0


@pytest.mark.parametrize("form", ["dict", "iterable of feed dicts", "generator", "get_next reader"])
def test_every_data_form_gives_the_same_fit(setup, form):
    paths, arrays, reference = setup
    teacher, student = onnx.load(paths["teacher"]), onnx.load(paths["student"])  # ModelProtos work too
    result = onnx_fskd.fit(teacher, student, _forms(arrays)[form], provider="cpu")
    assert result.report["after"]["relative_error"] == pytest.approx(reference.report["after"]["relative_error"],
                                                                     rel=1e-6)
    assert result.report["samples_fit"] + result.report["samples_heldout"] == COUNT
    assert result.report["run"]["inputs"]["teacher"]["source"] == "ModelProto"


def test_save_refuses_to_overwrite_without_force(setup, tmp_path):
    _, _, result = setup
    out = result.save(tmp_path / "r.onnx")
    written = onnx.load(out)
    assert written.producer_name == "onnx-fskd" and written.producer_version == onnx_fskd.__version__
    assert [n.name for n in written.graph.node] == [n.name for n in onnx.load(setup[0]["student"]).graph.node]
    with pytest.raises(onnx_fskd.FskdError, match="exists"):
        result.save(out)
    result.save(out, force=True)


def test_prune_then_fit_with_the_default_keeps_no_internal_map(setup):
    paths, arrays, _ = setup
    student = onnx_fskd.prune(paths["teacher"], ratio=0.5)
    assert any(p.key == MAP_METADATA_KEY for p in student.metadata_props)
    assert student.producer_name == "onnx-fskd"
    default = onnx_fskd.fit(paths["teacher"], data=arrays, provider="cpu")  # no student: prune 0.5
    assert default.report["run"]["options"]["prune"] == 0.5
    assert not any(p.key == MAP_METADATA_KEY for p in default.model.metadata_props)
    kept = onnx_fskd.fit(paths["teacher"], student, arrays, provider="cpu", keep_map=True)
    assert any(p.key == MAP_METADATA_KEY for p in kept.model.metadata_props)


def test_decompose_returns_a_smaller_student(setup):
    paths, _, _ = setup
    student = onnx_fskd.decompose(paths["teacher"], rank_ratio=0.25, keep_ends=False)
    size = sum(np.prod(t.dims) for t in student.graph.initializer)
    assert size < sum(np.prod(t.dims) for t in onnx.load(paths["teacher"]).graph.initializer)


def test_evaluate_returns_eval_json(setup):
    paths, arrays, result = setup
    metrics = onnx_fskd.evaluate(result.model, arrays, reference=paths["teacher"], provider="cpu")
    assert metrics["output"] == "logits" and metrics["metric"] == "top1"
    assert 0.0 <= metrics["agreement"] <= 1.0 and metrics["samples"] == COUNT
    assert metrics["outputs"]["logits"]["relative_error"] == metrics["relative_error"]


@pytest.mark.parametrize("call, message", [
    (lambda p, a: onnx_fskd.fit(p["teacher"], p["student"]), "needs unlabeled samples"),
    (lambda p, a: onnx_fskd.fit(p["teacher"], p["student"], 42), "data must be a path"),
    (lambda p, a: onnx_fskd.fit(p["teacher"], p["student"], [1, 2]), "expected a dict"),
    (lambda p, a: onnx_fskd.fit(p["teacher"], p["student"], {"x": a["input"], "y": a["input"]}), "lacks arrays"),
    (lambda p, a: onnx_fskd.fit(p["teacher"], p["student"], a, prune=0.5), "at most one"),
    (lambda p, a: onnx_fskd.fit(p["teacher"], p["student"], a, solver="qq"), "--solver must be one of q, full, auto"),
    (lambda p, a: onnx_fskd.evaluate(p["teacher"], a), "nothing to compare"),
    (lambda p, a: onnx_fskd.fit(3, p["student"], a), "a model is a path"),
])
def test_errors_are_fskd_errors(setup, call, message):
    paths, arrays, _ = setup
    with pytest.raises(onnx_fskd.FskdError, match=message):
        call(paths, arrays)


def test_prune_options_are_checked(setup):
    with pytest.raises(onnx_fskd.FskdError, match="criterion"):
        onnx_fskd.prune(setup[0]["teacher"], 0.5, criterion="l3")
