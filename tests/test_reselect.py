"""Channel re-selection: a student that kept the useless channels gets the useful ones back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from builders import NetBuilder, prune_by_slicing
from compress_builders import run
from onnx_fskd.compress import prune_model
from onnx_fskd.data import Samples
from onnx_fskd.normalize import normalise
from onnx_fskd.pairing import read_map
from onnx_fskd.pipeline import FitConfig, fit
from onnx_fskd.reselect import reselect_channels
from onnx_fskd.pipeline import _analyse


def decoy_net(seed: int = 0) -> onnx.ModelProto:
    """conv1 (3→8): channels 4..7 have the largest filters (L1 keeps them) but conv2 barely reads them;
    channels 0..3 carry the signal. Then a 3×3 conv2, GAP, Gemm."""
    b = NetBuilder(seed)
    x = b.conv_bn_relu("conv1", "input", 3, 8, k=1)
    x = b.conv_bn_relu("conv2", x, 8, 6, k=3)
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    model = b.model(b.gemm("fc", x, 6, 4), (3, 6, 6), 4, "decoy")
    inits = {t.name: t for t in model.graph.initializer}
    w1 = onnx.numpy_helper.to_array(inits["conv1.w"]).copy()
    w1[4:] *= 10.0  # big filters: L1 prefers them
    w2 = onnx.numpy_helper.to_array(inits["conv2.w"]).copy()
    w2[:, 4:] *= 1e-3  # ...but the next layer hardly uses them
    for name, value in (("conv1.w", w1), ("conv2.w", w2)):
        inits[name].CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), name))
    return model


def samples(count: int = 96) -> Samples:
    return Samples({"input": np.random.default_rng(3).normal(size=(count, 3, 6, 6)).astype(np.float32)})


def test_reselection_replaces_the_useless_channels():
    teacher = decoy_net()
    student = prune_by_slicing(teacher, {"conv1": np.arange(4, 8)})  # no metadata: kept found from weights
    plan = _analyse(teacher, student, FitConfig(), None)
    result = reselect_channels(plan.teacher, plan.student, plan.pairs, samples().arrays, ["CPUExecutionProvider"], 32)
    line = next(g for g in result.groups if g.producers == ("conv1",))
    assert line.changed == 4 and line.error_after < 0.1 < line.error_before
    pair = next(p for p in result.pairs if p.student.name == "conv1")
    np.testing.assert_array_equal(pair.kept, np.arange(4))
    assert pair.source == "reselected"
    # only initializer values changed: same nodes, same initializer names and shapes
    assert [n.SerializeToString() for n in result.student.graph.node] == [n.SerializeToString() for n in plan.student.graph.node]
    old = {t.name: tuple(t.dims) for t in plan.student.graph.initializer}
    assert {t.name: tuple(t.dims) for t in result.student.graph.initializer} == old
    # the rewritten weights are the teacher's cut to the new channels: producer rows, BN, consumer columns
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.student.graph.initializer}
    t_inits = {t.name: onnx.numpy_helper.to_array(t) for t in plan.teacher.graph.initializer}
    np.testing.assert_array_equal(inits["conv1.w"], t_inits["conv1.w"][:4])
    np.testing.assert_array_equal(inits["conv1.bn.mean"], t_inits["conv1.bn.mean"][:4])
    np.testing.assert_array_equal(inits["conv2.w"], t_inits["conv2.w"][:, :4])
    assert set(result.initializers) >= {"conv1.w", "conv1.b", "conv1.bn.scale", "conv2.w"}


def test_fit_with_reselection_beats_fit_without():
    teacher = decoy_net()
    student = prune_by_slicing(teacher, {"conv1": np.arange(4, 8)})
    data = samples(120)
    plain = fit(teacher, student, data, FitConfig(reselect=False, solver="full"))
    chosen = fit(teacher, student, data, FitConfig(reselect=True, solver="full"))
    assert chosen.report.after.relative_error < 0.5 * plain.report.after.relative_error
    assert chosen.report.before.relative_error == pytest.approx(plain.report.before.relative_error)
    assert [g["changed"] for g in chosen.report.reselection if tuple(g["producers"]) == ("conv1",)] == [4]
    assert any(p.channel_map == "reselected" for p in chosen.report.points)
    assert [n.SerializeToString() for n in chosen.model.graph.node] == [n.SerializeToString() for n in normalise(student).graph.node]
    # the written model's own outputs confirm the report
    feeds = {"input": data.arrays["input"][:32]}
    t_out = run(teacher, feeds)["logits"]
    errors = [np.linalg.norm(run(m, feeds)["logits"] - t_out) for m in (plain.model, chosen.model)]
    assert errors[1] < 0.5 * errors[0]


def test_reselection_updates_our_map_and_leaves_a_good_choice_alone():
    teacher = decoy_net()
    pruned = prune_model(teacher, 0.5)  # L1 keeps the decoys 4..7 of conv1
    entries, _ = read_map(None, pruned.model)
    assert next(e.kept for e in entries if e.student == "conv1") == (4, 5, 6, 7)
    result = fit(teacher, pruned.model, samples(120), FitConfig())
    entries, _ = read_map(None, result.model)
    assert next(e.kept for e in entries if e.student == "conv1") == (0, 1, 2, 3)
    # a student that already keeps the useful channels is not touched
    good = prune_by_slicing(teacher, {"conv1": np.arange(4)})
    plan = _analyse(teacher, good, FitConfig(), None)
    again = reselect_channels(plan.teacher, plan.student, plan.pairs, samples().arrays, ["CPUExecutionProvider"], 32)
    assert again.changed == 0 and again.initializers == {}


def test_depthwise_pass_through_and_concat():
    """expansion → BN → ReLU → depthwise → BN → ReLU → projection; and a Concat of two pruned convs."""
    b = NetBuilder(5)
    x = b.conv_bn_relu("stem", "input", 3, 4, k=1)
    e = b.conv_bn_relu("expand", x, 4, 12, k=1)
    d = b.conv_bn_relu("dw", e, 12, 12, group=12)
    p = b.conv("project", d, 12, 6, k=1)
    a = b.conv_bn_relu("left", p, 6, 6, k=1)
    c = b.conv_bn_relu("right", p, 6, 6, k=1)
    cat = b.node("Concat", "cat", [a, c], axis=1)
    y = b.conv("mix", cat, 12, 5, k=1)
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [y])], axis=1)
    teacher = b.model(b.gemm("fc", x, 5, 3), (3, 6, 6), 3, "inverted")
    pruned = prune_model(teacher, 0.5, exclude="stem|project|mix")
    data = Samples({"input": np.random.default_rng(1).normal(size=(64, 3, 6, 6)).astype(np.float32)})
    plan = _analyse(teacher, pruned.model, FitConfig(), None)
    result = reselect_channels(plan.teacher, plan.student, plan.pairs, data.arrays, ["CPUExecutionProvider"], 32)
    lines = {g.producers: g for g in result.groups}
    assert set(lines) == {("expand",), ("left",), ("right",)}
    assert all(g.note == "" and g.error_after <= g.error_before for g in lines.values())
    # the channels up to the projection follow the teacher exactly (its input is unpruned)...
    kept = {p.student.name: p.kept for p in result.pairs}
    feeds = {"input": data.arrays["input"][:4]}
    t_act, s_act = run(plan.teacher, feeds, ["expand.bn", "dw.bn"]), run(result.student, feeds, ["expand.bn", "dw.bn"])
    for point, tensor in (("expand", "expand.bn"), ("dw", "dw.bn")):
        np.testing.assert_allclose(s_act[tensor], t_act[tensor][:, kept[point]], rtol=1e-4, atol=1e-5)
    # ...and past the Concat the weights are the teacher's cut to the new map, on both axes
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.student.graph.initializer}
    t_inits = {t.name: onnx.numpy_helper.to_array(t) for t in plan.teacher.graph.initializer}
    np.testing.assert_array_equal(inits["project.w"], t_inits["project.w"][:, kept["expand"]])
    np.testing.assert_array_equal(inits["left.w"], t_inits["left.w"][kept["left"]])
    np.testing.assert_array_equal(inits["mix.w"], t_inits["mix.w"][:, np.concatenate([kept["left"], 6 + kept["right"]])])


def test_prune_with_data_chooses_channels_from_the_data(tmp_path):
    from click.testing import CliRunner

    from cli.main import main

    teacher_path, data_path = tmp_path / "teacher.onnx", tmp_path / "x.npy"
    onnx.save(decoy_net(), teacher_path)
    np.save(data_path, samples(64).arrays["input"])
    kept = {}
    for name, extra in (("l1", []), ("data", ["--data", str(data_path)])):
        out = tmp_path / f"{name}.onnx"
        result = CliRunner().invoke(main, ["prune", str(teacher_path), "--ratio", "0.5", "-o", str(out)] + extra)
        assert result.exit_code == 0, result.output
        entries, _ = read_map(None, onnx.load(out))
        kept[name] = next(e.kept for e in entries if e.student == "conv1")
    assert kept == {"l1": (4, 5, 6, 7), "data": (0, 1, 2, 3)}
    assert "re-selection conv1: 4 of 4 kept channels changed" in result.output
    bad = CliRunner().invoke(main, ["prune", str(teacher_path), "--ratio", "0.5", "-o", str(tmp_path / "b.onnx"),
                                    "--data", str(tmp_path / "missing.npy")])
    assert bad.exit_code == 1 and bad.output.startswith("error:") and not (tmp_path / "b.onnx").exists()


def test_flatten_to_gemm_groups_choose_whole_channels():
    """conv (3→8) → ReLU → Flatten (8 channels × 4 positions) → Gemm: channels 4..7 are the decoys."""
    b = NetBuilder(4)
    x = b.node("Relu", "c.relu", [b.conv("c", "input", 3, 8, k=1)])
    teacher = b.model(b.gemm("fc", b.node("Flatten", "flat", [x], axis=1), 32, 5), (3, 2, 2), 5, "flat")
    inits = {t.name: t for t in teacher.graph.initializer}
    w, fc = onnx.numpy_helper.to_array(inits["c.w"]).copy(), onnx.numpy_helper.to_array(inits["fc.w"]).copy()
    w[4:] *= 10.0
    fc[:, 16:] *= 1e-3  # features 16..31 are channels 4..7
    for name, value in (("c.w", w), ("fc.w", fc)):
        inits[name].CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), name))
    student = prune_model(teacher, 0.5).model
    data = Samples({"input": np.random.default_rng(2).normal(size=(200, 3, 2, 2)).astype(np.float32)})
    plan = _analyse(teacher, student, FitConfig(), None)
    result = reselect_channels(plan.teacher, plan.student, plan.pairs, data.arrays, ["CPUExecutionProvider"], 64)
    assert [(g.producers, g.changed) for g in result.groups] == [(("c",), 4)]
    np.testing.assert_array_equal(next(p.kept for p in result.pairs if p.student.name == "c"), np.arange(4))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.student.graph.initializer}
    np.testing.assert_array_equal(inits["fc.w"], onnx.numpy_helper.to_array(
        {t.name: t for t in plan.teacher.graph.initializer}["fc.w"])[:, :16])


@pytest.mark.parametrize("case", ["nhwc", "bert"])
def test_reselection_on_nhwc_and_transformer_graphs(case):
    """Residual-coupled NHWC groups and transformer heads/FFN neurons: re-selection runs through them,
    the model stays node for node the student, and the held-out error is no worse than without it."""
    from transformer_builders import bert_block, nhwc_block, token_batch

    if case == "nhwc":
        teacher = nhwc_block()
        student = prune_model(teacher, 0.5, prune_residual=True).model
        shape = [d.dim_value for d in teacher.graph.input[0].type.tensor_type.shape.dim[1:]]
        data = Samples({teacher.graph.input[0].name: np.random.default_rng(0).normal(size=(256, *shape)).astype(np.float32)})
    else:
        teacher = bert_block()
        student = prune_model(teacher, 0.5, head_ratio=0.25).model
        data = Samples(token_batch(128))
    plain = fit(teacher, student, data, FitConfig(reselect=False)).report
    result = fit(teacher, student, data, FitConfig())
    assert result.report.reselection and all(g["note"] or g["error_after"] <= g["error_before"]
                                             for g in result.report.reselection)
    assert result.report.after.relative_error <= 1.05 * plain.after.relative_error
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in student.graph.node]


def test_greedy_with_a_factored_gram_matches_explicit_updates():
    """One feature per channel: the selection kept as a growing factor (G₀ − UᵀU) picks what explicit
    F×F Schur updates pick, and its residual Gram diagonal and cross terms are theirs."""
    from onnx_fskd.reselect import _ChannelObjective, _Consumer, _greedy, _objective

    rng = np.random.default_rng(7)
    features, rows = 40, 400
    x = rng.normal(size=(rows, features)) @ rng.normal(size=(features, features))
    z = np.hstack([x, np.ones((rows, 1))])
    consumers = [_Consumer(f"c{i}", "x", 1, np.arange(features).reshape(-1, 1), rng.normal(size=(out, features)))
                 for i, out in enumerate((7, 30))]
    problems = [_objective(c, z.T @ z) for c in consumers]
    assert all(isinstance(p, _ChannelObjective) for p in problems)
    chosen = _greedy(problems, features, 20)

    grams = [p.gram0.copy() for p in problems]
    crosses = [p.cross0.copy() for p in problems]
    free, picked = np.ones(features, dtype=bool), []
    for _ in range(20):
        gains = sum(np.sum(c ** 2, axis=0) / np.maximum(np.diag(g), 1e-30) / p.total
                    for g, c, p in zip(grams, crosses, problems))
        best = int(np.flatnonzero(free)[np.argmax(gains[free])])
        picked.append(best)
        free[best] = False
        for g, c in zip(grams, crosses):
            row = g[best].copy()
            c -= np.outer(c[:, best], row) / row[best]
            g -= np.outer(row, row) / row[best]
    np.testing.assert_array_equal(chosen, np.sort(picked))
    for problem, g, c in zip(problems, grams, crosses):
        np.testing.assert_allclose(problem._diag, np.diag(g), rtol=1e-8, atol=1e-8 * np.abs(g).max())
        np.testing.assert_allclose(problem._cross, c, rtol=1e-8, atol=1e-8 * np.abs(c).max())
