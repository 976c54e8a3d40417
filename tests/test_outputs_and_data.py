"""Any model's outputs and inputs: every output compared, per-token agreement that ignores padding,
cosine for embeddings, folders of .npz batches of different lengths, and image crops and channel order."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from builders import IR_VERSION, OPSET
from onnx_fskd.cli.main import main
from onnx_fskd.data import ImageOptions, InputSpec, Samples, input_specs, load_samples
from onnx_fskd.errors import FskdError
from onnx_fskd.evaluation import evaluate
from onnx_fskd.metrics import choose_metric, cosine_similarity, top1_agreement

FEATURES, VOCAB, HIDDEN = 5, 7, 4


def token_model(seed: int) -> onnx.ModelProto:
    """logits = (x · mask) @ W per token, and an embedding = mean over tokens of (x · mask) @ E."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["x", "mask3"], ["masked"]),
        helper.make_node("MatMul", ["masked", "w"], ["logits"]),
        helper.make_node("MatMul", ["masked", "e"], ["tokens"]),
        helper.make_node("ReduceMean", ["tokens"], ["embedding"], axes=[1], keepdims=0),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((FEATURES, VOCAB)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32), "e"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2")]
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", FEATURES]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "S", VOCAB]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _numpy_outputs(model: onnx.ModelProto, x: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    masked = x.astype(np.float64) * mask[..., None]
    return {"logits": masked @ weights["w"], "embedding": (masked @ weights["e"]).mean(axis=1)}


def _token_samples(count: int, length: int, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    mask = (np.arange(length)[None, :] < rng.integers(2, length + 1, count)[:, None]).astype(np.int64)
    return Samples({"x": rng.standard_normal((count, length, FEATURES)).astype(np.float32), "attention_mask": mask})


def test_metric_choice_follows_the_output():
    model = token_model(0)
    assert choose_metric(model, "logits") == "top1"
    assert choose_metric(model, "embedding") == "cosine"
    assert choose_metric(model, "logits", "cosine") == "cosine"


def test_per_token_agreement_ignores_padding():
    rng = np.random.default_rng(1)
    ours, theirs = rng.standard_normal((2, 3, 4, VOCAB))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
    same = ours.argmax(2) == theirs.argmax(2)
    assert top1_agreement(ours, theirs, mask) == pytest.approx(same[mask].mean())
    assert top1_agreement(ours, theirs) == pytest.approx(same.mean())  # 12 positions, not 3 samples


def test_eval_compares_every_output_against_numpy():
    model, reference = token_model(0), token_model(1)
    samples = _token_samples(30, 6)
    x, mask = samples.arrays["x"], samples.arrays["attention_mask"]
    ours, theirs = _numpy_outputs(model, x, mask), _numpy_outputs(reference, x, mask)
    result = evaluate(model, samples, reference, ["CPUExecutionProvider"], batch_size=8, repeats=1)
    kept = mask.astype(bool)
    assert result.output == "logits" and result.metric == "top1"
    same = ours["logits"].argmax(2)[kept] == theirs["logits"].argmax(2)[kept]
    assert result.agreement == pytest.approx(np.mean(same))
    diff = ours["logits"][kept] - theirs["logits"][kept]
    assert result.outputs["logits"]["relative_error"] == pytest.approx(
        np.linalg.norm(diff) / np.linalg.norm(theirs["logits"][kept]), rel=1e-5)
    assert result.outputs["embedding"]["relative_error"] == pytest.approx(
        np.linalg.norm(ours["embedding"] - theirs["embedding"]) / np.linalg.norm(theirs["embedding"]), rel=1e-5)

    embedding = evaluate(model, samples, reference, ["CPUExecutionProvider"], repeats=1, output="embedding")
    a, b = ours["embedding"], theirs["embedding"]
    expected = np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    assert embedding.metric == "cosine" and embedding.agreement is None
    assert embedding.cosine == pytest.approx(expected, rel=1e-5)
    assert cosine_similarity(a, a) == pytest.approx(1.0)


def test_eval_unknown_output_is_an_error():
    with pytest.raises(FskdError, match="no such output"):
        evaluate(token_model(0), _token_samples(4, 3), token_model(1), repeats=1, output="hidden")


def test_npz_folder_of_variable_length_batches(tmp_path):
    model, reference = token_model(0), token_model(1)
    folder = tmp_path / "batches"
    folder.mkdir()
    batches = [_token_samples(5, length, seed) for seed, length in enumerate((3, 8, 5))]
    for index, batch in enumerate(batches):
        np.savez(folder / f"{index:02d}.npz", **batch.arrays)
    samples = load_samples(folder, input_specs(model))
    assert samples.arrays["x"].shape == (15, 8, FEATURES)
    assert samples.arrays["attention_mask"][:5, 3:].sum() == 0  # padding is masked
    onnx.save(model, tmp_path / "m.onnx")
    onnx.save(reference, tmp_path / "r.onnx")
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "m.onnx"), "--data", str(folder), "--reference",
                                       str(tmp_path / "r.onnx"), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    per_batch = [_numpy_outputs(m, b.arrays["x"], b.arrays["attention_mask"]) for b in batches
                 for m in (model, reference)]
    same = np.concatenate([(o["logits"].argmax(2) == r["logits"].argmax(2))[b.arrays["attention_mask"].astype(bool)]
                           for o, r, b in zip(per_batch[::2], per_batch[1::2], batches)])
    assert json.loads(result.stdout)["agreement"] == pytest.approx(same.mean())


def test_npz_folder_of_different_shapes_needs_an_attention_mask(tmp_path):
    folder = tmp_path / "batches"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.zeros((2, 3, FEATURES), np.float32))
    np.savez(folder / "b.npz", x=np.zeros((2, 4, FEATURES), np.float32))
    with pytest.raises(FskdError, match="no attention_mask input"):
        load_samples(folder, [InputSpec("x", np.dtype(np.float32), (None, None, FEATURES))])


def _image_spec(size: int = 4) -> list[InputSpec]:
    return [InputSpec("image", np.dtype(np.float32), (None, 3, size, size))]


def test_images_are_resized_by_the_shorter_side_then_centre_cropped(tmp_path):
    from PIL import Image

    wide = np.zeros((4, 10, 3), np.uint8)  # 4 high, 10 wide: the crop keeps columns 3..6
    wide[:, :, 0] = np.arange(10) * 20
    wide[:, :, 2] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    samples = load_samples(tmp_path, _image_spec(), images=ImageOptions(mean=(0.0,), std=(1.0,)))
    np.testing.assert_allclose(samples.arrays["image"][0, 0], np.tile(np.arange(3, 7) * 20 / 255, (4, 1)), rtol=1e-6)
    bgr = load_samples(tmp_path, _image_spec(), images=ImageOptions(channel_order="bgr"))
    np.testing.assert_allclose(bgr.arrays["image"][0, 0], np.ones((4, 4)))  # blue first
    np.testing.assert_allclose(bgr.arrays["image"][0, 2], samples.arrays["image"][0, 0])


def test_default_normalisation_warns_once(tmp_path):
    from PIL import Image

    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
                               helper.make_node("Flatten", ["pooled"], ["logits"])], "pool",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION),
              tmp_path / "m.onnx")
    for label, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        (tmp_path / "images" / str(label)).mkdir(parents=True)
        Image.new("RGB", (6, 4), colour).save(tmp_path / "images" / str(label) / "a.png")
    args = ["eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "images"), "--json", "-"]
    warned = CliRunner().invoke(main, args)
    assert warned.exit_code == 0, warned.output
    assert json.loads(warned.stdout)["accuracy"] == 1.0
    assert [line for line in warned.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: images from {tmp_path / 'images'} are scaled to [0, 1] with mean 0 and std 1; most pretrained "
        "models expect their training normalisation, e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"]
    quiet = CliRunner().invoke(main, args + ["--mean", "0.5", "--std", "0.5"])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr


def test_fit_reports_cosine_for_an_embedding_output(tmp_path):
    from builders import NetBuilder, prune_by_slicing, random_inputs

    b = NetBuilder(0)
    x = "input"
    for i, (cin, cout) in enumerate([(12, 32), (32, 16)]):
        w = b.rng.normal(0, np.sqrt(2.0 / cin), (cin, cout))
        x = b.node("Relu", f"t{i}.relu", [b.node("MatMul", f"t{i}", [x, b.const(f"t{i}.w", w)])])
    teacher = b.model(b.node("ReduceMean", "pool", [x], axes=[1], keepdims=0), (6, 12), 16, "embedder")
    onnx.save(teacher, tmp_path / "t.onnx")
    onnx.save(prune_by_slicing(teacher, {"t0": np.arange(0, 32, 2)}), tmp_path / "s.onnx")
    np.savez(tmp_path / "d.npz", **random_inputs(teacher, 80))
    result = CliRunner().invoke(main, ["fit", str(tmp_path / "t.onnx"), "--student", str(tmp_path / "s.onnx"),
                                       "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "r.onnx"),
                                       "--report", "-"])
    assert result.exit_code == 0, result.output
    before, after = (json.loads(result.stdout)[k] for k in ("before", "after"))
    assert before["metric"] == after["metric"] == "cosine" and after["agreement"] is None
    assert 0 < before["cosine"] < after["cosine"] <= 1
    assert "cosine similarity" in result.stderr and "top-1" not in result.stderr


def _plain_token_model(seed: int) -> onnx.ModelProto:
    """logits = x @ W per token, no attention mask."""
    w = np.random.default_rng(seed).standard_normal((FEATURES, VOCAB)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", FEATURES])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "S", VOCAB])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def test_eval_runs_each_npz_batch_at_its_own_length(tmp_path):
    import onnx_fskd

    model, reference = _plain_token_model(0), _plain_token_model(1)
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((4, length, FEATURES)).astype(np.float32) for length in (3, 9, 5)]
    (tmp_path / "batches").mkdir()
    for index, x in enumerate(batches):
        np.savez(tmp_path / "batches" / f"{index}.npz", x=x)
    weights = [numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64) for m in (model, reference)]
    same = np.concatenate([((x @ weights[0]).argmax(2) == (x @ weights[1]).argmax(2)).ravel() for x in batches])
    from_folder = onnx_fskd.evaluate(model, tmp_path / "batches", reference=reference, provider="cpu")
    from_feeds = onnx_fskd.evaluate(model, ({"x": x} for x in batches), reference=reference, provider="cpu")
    assert from_folder["agreement"] == pytest.approx(same.mean()) and from_folder["samples"] == 12
    assert from_feeds["agreement"] == from_folder["agreement"]
    with pytest.raises(FskdError, match="no attention_mask input"):  # fit stacks batches: padding needs a mask
        onnx_fskd.fit(model, _plain_token_model(3), tmp_path / "batches")
