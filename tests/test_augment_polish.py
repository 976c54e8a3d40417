"""Unlabeled augmentation (flips/shifts as extra fit rows) and the optional gradient polish."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from builders import matmul_mlp, prune_by_slicing, random_inputs, vgg_net
from cli.main import main
from compress_builders import run
from onnx_fskd.augment import augment_fit_rows, image_width_axis
from onnx_fskd.correct import Rows
from onnx_fskd.data import Samples, input_specs
from onnx_fskd.errors import FskdError
from onnx_fskd.pipeline import FitConfig, fit
from onnx_fskd.polish import polish_weights, require_torch


def test_flips_and_shifts_go_to_the_fit_rows_only():
    x = np.random.default_rng(0).normal(size=(10, 1, 5, 7)).astype(np.float32)
    specs = [s for s in input_specs(vgg_net()) if s.name == "input"]
    rows = Rows(slice(0, 8), slice(8, 10))
    samples, new_rows, done = augment_fit_rows(Samples({"input": x}), rows, specs, "auto")
    out = samples.arrays["input"]
    assert done.kind == "flip" and done.added == 8 and new_rows == Rows(slice(0, 16), slice(16, 18))
    np.testing.assert_array_equal(out[:8], x[:8])
    np.testing.assert_array_equal(out[8:16], x[:8, :, :, ::-1])
    np.testing.assert_array_equal(out[16:], x[8:])  # the guard still judges on real samples
    samples, new_rows, done = augment_fit_rows(Samples({"input": x}), rows, specs, "flip+shift")
    assert done.added == 5 * 8 and new_rows.held == slice(48, 50)
    shifted = samples.arrays["input"][16:24]  # the first shift: 2 pixels left, the edge repeated
    np.testing.assert_array_equal(shifted[..., :-2], x[:8, ..., 2:])
    np.testing.assert_array_equal(shifted[..., -1], x[:8, ..., -1])


def test_non_image_inputs_are_left_alone():
    model = matmul_mlp()
    assert [image_width_axis(s) for s in input_specs(model)] == [None]
    result = fit(model, model, Samples(random_inputs(model, 20)), FitConfig())
    assert result.report.augmentation == "none" and result.report.samples_augmented == 0
    teacher = vgg_net()
    student = prune_by_slicing(teacher, {"c2": np.arange(8)})
    report = fit(teacher, student, Samples(random_inputs(teacher, 40)), FitConfig()).report
    assert report.augmentation == "flip" and report.samples_augmented == report.samples_fit == 32


def _polish_available() -> bool:
    try:
        require_torch()
    except FskdError:
        return False
    return True


needs_polish = pytest.mark.skipif(not _polish_available(), reason="the polish extra (torch, onnx2torch) is not installed")


@needs_polish
def test_polish_writes_trained_weights_back_by_name():
    teacher = vgg_net()
    student = prune_by_slicing(teacher, {"c2": np.arange(8), "c3": np.arange(16)})
    feeds = random_inputs(teacher, 64)
    target = run(teacher, feeds)["logits"]
    result = polish_weights(student, feeds, target, steps=60, lr=3e-3, batch_size=32)
    # node for node the student, same initializer names and shapes; trained values differ
    assert [n.SerializeToString() for n in result.model.graph.node] == [n.SerializeToString() for n in student.graph.node]
    shapes = lambda m: {t.name: tuple(t.dims) for t in m.graph.initializer}  # noqa: E731
    assert shapes(result.model) == shapes(student)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in student.graph.initializer}
    changed = [t.name for t in result.model.graph.initializer if not np.array_equal(onnx.numpy_helper.to_array(t), before[t.name])]
    assert {"c1.w", "c2.w", "f2.w", "c1.bn.scale"} <= set(changed) and "c1.bn.mean" not in changed
    assert result.parameters == len(changed) and result.loss_last < result.loss_first
    error = lambda m: np.linalg.norm(run(m, feeds)["logits"] - target)  # noqa: E731
    assert error(result.model) < error(student)


@needs_polish
def test_fit_with_polish_reports_it_and_keeps_it_only_if_it_helps():
    teacher = vgg_net()
    student = prune_by_slicing(teacher, {"c2": np.arange(8), "c3": np.arange(16)})
    samples = Samples(random_inputs(teacher, 80))
    plain = fit(teacher, student, samples, FitConfig(reselect=False))
    polished = fit(teacher, student, samples, FitConfig(reselect=False, polish_steps=40, polish_lr=1e-3))
    p = polished.report.polish
    written = plain.report.written_in_sample.relative_error
    assert p["steps"] == 40 and p["relative_error_before"] == pytest.approx(written)
    if p["status"] == "kept":
        assert p["relative_error_after"] < p["relative_error_before"]
        assert polished.report.written_in_sample.relative_error == pytest.approx(p["relative_error_after"])
    else:
        assert polished.report.written_in_sample.relative_error == pytest.approx(written)
    assert polished.report.after == plain.report.after  # the guard's held-out figure is the closed form's
    assert [n.SerializeToString() for n in polished.model.graph.node] == [n.SerializeToString() for n in plain.model.graph.node]


def test_polish_without_the_extra_is_one_error_line(tmp_path, monkeypatch):
    teacher = vgg_net()
    paths = {name: tmp_path / f"{name}.onnx" for name in ("teacher", "student")}
    onnx.save(teacher, paths["teacher"])
    onnx.save(prune_by_slicing(teacher, {"c2": np.arange(8)}), paths["student"])
    np.save(tmp_path / "x.npy", random_inputs(teacher, 20)["input"])
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # import onnx2torch now raises ImportError
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fit", str(paths["teacher"]), "--student", str(paths["student"]), "--data",
                                       str(tmp_path / "x.npy"), "-o", str(out), "--polish", "5"])
    assert result.exit_code == 1 and not out.exists()
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "onnx-fskd[polish]" in lines[0]
