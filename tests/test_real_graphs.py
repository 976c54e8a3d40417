"""Graphs shaped like third-party exports: a BERT-style block (heads, Erf-GELU FFN, LayerNorm, masked mean
pooling) and an NHWC conv block wrapped in Transposes/Casts with decomposed BN. Prune, check exactness
against the teacher with the pruned channels zeroed, then fit and check the numbers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from cli.main import main
from compress_builders import run
from onnx_fskd.compress import decompose_model, prune_model
from onnx_fskd.compress.groups import find_groups
from onnx_fskd.costs import count_costs
from onnx_fskd.data import Samples
from onnx_fskd.errors import FskdError, UsageError
from onnx_fskd.graph import GraphIndex
from onnx_fskd.normalize import normalise
from onnx_fskd.pairing import MAP_METADATA_KEY
from onnx_fskd.pipeline import FitConfig, fit
from onnx_fskd.points import find_points
from transformer_builders import bert_block, nhwc_block, token_batch

WIDTH, HEADS, FFN = 16, 4, 32
HEAD = WIDTH // HEADS


def images(count: int, seed: int) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).normal(size=(count, 8, 8, 3)).astype(np.float32)}


def zeroed(teacher: onnx.ModelProto, rows: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The teacher with the given input rows of MatMul weights (or input columns of Conv weights) set to 0."""
    model = onnx.ModelProto()
    model.CopyFrom(teacher)
    for tensor in model.graph.initializer:
        if tensor.name in rows:
            value = numpy_helper.to_array(tensor).copy()
            if value.ndim == 2:
                value[rows[tensor.name]] = 0
            else:
                value[:, rows[tensor.name]] = 0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return model


def dropped(result, name: str, channels: int) -> np.ndarray:
    kept = next(e.kept for e in result.entries if e.student == name)
    return np.setdiff1d(np.arange(channels), kept)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def same_nodes(written: onnx.ModelProto, student: onnx.ModelProto) -> bool:
    """Node for node the student's graph; a Conv without bias may have gained a bias initializer."""
    if len(written.graph.node) != len(student.graph.node):
        return False
    for w, s in zip(written.graph.node, student.graph.node):
        extra = list(w.input[len(s.input):])
        if (w.name, w.op_type, list(w.input[:len(s.input)]), list(w.output)) != (s.name, s.op_type, list(s.input), list(s.output)):
            return False
        if extra and (w.op_type != "Conv" or len(s.input) != 2 or len(extra) != 1):
            return False
    return True


def test_bert_groups_heads_ffn_and_refused_residual_stream():
    groups = {g.root: g for g in find_groups(GraphIndex(normalise(bert_block())))}
    heads = groups["l0.q"]
    assert (heads.producers, heads.channels, heads.unit, heads.refused) == (["l0.q", "l0.k", "l0.v"], HEADS, HEAD, None)
    assert {e.node for e in heads.shape_edits} == {"l0.q.r", "l0.k.r", "l0.v.r", "l0.ctx.target"}
    assert (groups["l0.ffn1"].producers, groups["l0.ffn1"].refused) == (["l0.ffn1"], None)
    for root in ("l0.o", "l0.ffn2"):
        assert groups[root].refused.startswith("LayerNormalization '")


def test_pruned_bert_computes_the_teacher_with_pruned_heads_and_neurons_zeroed():
    teacher = bert_block()
    result = prune_model(teacher, 0.5, head_ratio=0.25)
    assert [n for n in result.notes if "LayerNormalization" in n] == [
        "l0.o: not pruned, LayerNormalization 'embed.ln' normalises over these channels (a residual stream: kept whole)",
        "l0.ffn2: not pruned, LayerNormalization 'l0.ln1' normalises over these channels (a residual stream: kept whole)"]
    student = GraphIndex(result.model)
    assert student.constant("l0.split").tolist() == [0, 0, 3, HEAD]                  # shared by Q, K and V
    assert student.constant("l0.width").tolist() == [3 * HEAD]                       # a piece of a run-time Concat
    assert student.constant("l0.q.w").shape == (WIDTH, 3 * HEAD) and student.constant("l0.o.w").shape == (3 * HEAD, WIDTH)
    assert student.constant("l0.ffn1.w").shape == (WIDTH, FFN // 2) and student.constant("l0.ffn2.w").shape == (FFN // 2, WIDTH)
    pruned_heads = dropped(result, "l0.q", WIDTH)
    assert len(pruned_heads) == HEAD and np.all(pruned_heads // HEAD == pruned_heads[0] // HEAD)
    reference = zeroed(teacher, {"l0.o.w": pruned_heads, "l0.ffn2.w": dropped(result, "l0.ffn1", FFN)})
    feeds = token_batch(16, seq=7)
    got, want = run(result.model, feeds)["embedding"], run(reference, feeds)["embedding"]
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    assert same_nodes(result.model, normalise(teacher))


def test_two_layers_get_one_head_group_each():
    result = prune_model(bert_block(layers=2), 0.5)
    kept = {e.student: len(e.kept) for e in result.entries if e.kept is not None}
    assert kept == {f"l{i}.{n}": size for i in (0, 1)
                    for n, size in (("q", 8), ("k", 8), ("v", 8), ("o", 16), ("ffn1", 16), ("ffn2", 16))}


def test_nhwc_block_prunes_through_transposes_casts_and_decomposed_bn():
    teacher = nhwc_block()
    result = prune_model(teacher, 0.5)
    assert any(n.startswith("stem, c2: coupled by a residual Add") for n in result.notes)
    student = GraphIndex(result.model)
    assert student.constant("c1.w").shape == (8, 8, 3, 3) and student.constant("c1.bn.scale").shape == (8,)
    reference = zeroed(teacher, {"c2.w": dropped(result, "c1", 16), "fc.w": dropped(result, "c3", 12)})
    feeds = images(8, 3)
    assert np.abs(run(result.model, feeds)["fc.bias"] - run(reference, feeds)["fc.bias"]).max() < 1e-4


def test_nhwc_points_see_through_layout_wrappers_to_the_residual_add():
    points = find_points(GraphIndex(nhwc_block())).by_name()
    c2 = points["c2"]
    assert [s.op_type for s in c2.chain] == ["Transpose", "Cast", "Add", "Sub", "Mul", "Add"]
    assert (c2.output, c2.channel_axis, c2.residual_skip) == ("c2.bn.add", 3, "stem.relu")


@pytest.mark.parametrize("solver", ["q", "full"])
def test_fit_recovers_pruned_bert_embedding(solver):
    teacher = bert_block()
    student = prune_model(teacher, 0.5, head_ratio=0.25).model
    result = fit(teacher, student, Samples(token_batch(256)), FitConfig(solver=solver))
    test = token_batch(128, seed=9)
    want = run(teacher, test)["embedding"]
    before, after = cosine(run(student, test)["embedding"], want), cosine(run(result.model, test)["embedding"], want)
    assert after > before + 0.03 and after > 0.9
    assert result.report.exactness < 1e-5
    assert {p.target for p in result.report.points if p.student in ("l0.o", "l0.ffn2")} == {"sum"}
    assert same_nodes(result.model, student)


def test_fit_nhwc_finds_channels_from_weights_and_residual_targets():
    teacher = nhwc_block()
    student = prune_model(teacher, 0.5, prune_residual=True).model
    del student.metadata_props[:]                    # no map: kept channels must come from the weights
    assert all(p.key != MAP_METADATA_KEY for p in student.metadata_props)
    result = fit(teacher, student, Samples(images(256, 0)), FitConfig(reselect=False))  # maps from weights
    report = result.report
    assert {p.channel_map for p in report.points if p.channels < p.teacher_channels} == {"weights"}
    assert not any(p.channel_map.startswith("activations") for p in report.points)
    assert next(p.target for p in report.points if p.student == "c2") == "sum"
    test = images(64, 5)
    want = run(teacher, test)["fc.bias"]
    error = {name: np.linalg.norm(run(m, test)["fc.bias"] - want) / np.linalg.norm(want)
             for name, m in (("student", student), ("fitted", result.model))}
    assert error["fitted"] < 0.5 * error["student"]
    assert report.exactness < 1e-5 and same_nodes(result.model, student)


def nhwc_dynamic() -> onnx.ModelProto:
    """The NHWC block with H and W left symbolic, as many exports declare them."""
    model = nhwc_block()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_param, dims[2].dim_param = "H", "W"
    return model


def test_macs_need_input_shapes_for_dynamic_sizes_and_count_through_wrappers():
    bert = count_costs(bert_block())
    assert bert.macs == 0 and "l0.q" in bert.unknown
    seq = 10
    fixed = count_costs(bert_block(), input_shapes={"input_ids": (2, seq), "attention_mask": (2, seq)})
    layers = {layer.name: layer.macs for layer in fixed.layers}
    assert layers["l0.q"] == 2 * seq * WIDTH * WIDTH and layers["l0.ffn2"] == 2 * seq * FFN * WIDTH
    assert layers["l0.qk"] == 2 * HEADS * seq * seq * HEAD and fixed.macs_per_sample == fixed.macs // 2
    assert count_costs(nhwc_dynamic()).unknown
    image = count_costs(nhwc_dynamic(), input_shapes={"input": (1, 8, 8, 3)})
    assert not image.unknown and image.macs == count_costs(nhwc_block()).macs
    assert {layer.name: layer.macs for layer in image.layers}["c1"] == 8 * 8 * 16 * 8 * 9


@pytest.mark.parametrize("shapes, message", [
    ({"ids": (1, 4)}, "'ids' is not an input of the model"),
    ({"input": (1, 8, 8)}, "'input' has rank 4, got 3 sizes"),
    ({"input": (1, 8, 8, 4)}, "'input' has size 3 on axis 3, got 4"),
])
def test_bad_input_shapes_are_usage_errors(shapes, message):
    with pytest.raises(UsageError, match=message):
        count_costs(nhwc_dynamic(), input_shapes=shapes)


def test_cli_input_shapes_on_prune_and_eval(tmp_path):
    teacher_path, student_path = tmp_path / "bert.onnx", tmp_path / "student.onnx"
    onnx.save(bert_block(), teacher_path)
    done = CliRunner().invoke(main, ["prune", str(teacher_path), "--ratio", "0.5", "--head-ratio", "0.25", "-o",
                                     str(student_path), "--input-shapes", "input_ids:1,10 attention_mask:[1,10]"])
    assert done.exit_code == 0, done.output
    student = count_costs(onnx.load(student_path), input_shapes={"input_ids": (1, 10), "attention_mask": (1, 10)})
    assert student.macs > 0 and f"{student.macs / 1e3:.3g}k" in done.output
    np.savez(tmp_path / "tokens.npz", **token_batch(8))
    json_path = tmp_path / "eval.json"
    done = CliRunner().invoke(main, ["eval", str(student_path), "--data", str(tmp_path / "tokens.npz"), "--reference",
                                     str(teacher_path), "--json", str(json_path), "--input-shapes", "input_ids:1,10",
                                     "--input-shapes", "attention_mask:1,10"])
    assert done.exit_code == 0, done.output
    assert json.loads(json_path.read_text())["macs"] == student.macs
    done = CliRunner().invoke(main, ["prune", str(teacher_path), "--ratio", "0.5", "-o", str(tmp_path / "x.onnx"),
                                     "--input-shapes", "input_ids=1,10"])
    assert done.exit_code == 2 and "expected NAME:DIM,DIM" in done.output and not (tmp_path / "x.onnx").exists()


def test_decompose_keeps_wrapped_ends_and_skips_rank_one():
    result = decompose_model(nhwc_block(), rank_ratio=0.5)
    notes = "\n".join(result.notes)
    assert "stem: kept, it reads the graph input 'input'" in notes
    assert "fc: kept, it writes the graph output 'fc.bias'" in notes
    assert {c.name for c in result.layers} == {"c1", "c2", "c3"}
    assert {c.after for c in decompose_model(bert_block(), rank_ratio=0.1).layers} == {"svd r=2"}
    with pytest.raises(FskdError, match="no layer to decompose: l0.q: skipped, svd at rank 1 would wreck it"):
        decompose_model(bert_block(), rank_ratio=0.05)
    assert {c.after for c in decompose_model(bert_block(), energy=0.05).layers} == {"svd r=1"}


def test_fit_bert_without_map_finds_kept_heads_and_neurons_from_weights():
    teacher = bert_block()
    student = prune_model(teacher, 0.5, head_ratio=0.25).model
    del student.metadata_props[:]
    report = fit(teacher, student, Samples(token_batch(128)), FitConfig(reselect=False)).report
    maps = {p.student: p.channel_map for p in report.points}
    assert {maps[name] for name in ("l0.q", "l0.k", "l0.v", "l0.ffn1")} == {"weights"}
    assert report.after.relative_error < report.before.relative_error
