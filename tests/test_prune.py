"""Structured channel pruning by dependency groups: exact where nothing upstream changed, map in metadata,
fit uses it, the CLI, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from builders import matmul_mlp, mobile_net, random_inputs, resnet_net, vgg_net
from onnx_fskd.cli.main import main
from compress_builders import concat_net, relative, reshape_net, run, se_net, separable_net, single_gemm
from onnx_fskd.compress import CompressResult, prune_model
from onnx_fskd.costs import count_costs
from onnx_fskd.data import Samples
from onnx_fskd.errors import FskdError, UsageError
from onnx_fskd.evaluation import evaluate
from onnx_fskd.graph import GraphIndex
from onnx_fskd.ops import linear_op_for
from onnx_fskd.pairing import MAP_METADATA_KEY, read_map
from onnx_fskd.pipeline import FitConfig, fit
from onnx_fskd.points import find_points

CASES = {
    "vgg": (vgg_net, {}),
    "resnet": (resnet_net, {}),
    "resnet-prune-residual": (resnet_net, {"prune_residual": True}),
    "concat": (concat_net, {}),
    "separable": (separable_net, {}),
    "mlp": (matmul_mlp, {}),
    "se": (se_net, {}),
    "se-prune-residual": (se_net, {"prune_residual": True}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pruned(request) -> tuple[str, onnx.ModelProto, CompressResult]:
    build, options = CASES[request.param]
    teacher = build()
    return request.param, teacher, prune_model(teacher, 0.5, **options)


def kept_map(result: CompressResult) -> dict[str, np.ndarray]:
    return {e.student: np.asarray(e.kept) for e in result.entries}


def major(graph: GraphIndex, node: onnx.NodeProto) -> np.ndarray:
    return linear_op_for(node).to_output_major(node, graph.constant(node.input[1]))


def unread_inputs_zeroed(teacher: onnx.ModelProto, student: onnx.ModelProto, kept: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The teacher with every weight column the student dropped set to 0, found by matching weight columns
    (independently of the grouping): the pruned channels then reach nothing, so this model must compute
    exactly what the student computes."""
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(teacher)
    t_graph, s_graph = GraphIndex(zeroed), GraphIndex(student)
    for node in t_graph.nodes:
        if linear_op_for(node) is None or t_graph.constant(node.input[1]) is None:
            continue
        w_t, w_s = major(t_graph, node), major(s_graph, s_graph.node_by_name[node.name])
        if w_t.shape[1] == w_s.shape[1]:
            continue
        rows = w_t[kept[node.name]] if node.name in kept else w_t
        columns = {np.ascontiguousarray(rows[:, i]).tobytes(): i for i in range(rows.shape[1])}
        read = [columns[np.ascontiguousarray(w_s[:, j]).tobytes()] for j in range(w_s.shape[1])]
        assert len(set(read)) == len(read)
        w_t = w_t.copy()
        w_t[:, np.setdiff1d(np.arange(w_t.shape[1]), read)] = 0
        value = linear_op_for(node).from_output_major(node, w_t)
        t_graph.initializers[node.input[1]].CopyFrom(numpy_helper.from_array(value, node.input[1]))
    return zeroed


def clean_points(teacher: onnx.ModelProto, student: onnx.ModelProto):
    """Student points whose input nothing upstream changed (every layer above reads all its teacher inputs)."""
    t_graph, s_graph = GraphIndex(teacher), GraphIndex(student)
    clean = set(s_graph.graph_inputs) | set(s_graph.initializers)
    for node in s_graph.nodes:
        ok = all(name in clean for name in node.input if name)
        if ok and linear_op_for(node) is not None and s_graph.constant(node.input[1]) is not None:
            ok = major(s_graph, node).shape[1] == major(t_graph, t_graph.node_by_name[node.name]).shape[1]
        if ok:
            clean.update(node.output)
    return [p for p in find_points(s_graph).points if p.output in clean]


def test_pruned_model_is_exact_where_nothing_upstream_changed(pruned):
    name, teacher, result = pruned
    student, kept = result.model, kept_map(result)
    feeds = random_inputs(teacher, 8)
    points = clean_points(teacher, student)
    assert points, name
    outs_t = run(teacher, feeds, [p.output for p in points])
    outs_s = run(student, feeds, [p.output for p in points])
    compared = 0
    for point in points:
        expected = np.take(outs_t[point.output], kept[point.name], axis=point.channel_axis)
        assert outs_s[point.output].shape == expected.shape
        assert relative(outs_s[point.output], expected) < 1e-5, (name, point.name)
        compared += len(kept[point.name]) < outs_t[point.output].shape[point.channel_axis]
    assert compared, f"{name}: no pruned layer was compared"
    # End to end: the student is the teacher with the dropped channels unread.
    reference = run(unread_inputs_zeroed(teacher, student, kept), feeds)["logits"]
    assert relative(outs_s["logits"], reference) < 1e-5, name


def test_graph_interface_names_and_versions_kept(pruned):
    name, teacher, result = pruned
    student = result.model
    assert [n.name for n in student.graph.node] == [n.name for n in teacher.graph.node]
    assert [n.op_type for n in student.graph.node] == [n.op_type for n in teacher.graph.node]
    for kind in ("input", "output"):
        assert [v.SerializeToString() for v in getattr(student.graph, kind)] == \
               [v.SerializeToString() for v in getattr(teacher.graph, kind)], (name, kind)
    assert student.ir_version == teacher.ir_version
    assert [(o.domain, o.version) for o in student.opset_import] == [(o.domain, o.version) for o in teacher.opset_import]


def test_metadata_map_lists_every_point_with_its_kept_channels(pruned):
    name, teacher, result = pruned
    entries, source = read_map(None, result.model)
    assert source == "metadata" and entries == result.entries
    s_points = find_points(GraphIndex(result.model)).by_name()
    t_points = find_points(GraphIndex(teacher)).by_name()
    assert {e.student for e in entries} == set(s_points)
    for entry in entries:
        kept = np.asarray(entry.kept)
        assert entry.teacher == entry.student
        assert len(kept) == s_points[entry.student].channels
        assert np.all(np.diff(kept) > 0) and kept.min() >= 0 and kept.max() < t_points[entry.teacher].channels
    prop = [p for p in result.model.metadata_props if p.key == MAP_METADATA_KEY]
    assert len(prop) == 1 and json.loads(prop[0].value)["format"] == "onnx-fskd-map"


def test_params_and_macs_drop_as_asked():
    teacher = vgg_net()
    result = prune_model(teacher, 0.5)
    shapes = {c.name: (c.before, c.after) for c in result.layers}
    assert shapes == {"c1": ("3→16", "3→8"), "c2": ("16→16", "8→8"), "c3": ("16→32", "8→16"),
                      "c4": ("32→32", "16→16"), "f1": ("512→48", "256→24"), "f2": ("48→10", "24→10")}
    before, after = count_costs(teacher), count_costs(result.model)
    assert after.params < 0.3 * before.params and after.macs < 0.3 * before.macs
    assert any("f2" in note and "graph output" in note for note in result.notes)


def test_kept_channels_follow_l1_norms():
    teacher = vgg_net()
    graph = GraphIndex(teacher)
    norms = np.abs(graph.constant("c1.w")).reshape(16, -1).sum(axis=1)
    result = prune_model(teacher, 0.5)
    assert kept_map(result)["c1"].tolist() == sorted(np.argsort(-norms)[:8].tolist())


def test_bn_criterion_reads_gamma():
    teacher = vgg_net()
    gamma = np.array([0.1, 2, 0.2, 3, 0.3, 4, 0.4, 5, 0.5, 6, 0.6, 7, 0.7, 8, 0.8, 9], dtype=np.float32)
    GraphIndex(teacher).initializers["c1.bn.scale"].CopyFrom(numpy_helper.from_array(-gamma, "c1.bn.scale"))
    result = prune_model(teacher, 0.5, criterion="bn")
    assert kept_map(result)["c1"].tolist() == list(range(1, 16, 2))  # by |γ|


def test_random_criterion_is_seeded():
    teacher = vgg_net()
    first, again, other = (kept_map(prune_model(teacher, 0.5, criterion="random", seed=s))["c3"] for s in (1, 1, 2))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_residual_groups_are_kept_unless_asked():
    teacher = resnet_net()
    kept = kept_map(prune_model(teacher, 0.5))
    assert len(kept["stem"]) == 16 and len(kept["b1.c2"]) == 16 and len(kept["b2.proj"]) == 32
    assert len(kept["b1.c1"]) == 8 and len(kept["b2.c1"]) == 16
    result = prune_model(teacher, 0.5, prune_residual=True)
    kept = kept_map(result)
    assert len(kept["stem"]) == 8 and np.array_equal(kept["stem"], kept["b1.c2"])
    assert len(kept["b2.proj"]) == 16 and np.array_equal(kept["b2.proj"], kept["b2.c2"])
    assert not any("coupled" in note for note in result.notes)


def test_depthwise_passes_channels_and_shrinks_group():
    teacher = separable_net()
    result = prune_model(teacher, 0.5)
    kept = kept_map(result)
    assert np.array_equal(kept["dw1"], kept["stem"]) and np.array_equal(kept["dw2"], kept["pw1"])
    groups = {n.name: next(a.i for a in n.attribute if a.name == "group") for n in result.model.graph.node if n.name in ("dw1", "dw2")}
    assert groups == {"dw1": 8, "dw2": 12}


def test_gate_joins_the_group_but_only_a_residual_add_keeps_it():
    result = prune_model(se_net(), 0.5)
    kept = kept_map(result)
    assert len(kept["expand"]) == 12 and np.array_equal(kept["expand"], kept["se.expand"])
    assert np.array_equal(kept["dw"], kept["expand"]) and len(kept["se.reduce"]) == 3
    assert len(kept["project"]) == 8 and len(kept["stem"]) == 8
    assert any(note.startswith("stem, project: coupled by a residual Add") for note in result.notes)


def test_grouped_conv_is_refused_with_its_name():
    result = prune_model(mobile_net(), 0.5)
    assert any("grouped Conv 'gc1'" in note for note in result.notes)


def test_round_to_global_and_exclude():
    teacher = concat_net()
    counts = {c.name: int(c.after.split("→")[1]) for c in prune_model(teacher, 0.3, round_to=4).layers if c.name != "fc"}
    assert all(count % 4 == 0 for count in counts.values()), counts
    result = prune_model(teacher, 0.5, global_=True)
    channels = [(int(c.before.split("→")[1]), int(c.after.split("→")[1])) for c in result.layers if c.name != "fc"]
    assert sum(b - a for b, a in channels) == sum(b for b, _ in channels) // 2
    assert all(a >= 1 for _, a in channels)
    result = prune_model(teacher, 0.5, exclude=r"^br\d$")
    layers = {c.name: c for c in result.layers}
    assert layers["br1"].before.split("→")[1] == layers["br1"].after.split("→")[1]
    assert any("excluded" in note for note in result.notes)


def test_fit_uses_the_map_and_recovers():
    teacher = vgg_net()
    student = prune_model(teacher, 0.5).model
    samples = Samples(random_inputs(teacher, 128, seed=1))
    report = fit(teacher, student, samples, FitConfig(reselect=False)).report
    assert report.points and {p.channel_map for p in report.points} == {"metadata"}
    assert report.after.relative_error < report.before.relative_error


def test_prune_fit_eval_round_trip(tmp_path):
    teacher = resnet_net()
    student = prune_model(teacher, 0.5, prune_residual=True).model
    result = fit(teacher, student, Samples(random_inputs(teacher, 128, seed=1)))
    test = Samples(random_inputs(teacher, 64, seed=2))
    before, after = (evaluate(m, test, teacher, ["CPUExecutionProvider"], repeats=1) for m in (student, result.model))
    assert after.relative_error < before.relative_error
    assert after.params < count_costs(teacher).params and after.macs == before.macs


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_range_is_a_usage_error(ratio):
    with pytest.raises(UsageError, match="--ratio must be in"):
        prune_model(vgg_net(), ratio)


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="criterion"):
        prune_model(vgg_net(), 0.5, criterion="l3")
    with pytest.raises(UsageError, match="regular expression"):
        prune_model(vgg_net(), 0.5, exclude="c(")


def test_no_prunable_layer():
    with pytest.raises(FskdError, match="no prunable layer.*graph output 'logits'"):
        prune_model(single_gemm(), 0.5)


def test_reshape_that_mixes_channels_is_refused_with_its_name():
    with pytest.raises(FskdError, match="no prunable layer.*Reshape 'mix' mixes these channels"):
        prune_model(reshape_net(mixing=True), 0.5)
    result = prune_model(reshape_net(extra_conv=True, mixing=True), 0.5)
    assert [note for note in result.notes if "Reshape" in note] == ["c1: not pruned, Reshape 'mix' mixes these channels with other axes"]
    assert len(kept_map(result)["c0"]) == 4


def test_flattening_reshape_is_followed_and_its_shape_rewritten():
    teacher = reshape_net()
    result = prune_model(teacher, 0.5)
    student = GraphIndex(result.model)
    assert student.constant("shape").tolist() == [-1, 4 * 6 * 6]
    assert student.constant("fc.w").shape == (10, 4 * 6 * 6)
    x = random_inputs(teacher, 4)
    assert run(result.model, x)["logits"].shape == (4, 10)


def test_cli_prune_writes_model_and_table(tmp_path):
    model_path, out = tmp_path / "teacher.onnx", tmp_path / "student.onnx"
    onnx.save(resnet_net(), model_path)
    runner = CliRunner()
    done = runner.invoke(main, ["prune", str(model_path), "--ratio", "0.5", "-o", str(out), "--prune-residual"])
    assert done.exit_code == 0, done.output
    assert "b1.c1" in done.output and "total" in done.output and "wrote" in done.output
    written = onnx.load(str(out))
    assert written.ir_version == 10 and read_map(None, written)[1] == "metadata"
    again = runner.invoke(main, ["prune", str(model_path), "--ratio", "0.5", "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    bad = runner.invoke(main, ["prune", str(model_path), "--ratio", "1", "-o", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2 and "error: --ratio must be in [0, 1)" in bad.output
    onnx.save(single_gemm(), tmp_path / "gemm.onnx")
    none = runner.invoke(main, ["prune", str(tmp_path / "gemm.onnx"), "--ratio", "0.5", "-o", str(tmp_path / "y.onnx")])
    assert none.exit_code == 1 and "no prunable layer" in none.output
