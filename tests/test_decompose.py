"""Low-rank decomposition: exact at full rank for every method, names and map kept, MACs cut, fit uses it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from builders import matmul_mlp, mobile_net, random_inputs, resnet_net, vgg_net
from onnx_fskd.cli.main import main
from compress_builders import concat_net, odd_conv_net, relative, run
from onnx_fskd.compress import decompose_model
from onnx_fskd.compress.factorize import (RankChoice, conv_spatial, conv_svd, conv_tucker2, linear_svd, spatial_matrix,
                                          svd_matrix, tucker_matrices)
from onnx_fskd.costs import count_costs
from onnx_fskd.data import Samples
from onnx_fskd.errors import FskdError, UsageError
from onnx_fskd.graph import GraphIndex
from onnx_fskd.pairing import read_map
from onnx_fskd.pipeline import fit
from onnx_fskd.points import find_points

NETS = {"vgg": vgg_net, "resnet": resnet_net, "concat": concat_net, "mlp": matmul_mlp, "odd": odd_conv_net,
        "mobile": mobile_net}
METHODS = ("svd", "tucker2", "spatial", "auto")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("net", sorted(NETS))
def test_full_rank_reproduces_the_teacher(net, method):
    teacher = NETS[net]()
    result = decompose_model(teacher, rank_ratio=1.0, method=method, keep_ends=False, require_saving=False)
    feeds = random_inputs(teacher, 4)
    assert relative(run(result.model, feeds)["logits"], run(teacher, feeds)["logits"]) < 1e-5
    assert result.layers  # something was decomposed
    if method in ("svd", "tucker2"):
        convs = [n for n in teacher.graph.node if n.op_type == "Conv"
                 and next((a.i for a in n.attribute if a.name == "group"), 1) == 1]
        assert {c.name for c in result.layers} >= {n.name for n in convs}


def test_factorisations_are_exact_at_full_rank():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(6, 5, 3, 4))
    full = RankChoice(ratio=1.0)
    r = full.rank(svd_matrix(weight))
    first, second = conv_svd(weight, r)
    assert r == 6 and np.allclose(np.einsum("or,rihw->oihw", second[:, :, 0, 0], first), weight)
    r1, r2 = (full.rank(m) for m in tucker_matrices(weight))
    head, core, tail = conv_tucker2(weight, r1, r2)
    rebuilt = np.einsum("oa,abhw,bi->oihw", tail[:, :, 0, 0], core, head[:, :, 0, 0])
    assert (r1, r2) == (5, 6) and np.allclose(rebuilt, weight)
    r = full.rank(spatial_matrix(weight))
    vertical, horizontal = conv_spatial(weight, r)
    assert r == 15 and np.allclose(np.einsum("rih,orw->oihw", vertical[..., 0], horizontal[:, :, 0]), weight)
    a, b = linear_svd(weight[:, :, 0, 0], 5)
    assert np.allclose(b @ a, weight[:, :, 0, 0])


def test_rank_from_ratio_and_energy():
    m = np.diag([4.0, 2.0, 1.0, 1.0])  # squared energy 16, 4, 1, 1 of 22
    assert RankChoice(ratio=0.5).rank(m) == 2 and RankChoice(ratio=0.01).rank(m) == 1
    assert RankChoice(energy=0.7).rank(m) == 1 and RankChoice(energy=0.9).rank(m) == 2
    assert RankChoice(energy=1.0).rank(m) == 4
    teacher = vgg_net()
    low, high = (decompose_model(teacher, energy=e, method="svd", require_saving=False) for e in (0.5, 0.999))
    rank = {c.name: int(c.after.split("=")[1]) for c in low.layers}
    assert all(int(c.after.split("=")[1]) >= rank[c.name] for c in high.layers)
    assert sum(int(c.after.split("=")[1]) for c in high.layers) > sum(rank.values())


def test_last_op_keeps_name_and_output_and_is_mapped():
    teacher = resnet_net()
    result = decompose_model(teacher, rank_ratio=0.5, method="svd")
    graph = GraphIndex(result.model)
    t_nodes = {n.name: n for n in teacher.graph.node}
    for change in result.layers:
        assert change.nodes[-1] == change.name and len(change.nodes) == 2
        assert list(graph.node_by_name[change.name].output) == list(t_nodes[change.name].output)
        assert graph.node_by_name[change.nodes[0]].op_type == change.op_type
    entries, source = read_map(None, result.model)
    assert source == "metadata" and entries == result.entries
    assert {e.teacher for e in entries} == {p.name for p in find_points(GraphIndex(teacher)).points}
    assert all(e.teacher == e.student and e.kept is None for e in entries)
    assert [v.name for v in result.model.graph.output] == ["logits"] and result.model.ir_version == teacher.ir_version


def test_macs_drop_and_useless_factorisations_are_skipped():
    teacher = matmul_mlp()
    result = decompose_model(teacher, rank_ratio=0.5, keep_ends=False)
    assert {c.name for c in result.layers} == {"m0", "m2"}
    assert any(note.startswith("m1: skipped") and "would not cut its MACs" in note for note in result.notes)
    with pytest.raises(FskdError, match="no layer to decompose.*m0: kept, it reads the graph input 'input'"):
        decompose_model(teacher, rank_ratio=0.5)
    teacher = vgg_net()
    result = decompose_model(teacher, rank_ratio=0.5)
    before, after = count_costs(teacher), count_costs(result.model)
    assert after.macs < 0.6 * before.macs and after.params < 0.7 * before.params


def test_first_and_last_layers_are_kept_by_default():
    teacher = vgg_net()
    names = {c.name for c in decompose_model(teacher, rank_ratio=0.5).layers}
    assert names == {"c2", "c3", "c4", "f1"}
    notes = decompose_model(teacher, rank_ratio=0.5).notes
    assert "c1: kept, it reads the graph input 'input' (--decompose-ends factorises it too)" in notes
    assert any(note.startswith("f2: kept, it writes the graph output 'logits'") for note in notes)
    assert {"c1", "f2"} <= {c.name for c in decompose_model(teacher, rank_ratio=0.5, keep_ends=False).layers}


def test_auto_takes_the_cheapest_method_per_layer():
    teacher = vgg_net()
    costs = {}
    for method in ("svd", "tucker2", "spatial"):
        result = decompose_model(teacher, rank_ratio=0.5, method=method, require_saving=False)
        macs = {layer.name: layer.macs for layer in count_costs(result.model).layers}
        costs[method] = {c.name: sum(macs[n] for n in c.nodes) for c in result.layers if c.op_type == "Conv"}
    auto = decompose_model(teacher, rank_ratio=0.5, method="auto")
    for change in auto.layers:
        if change.op_type == "Conv":
            chosen = change.after.split()[0]
            assert costs[chosen][change.name] == min(c[change.name] for c in costs.values() if change.name in c)


def test_depthwise_and_grouped_convs_are_skipped():
    result = decompose_model(mobile_net(), rank_ratio=0.5)
    assert any(note.startswith("dw1: skipped, grouped/depthwise") for note in result.notes)
    assert "dw1" not in {c.name for c in result.layers}


def test_fit_recovers_a_decomposed_student():
    teacher = resnet_net()
    student = decompose_model(teacher, rank_ratio=0.5, method="svd").model
    report = fit(teacher, student, Samples(random_inputs(teacher, 128, seed=1))).report
    assert {p.student for p in report.points} == {p.name for p in find_points(GraphIndex(teacher)).points}
    assert report.after.relative_error < report.before.relative_error


@pytest.mark.parametrize("options, message", [
    ({}, "exactly one of --rank-ratio and --energy"),
    ({"rank_ratio": 0.5, "energy": 0.9}, "exactly one of"),
    ({"rank_ratio": 0.0}, "--rank-ratio must be in"),
    ({"rank_ratio": 1.5}, "--rank-ratio must be in"),
    ({"energy": 0.0}, "--energy must be in"),
    ({"rank_ratio": 0.5, "method": "cp"}, "--method must be one of"),
])
def test_bad_options_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message):
        decompose_model(vgg_net(), **options)


def test_nothing_to_decompose():
    teacher = mobile_net()
    kept = [n for n in teacher.graph.node if n.name in ("dw1",)]
    with pytest.raises(FskdError, match="no layer to decompose.*dw1: skipped, grouped/depthwise"):
        decompose_model(_only(teacher, kept), rank_ratio=0.5, keep_ends=False)


def _only(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """A one-node model: ``nodes[0]`` between the model's input and a new output."""
    node = onnx.NodeProto()
    node.CopyFrom(nodes[0])
    node.input[0] = "input"
    node.output[0] = "logits"
    used = set(node.input)
    graph = onnx.helper.make_graph([node], "one", list(model.graph.input),
                                   [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)],
                                   [t for t in model.graph.initializer if t.name in used])
    dw = GraphIndex(model).constant(node.input[1]).shape[0]
    graph.input[0].type.tensor_type.shape.dim[1].dim_value = dw
    return onnx.helper.make_model(graph, ir_version=model.ir_version, opset_imports=list(model.opset_import))


def test_cli_decompose(tmp_path):
    model_path, out = tmp_path / "teacher.onnx", tmp_path / "student.onnx"
    onnx.save(vgg_net(), model_path)
    runner = CliRunner()
    done = runner.invoke(main, ["decompose", str(model_path), "--rank-ratio", "0.5", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert "c2" in done.output and "total" in done.output and "c1: kept" in done.output
    assert onnx.load(str(out)).ir_version == 10
    ends = runner.invoke(main, ["decompose", str(model_path), "--rank-ratio", "0.5", "-o", str(out), "--force",
                                "--decompose-ends", "--method", "svd"])
    assert ends.exit_code == 0 and "c1: kept" not in ends.output
    assert {"c1/svd.0", "f2/svd.0"} <= {n.name for n in onnx.load(str(out)).graph.node}
    bad = runner.invoke(main, ["decompose", str(model_path), "-o", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2 and "exactly one of --rank-ratio and --energy" in bad.output
