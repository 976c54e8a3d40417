"""evaluate() and `onnx-fskd eval` against independent numpy computations, and their error paths."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_fskd.cli.eval_cmd import eval_command
from onnx_fskd.data import Samples
from onnx_fskd.errors import FskdError
from onnx_fskd.evaluation import evaluate

FEATURES, CLASSES, COUNT = 6, 4, 50
RNG = np.random.default_rng(0)


def _weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((FEATURES, CLASSES)).astype(np.float32), rng.standard_normal(CLASSES).astype(np.float32)


def _gemm(weights, bias, batch="N", features=FEATURES, output="y", flatten_from=None) -> onnx.ModelProto:
    """A single Gemm classifier (optionally after Flatten), so numpy can compute its logits exactly."""
    shape = [batch, *flatten_from] if flatten_from else [batch, features]
    nodes = [helper.make_node("Gemm", ["flat" if flatten_from else "x", "w", "b"], [output])]
    if flatten_from:
        nodes.insert(0, helper.make_node("Flatten", ["x"], ["flat"]))
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, CLASSES])],
                              [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _labelled_samples(weights, bias) -> tuple[Samples, float]:
    """Samples whose labels are right for about two thirds, and the accuracy numpy expects for them."""
    x = RNG.standard_normal((COUNT, FEATURES)).astype(np.float32)
    predicted = np.argmax(x.astype(np.float64) @ weights + bias, axis=1)
    labels = np.where(np.arange(COUNT) % 3 == 0, (predicted + 1) % CLASSES, predicted)
    return Samples({"x": x}, labels), float(np.mean(predicted == labels))


def test_accuracy_matches_numpy_argmax():
    weights, bias = _weights(1)
    samples, expected = _labelled_samples(weights, bias)
    result = evaluate(_gemm(weights, bias), samples, batch_size=16, repeats=2)
    assert result.accuracy == pytest.approx(expected)
    assert 0.0 < result.accuracy < 1.0
    assert result.agreement is None and result.relative_error is None
    assert result.params == FEATURES * CLASSES + CLASSES
    assert result.macs == FEATURES * CLASSES
    assert result.samples == COUNT and result.provider == "cpu"


def test_model_against_itself_agrees_fully():
    model = _gemm(*_weights(1))
    samples = Samples({"x": RNG.standard_normal((COUNT, FEATURES)).astype(np.float32)})
    result = evaluate(model, samples, reference=model, repeats=1)
    assert result.agreement == 1.0 and result.relative_error == 0.0 and result.accuracy is None


def test_agreement_and_error_against_another_model_match_numpy():
    (w1, b1), (w2, b2) = _weights(1), _weights(2)
    x = RNG.standard_normal((COUNT, FEATURES)).astype(np.float32)
    ours, theirs = x.astype(np.float64) @ w1 + b1, x.astype(np.float64) @ w2 + b2
    result = evaluate(_gemm(w1, b1), Samples({"x": x}), reference=_gemm(w2, b2, batch=10), batch_size=7, repeats=1)
    assert result.agreement == pytest.approx(np.mean(ours.argmax(1) == theirs.argmax(1)))
    assert result.relative_error == pytest.approx(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs), rel=1e-5)


@pytest.mark.parametrize("batch, batch_size, keys", [
    ("N", 16, {"batch_1", "batch_16"}),
    ("N", 1, {"batch_1"}),
    (8, 16, {"batch_8"}),
    (1, 16, {"batch_1"}),
])
def test_latency_keys_follow_batch_dims(batch, batch_size, keys):
    weights, bias = _weights(1)
    samples, _ = _labelled_samples(weights, bias)
    result = evaluate(_gemm(weights, bias, batch=batch), samples, batch_size=batch_size, repeats=2)
    assert set(result.latency_ms) == keys and all(ms > 0 for ms in result.latency_ms.values())
    assert result.macs == FEATURES * CLASSES  # per sample, whatever the fixed batch


def test_json_has_exactly_the_documented_keys():
    weights, bias = _weights(1)
    samples, _ = _labelled_samples(weights, bias)
    report = evaluate(_gemm(weights, bias), samples, repeats=1).to_json()
    assert set(report) == {"accuracy", "agreement", "cosine", "relative_error", "output", "metric", "outputs",
                           "params", "macs", "latency_ms", "samples", "provider"}
    json.dumps(report)


@pytest.mark.parametrize("reference, message", [
    (_gemm(*_weights(1), features=FEATURES + 1), "reference inputs differ"),
    (_gemm(*_weights(1), output="logits"), "reference outputs differ"),
])
def test_mismatched_reference_is_refused(reference, message):
    samples = Samples({"x": RNG.standard_normal((COUNT, FEATURES)).astype(np.float32)})
    with pytest.raises(FskdError, match=message):
        evaluate(_gemm(*_weights(1)), samples, reference=reference)


def test_nothing_to_compare_is_an_error():
    samples = Samples({"x": RNG.standard_normal((COUNT, FEATURES)).astype(np.float32)})
    with pytest.raises(FskdError, match="nothing to compare: samples carry no labels and no --reference given"):
        evaluate(_gemm(*_weights(1)), samples)


# ---- CLI ----

@pytest.fixture
def files(tmp_path):
    """Student and teacher models, labelled .npz samples, and the accuracy numpy expects for the student."""
    weights, bias = _weights(1)
    samples, expected = _labelled_samples(weights, bias)
    onnx.save(_gemm(weights, bias), tmp_path / "student.onnx")
    onnx.save(_gemm(*_weights(2)), tmp_path / "teacher.onnx")
    np.savez(tmp_path / "samples.npz", x=samples.arrays["x"], labels=samples.labels)
    np.save(tmp_path / "unlabelled.npy", samples.arrays["x"])
    return tmp_path, expected


def _run(*args: str):
    return CliRunner().invoke(eval_command, [str(a) for a in args])


def test_cli_prints_table_and_writes_json(files):
    tmp, expected = files
    out = tmp / "report.json"
    result = _run(tmp / "student.onnx", "--data", tmp / "samples.npz", "--reference", tmp / "teacher.onnx",
                  "--json", out, "--batch-size", "8", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.stdout and "latency batch 8" in result.stdout
    report = json.loads(out.read_text())
    assert report["accuracy"] == pytest.approx(expected)
    assert set(report["latency_ms"]) == {"batch_1", "batch_8"} and report["samples"] == COUNT


def test_cli_without_labels_uses_reference_only(files):
    tmp, _ = files
    result = _run(tmp / "student.onnx", "--data", tmp / "unlabelled.npy", "--reference", tmp / "student.onnx",
                  "--num-samples", "10")
    assert result.exit_code == 0, result.output
    assert "no labels" in result.stdout and "100.00%" in result.stdout


def test_cli_reads_image_folder_with_image_options(tmp_path):
    """Constant-colour images make the preprocessed tensor exact, so numpy can compute the logits."""
    from PIL import Image

    size, channels = 3, 3
    bias = _weights(3)[1]
    weights = np.random.default_rng(3).standard_normal((channels * size * size, CLASSES)).astype(np.float32)
    onnx.save(_gemm(weights, bias, flatten_from=(channels, size, size)), tmp_path / "m.onnx")
    pixels = {"a": [(10, 200, 30), (250, 0, 120)], "b": [(0, 0, 0), (90, 90, 255)]}
    logits, labels = [], []
    for label, (folder, colours) in enumerate(sorted(pixels.items())):
        (tmp_path / "images" / folder).mkdir(parents=True)
        for index, colour in enumerate(colours):
            Image.new("RGB", (7, 5), colour).save(tmp_path / "images" / folder / f"{index}.png")
            x = (np.asarray(colour, np.float64) / 255 - 0.5) / 0.25
            logits.append(np.repeat(x, size * size) @ weights + bias)
            labels.append(label)
    expected = float(np.mean(np.argmax(logits, axis=1) == labels))
    out = tmp_path / "r.json"
    result = _run(tmp_path / "m.onnx", "--data", tmp_path / "images", "--image-size", f"{size}x{size}",
                  "--mean", "0.5", "--std", "0.25,0.25,0.25", "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("make_args, message", [
    (lambda t: ["--data", t / "samples.npz", "--reference", t / "missing.onnx"], "missing.onnx"),
    (lambda t: ["--data", t / "samples.npz", "--reference", t / "wide.onnx"], "reference inputs differ"),
    (lambda t: ["--data", t / "unlabelled.npy"], "nothing to compare"),
    (lambda t: ["--data", t / "narrow.npy"], "expects shape"),
    (lambda t: ["--data", t / "samples.npz", "--json", t / "no_such_dir" / "r.json"], "does not exist"),
])
def test_cli_errors_are_one_line_and_exit_1(files, make_args, message):
    tmp, _ = files
    onnx.save(_gemm(*_weights(1), features=FEATURES + 1), tmp / "wide.onnx")
    np.save(tmp / "narrow.npy", np.zeros((4, FEATURES - 1), np.float32))
    result = _run(tmp / "student.onnx", *make_args(tmp))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_cli_rejects_malformed_image_size(files):
    tmp, _ = files
    result = _run(tmp / "student.onnx", "--data", tmp / "samples.npz", "--image-size", "4y4")
    assert result.exit_code == 2 and "HxW" in result.stderr
