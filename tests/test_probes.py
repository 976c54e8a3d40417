"""In-graph statistics (probes.py) against the float64 NumPy reference (stats.GramStats), and the fit
that uses them against the host path: same points kept, same Q, same held-out errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_fskd.pipeline as pipeline
import onnx_fskd.probes as probes
import onnx_fskd.runtime as runtime
import onnx_fskd.sampling as sampling
from builders import IR_VERSION, OPSET, NetBuilder, mobile_net, prune_by_slicing, random_inputs, resnet_net, token_mlp, vgg_net
from onnx_fskd.correct import full_form
from onnx_fskd.data import Samples
from onnx_fskd.features import point_features
from onnx_fskd.graph import GraphIndex
from onnx_fskd.pipeline import FitConfig, fit
from onnx_fskd.points import find_points
from onnx_fskd.probes import ProbeFeeds, StatsProbe, probe_blocker
from onnx_fskd.runtime import make_session, run_batched
from onnx_fskd.sampling import grid_node, position_stride, sample_positions
from onnx_fskd.segments import SegmentRunner
from onnx_fskd.stats import GramStats, MappedGramStats, as_planes
from test_fit import outputs, perturbed
from transformer_builders import bert_block, nhwc_block

CPU = ["CPUExecutionProvider"]


def inputs_for(model: onnx.ModelProto, count: int) -> dict[str, np.ndarray]:
    """Random samples for every graph input (token ids and masks for the BERT block)."""
    rng = np.random.default_rng(1)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value or 6 for d in value.type.tensor_type.shape.dim[1:]]
        if value.type.tensor_type.elem_type == TensorProto.INT64:
            feeds[value.name] = (np.ones((count, *dims), np.int64) if "mask" in value.name
                                 else rng.integers(0, 10, (count, *dims)))
        else:
            feeds[value.name] = rng.normal(size=(count, *dims)).astype(np.float32)
    return feeds


def tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return run_batched(make_session(probe, CPU), feeds, names, 64)


def reference(y: np.ndarray, t: np.ndarray, axis: int, channels: int, groups: int) -> GramStats:
    stats = GramStats.empty(channels, blocks=groups)
    stats.add(as_planes(y, axis), as_planes(t, axis))
    return stats


def assert_close(got: GramStats | MappedGramStats, want: GramStats, rtol: float) -> None:
    got = got.dense() if isinstance(got, MappedGramStats) else got
    assert got.rows == want.rows
    for a, b in ((got.zz, want.zz), (got.zt, want.zt)):
        assert np.abs(a - b).max() <= rtol * np.abs(b).max()
    assert abs(got.tt - want.tt) <= rtol * want.tt


class ShapeRecorder:
    """A probe session whose runs record the batch sizes they are fed."""

    def __init__(self, session):
        self.session, self.sizes = session, set()

    def run(self, outputs, feeds):
        self.sizes |= {len(v) for v in feeds.values()}
        return self.session.run(outputs, feeds)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("make", [vgg_net, resnet_net, mobile_net, token_mlp, nhwc_block, bert_block])
def test_probe_sums_match_float64_numpy(make, padded, monkeypatch):
    """Every point (dense, grouped, depthwise, Gemm, token MatMul, NHWC chains behind Transpose/Cast),
    with a shifted and scaled target far from zero mean, split in fit and held-out parts whose batches do
    not straddle them. ``padded``: CUDA's one batch shape per session (forced onto the CPU provider),
    every batch padded to 5 samples whose padding weighs nothing."""
    if padded:
        monkeypatch.setattr(runtime, "_ONE_SHAPE_DEVICES", ("cuda", "cpu"))
    model = make()
    graph = GraphIndex(model)
    feeds = inputs_for(model, 21)
    points = [p for p in find_points(graph).points if probe_blocker(p, graph) is None]
    assert points
    for point in points:
        got = tensors(model, feeds, [point.input, point.output])
        x, y = got[point.input], got[point.output]
        t = (1.3 * y + 0.2 * np.random.default_rng(0).normal(size=y.shape) + 5.0).astype(np.float32)
        probe = StatsProbe(point, graph, np.arange(point.channels), point.channels, CPU)
        probe.session = ShapeRecorder(probe.session)
        parts = [slice(0, 16), slice(16, 21)]
        for part, stats in zip(parts, probe.accumulate(ProbeFeeds(x, t), parts, batch_size=5)):
            assert_close(stats, reference(y[part], t[part], point.channel_axis, point.channels, point.groups), 1e-5)
        # Padded where the probe holds a conv (its set-up repeats per shape on CUDA); a Gemm's or MatMul's
        # probe runs its batches as they come.
        assert probe.padded == (padded and point.op_type == "Conv")
        assert probe.session.sizes == ({5} if probe.padded else {5, 1})


def nhwc_expansion() -> onnx.ModelProto:
    """A 1×1 expansion conv whose output is moved to NHWC before its bias Add: the probe sums its NCHW
    input and rebuilds the NHWC output's statistics."""
    b = NetBuilder(4)
    x = b.conv("expand", "input", 4, 12, k=1)
    x = b.node("Transpose", "to_nhwc", [x], perm=[0, 2, 3, 1])
    x = b.node("Relu", "act", [b.node("Add", "shift", [x, b.const("shift.b", b.rng.normal(0, 0.1, 12))])])
    x = b.node("ReduceMean", "pool", [x], axes=[1, 2], keepdims=0)
    return b.model(b.gemm("fc", x, 12, 10), (4, 5, 5), 10, "nhwc_expansion")


def test_expansion_behind_a_transpose_is_summed_from_its_input():
    model = nhwc_expansion()
    graph = GraphIndex(model)
    point = next(p for p in find_points(graph).points if p.name == "expand")
    assert point.channel_axis == 3 and probe_blocker(point, graph) is None
    feeds = random_inputs(model, 13)
    got = tensors(model, feeds, [point.input, point.output])
    y = got[point.output]
    t = (0.7 * y + 0.3 * np.random.default_rng(3).normal(size=y.shape) - 2.0).astype(np.float32)
    probe = StatsProbe(point, graph, np.arange(12), 12, CPU)
    assert probe.via_input is not None
    stats = probe.accumulate(ProbeFeeds(got[point.input], t), [slice(0, 13)], 5)[0]
    assert_close(stats, reference(y, t, 3, 12, 1), 1e-5)


def test_probe_builds_residual_sum_targets_on_kept_channels():
    """target = teacher output[kept] + teacher skip[kept] − student skip, gathered inside the graph."""
    model = resnet_net()
    graph = GraphIndex(model)
    point = next(p for p in find_points(graph).points if p.residual_skip)
    feeds = random_inputs(model, 12)
    got = tensors(model, feeds, [point.input, point.output, point.residual_skip])
    rng = np.random.default_rng(2)
    wide = point.channels + 3
    kept = np.sort(rng.choice(wide, point.channels, replace=False))
    t_out, t_skip = (rng.normal(size=(12, wide) + got[point.output].shape[2:]).astype(np.float32) for _ in range(2))
    probe = StatsProbe(point, graph, kept, wide, CPU, teacher_skip=True, student_skip=True)
    stats = probe.accumulate(ProbeFeeds(got[point.input], t_out, t_skip, got[point.residual_skip]), [slice(0, 12)], 4)[0]
    target = t_out[:, kept] + t_skip[:, kept] - got[point.residual_skip]
    assert_close(stats, reference(got[point.output], target, 1, point.channels, 1), 1e-5)


def test_identical_nets_show_no_error():
    """The residual D = T − Y is summed in-graph: a student equal to its teacher shows only the rounding
    of its fused vs unfused kernels (float32 sums of T alone would leave ~1e-4 and the guard would fit it)."""
    model = vgg_net()
    result = fit(model, model, Samples(random_inputs(model, 40)), FitConfig(solver="q"))
    assert all(p.statistics == "runtime" and p.error_before < 1e-6 and p.status == "rejected"
               for p in result.report.points)


@pytest.mark.parametrize("make,mode", [(resnet_net, "sequential"), (mobile_net, "sequential"), (vgg_net, "parallel")])
def test_fit_from_runtime_statistics_matches_the_host_path(make, mode, monkeypatch):
    teacher = make()
    student = perturbed(teacher, 0.3)
    samples = Samples(random_inputs(teacher, 60))
    config = FitConfig(mode=mode, batch_size=16, solver="q")
    in_graph = fit(teacher, student, samples, config)
    monkeypatch.setattr(pipeline, "probe_blocker", lambda point, graph: "forced host path")
    on_host = fit(teacher, student, samples, config)
    assert {p.statistics for p in in_graph.report.points} == {"runtime"}
    assert {p.statistics for p in on_host.report.points} == {"host"}
    assert [p.status for p in in_graph.report.points] == [p.status for p in on_host.report.points]
    assert in_graph.adapters.keys() == on_host.adapters.keys() and in_graph.adapters
    for name, adapter in in_graph.adapters.items():
        np.testing.assert_allclose(adapter.q, on_host.adapters[name].q, atol=2e-4)
    for a, b in zip(in_graph.report.points, on_host.report.points):
        assert a.rows == b.rows
        np.testing.assert_allclose([a.error_before, a.error_after], [b.error_before, b.error_after], rtol=1e-3)
    assert in_graph.report.exactness <= in_graph.report.exactness_tolerance == 1e-4
    assert in_graph.report.verified_on == "cpu"
    if mode == "sequential":
        assert in_graph.report.consistency <= 1e-5
    feeds = random_inputs(teacher, 30, seed=7)
    np.testing.assert_allclose(outputs(in_graph.model, feeds), outputs(on_host.model, feeds), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("make", [resnet_net, mobile_net])
def test_fit_with_one_batch_shape_per_session_is_the_same_fit(make, monkeypatch):
    """CUDA's one batch shape per session (forced onto the CPU provider): segments, probes (50 fit and 12
    held-out samples in batches of 16, the short ones padded to 16) and checks see padded batches, and the
    fit is the one without padding. (Padding turns the full solver's shifted-product Grams off; they round
    differently, against their own test: off in both fits here, so that only the padding differs.)"""
    monkeypatch.setattr(probes, "shifted_geometry", lambda point, graph, stride: None)
    teacher = make()
    student = perturbed(teacher, 0.3)
    samples = Samples(random_inputs(teacher, 62))
    config = FitConfig(batch_size=16, solver="auto", augment="none")
    plain = fit(teacher, student, samples, config)
    monkeypatch.setattr(runtime, "_ONE_SHAPE_DEVICES", ("cuda", "cpu"))
    padded = fit(teacher, student, samples, config)
    assert [p.status for p in padded.report.points] == [p.status for p in plain.report.points]
    assert [p.rows for p in padded.report.points] == [p.rows for p in plain.report.points]
    for a, b in zip(padded.report.points, plain.report.points):
        np.testing.assert_allclose([a.error_before, a.error_after], [b.error_before, b.error_after], rtol=1e-5)
    np.testing.assert_allclose(padded.report.after.relative_error, plain.report.after.relative_error, rtol=1e-5)
    feeds = random_inputs(teacher, 20, seed=3)
    np.testing.assert_allclose(outputs(padded.model, feeds), outputs(plain.model, feeds), rtol=1e-4, atol=1e-4)


def test_pruned_student_runtime_statistics_recover_it():
    """Kept channels found from the weights feed a Gather inside the probe; the fit still recovers."""
    teacher = vgg_net()
    rng = np.random.default_rng(0)
    student = prune_by_slicing(teacher, {"c1": np.sort(rng.choice(16, 9, replace=False)),
                                         "c3": np.sort(rng.choice(32, 20, replace=False))})
    samples = Samples(random_inputs(teacher, 80))
    result = fit(teacher, student, samples, FitConfig(solver="q"))
    assert all(p.statistics == "runtime" for p in result.report.points)
    feeds = random_inputs(teacher, 40, seed=5)
    want = outputs(teacher, feeds)
    assert np.linalg.norm(outputs(result.model, feeds) - want) < 0.8 * np.linalg.norm(outputs(student, feeds) - want)


def masked_token_net(seed: int = 0) -> onnx.ModelProto:
    """MatMul MLP over (N, 6, 12) tokens with masked mean pooling: padded tokens never reach the output."""
    b = NetBuilder(seed)
    x = "input"
    for i, (cin, cout) in enumerate([(12, 24), (24, 16)]):
        x = b.node("MatMul", f"t{i}", [x, b.const(f"t{i}.w", b.rng.normal(0, np.sqrt(2.0 / cin), (cin, cout)))])
        x = b.node("Relu", f"t{i}.relu", [b.node("Add", f"t{i}.add", [x, b.const(f"t{i}.b", b.rng.normal(0, 0.1, cout))])])
    mask = b.node("Unsqueeze", "mask3", [b.node("Cast", "maskf", ["attention_mask"], to=TensorProto.FLOAT),
                                         b.node("Constant", "axis", [], value=helper.make_tensor("a", TensorProto.INT64, [1], [2]))])
    pooled = b.node("Div", "pool", [b.node("ReduceSum", "sum", [b.node("Mul", "masked", [x, mask]), b.const("ax", [1])], keepdims=0),
                                    b.node("ReduceSum", "count", [mask, b.const("ax2", [1])], keepdims=0)])
    b.node("MatMul", "head", [pooled, b.const("head.w", b.rng.normal(0, 0.25, (16, 10)))])
    b.nodes[-1].output[0] = "logits"
    for t in b.inits:
        if t.name.startswith("ax"):
            t.CopyFrom(onnx.numpy_helper.from_array(np.array([1], np.int64), t.name))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6, 12]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", 6])]
    graph = helper.make_graph(b.nodes, "masked_tokens", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def padded_tokens(count: int, seed: int) -> dict[str, np.ndarray]:
    """Real tokens ~N(0, 1); padding holds huge garbage that only the mask tells apart."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 7, count)
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.int64)
    x = rng.normal(size=(count, 6, 12)).astype(np.float32)
    x[mask == 0] = rng.normal(0, 50, size=(int((mask == 0).sum()), 12))
    return {"input": x, "attention_mask": mask}


def test_attention_mask_leaves_padded_rows_out(monkeypatch):
    teacher = masked_token_net()
    student = perturbed(teacher, 0.3)
    feeds = padded_tokens(80, 1)
    result = fit(teacher, student, Samples(feeds), FitConfig(solver="q"))
    token_points = [p for p in result.report.points if p.student in ("t0", "t1")]
    assert [p.rows for p in token_points] == [int(feeds["attention_mask"].sum())] * 2
    assert all(p.statistics == "runtime" and p.status == "kept" for p in token_points)
    # The probe's masked sums equal the float64 sums over the real tokens only.
    graph = GraphIndex(student)
    point = next(p for p in find_points(graph).points if p.name == "t1")
    got = tensors(student, feeds, [point.input, point.output])
    t = tensors(teacher, feeds, [point.output])[point.output]
    real = feeds["attention_mask"].astype(bool)
    for padded in (False, True):  # CUDA's one batch shape (forced onto the CPU): 32, 32, 16 + 16 padding rows
        monkeypatch.setattr(runtime, "_ONE_SHAPE_DEVICES", ("cuda", "cpu") if padded else ("cuda",))
        # (a token MatMul's probe holds no conv and would not pad: forced, to check the mask's padding)
        monkeypatch.setattr(probes, "_holds_conv", lambda *args: True)
        probe = StatsProbe(point, graph, np.arange(16), 16, CPU, masked=True)
        probe.session = ShapeRecorder(probe.session)
        stats = probe.accumulate(ProbeFeeds(got[point.input], t, mask=feeds["attention_mask"]), [slice(0, 80)], 32)[0]
        assert probe.session.sizes == ({32} if padded else {32, 16})
        assert_close(stats, reference(got[point.output][real], t[real], 1, 16, 1), 1e-5)
    # Fitting on the padding too would chase garbage: the masked fit recovers the outputs better.
    test = padded_tokens(40, 9)
    want = outputs_of(teacher, test)
    assert np.linalg.norm(outputs_of(result.model, test) - want) < 0.5 * np.linalg.norm(outputs_of(student, test) - want)


def outputs_of(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return run_batched(make_session(model, CPU), feeds, ["logits"], 64)["logits"]


def sampled_rows(tensor: np.ndarray, stride: int) -> np.ndarray:
    return tensor[:, :, ::stride, ::stride]


@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("make", [vgg_net, resnet_net, mobile_net])
def test_strided_probe_sums_the_sampled_positions(make, stride):
    """With a position stride s, the sums are those of output positions (s·i, s·j) exactly: the probe's
    conv copy runs with s times its strides (3×3 with padding, stride-2 convs, depthwise, 1×1
    expansions summed from their input sliced alike), against a target given on those positions."""
    model = make()
    graph = GraphIndex(model)
    feeds = inputs_for(model, 11)
    points = [p for p in find_points(graph).points if p.op_type == "Conv" and probe_blocker(p, graph) is None]
    assert len(points) >= 3
    for point in points:
        got = tensors(model, feeds, [point.input, point.output])
        y = got[point.output]
        t = (0.8 * y + 0.3 * np.random.default_rng(4).normal(size=y.shape) + 2.0).astype(np.float32)
        want = reference(sampled_rows(y, stride), sampled_rows(t, stride), 1, point.channels, point.groups)
        for fed in (False, True):  # the probe computes the output from the input, or is fed the output
            probe = StatsProbe(point, graph, np.arange(point.channels), point.channels, CPU, stride=stride,
                               fed_output=fed)
            stats = probe.accumulate(ProbeFeeds(y if fed else got[point.input], sampled_rows(t, stride)),
                                     [slice(0, 11)], 4)[0]
            assert stats.rows == 11 * -(-y.shape[2] // stride) * -(-y.shape[3] // stride)
            assert_close(stats, want, 1e-5)


def patch_reference(point, graph, x: np.ndarray, t: np.ndarray, stride: int) -> GramStats:
    patches = point_features(point, graph, x)
    n, _, h, w = t.shape
    keep = np.zeros((n, h, w), bool)
    keep[:, ::stride, ::stride] = True
    rows = patches[keep.reshape(-1)]
    target = np.moveaxis(t, 1, -1)[keep]
    stats = GramStats.empty(rows.shape[1], t.shape[1])
    stats.add(rows, target)
    return stats


def wide_patch_net() -> onnx.ModelProto:
    """3×3 convs over 64 and 128 channels: 576 and 1152 patch features, Grams computed in blocks."""
    b = NetBuilder(5)
    x = b.conv("c64", "input", 64, 128)
    x = b.conv("c128", b.node("Relu", "r", [x]), 128, 8, stride=2)
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    return b.model(b.gemm("fc", x, 8, 4), (64, 6, 6), 4, "wide_patch")


@pytest.mark.parametrize("stride,padded", [(1, False), (2, False), (1, True)])
@pytest.mark.parametrize("make", [resnet_net, wide_patch_net])
def test_patch_probe_sums_match_im2col_in_float64(make, stride, padded, monkeypatch):
    """The full solver's sums of [x 1] (x: im2col patches, from one grouped one-hot conv) against the
    target, as NumPy's float64 im2col gives them, through padding, strides, the residual sum target,
    Grams put together from blocks and (stride-1 3×3 convs) from shifted channel products. ``padded``:
    CUDA's one batch shape (forced onto the CPU provider), which leaves patch probes unpadded (a padded
    batch could not use the shifted products)."""
    if padded:
        monkeypatch.setattr(runtime, "_ONE_SHAPE_DEVICES", ("cuda", "cpu"))
    model = make()
    graph = GraphIndex(model)
    feeds = inputs_for(model, 9)
    points = [p for p in find_points(graph).points if p.op_type == "Conv" and full_form(p, graph) is not None]
    shifted_used = []
    if make is resnet_net:
        assert any(graph.node_by_name[p.name].attribute and p.residual_skip for p in points)
    for point in points:
        got = tensors(model, feeds, [point.input, point.output])
        y = got[point.output]
        t = (1.1 * y + 0.2 * np.random.default_rng(5).normal(size=y.shape) - 1.0).astype(np.float32)
        probe = StatsProbe(point, graph, np.arange(point.channels), point.channels, CPU, stride=stride,
                           full=full_form(point, graph).linear_map)
        node = graph.node_by_name[point.name]
        same_size = graph.shapes[point.weight][2:] == (3, 3) and all(
            list(a.ints) == ([1] * 4 if a.name == "pads" else [1, 1]) for a in node.attribute if a.name in ("pads", "strides"))
        assert not probe.padded
        assert (probe.shifted is not None) == (same_size and stride == 1)
        shifted_used.append(probe.shifted is not None)
        features = full_form(point, graph).current.shape[0] - 1
        blocked = probe.shifted is None and features >= 512
        assert ("Gxx/0/1" in probe.outputs) == blocked and ("Gxx/3/3" in probe.outputs) == (blocked and features >= 1024)
        stats = probe.accumulate(ProbeFeeds(got[point.input], sampled_rows(t, stride)), [slice(0, 9)], 4)[0]
        assert_close(stats, patch_reference(point, graph, got[point.input], t, stride), 2e-5)
    assert any(shifted_used) == (stride == 1)


@pytest.mark.parametrize("make", [resnet_net, vgg_net])
def test_full_fit_from_runtime_statistics_matches_the_host_path(make, monkeypatch):
    """The full solver in the runtime: the same points kept with the same errors, and the same model,
    as its float64 host path."""
    teacher = make()
    student = perturbed(teacher, 0.3)
    samples = Samples(random_inputs(teacher, 60))
    config = FitConfig(batch_size=16, solver="full", stats_positions="all")
    in_graph = fit(teacher, student, samples, config)
    monkeypatch.setattr(pipeline, "probe_blocker", lambda point, graph: "forced host path")
    on_host = fit(teacher, student, samples, config)
    assert "runtime" in {p.statistics for p in in_graph.report.points if p.solver == "full"}
    assert {p.statistics for p in on_host.report.points} == {"host"}
    assert [(p.solver, p.status) for p in in_graph.report.points] == [(p.solver, p.status) for p in on_host.report.points]
    for a, b in zip(in_graph.report.points, on_host.report.points):
        assert a.rows == b.rows
        # Near-exact fits leave errors of ~1e-3: a difference of nearly equal float32 sums, so the two runtime
        # paths (blocked and shifted patch Grams) both land within 2e-5 of float64, not 1e-5.
        np.testing.assert_allclose([a.error_before, a.error_after], [b.error_before, b.error_after], rtol=1e-3, atol=2e-5)
    assert in_graph.report.exactness <= 1e-4 and in_graph.report.consistency <= 1e-5
    feeds = random_inputs(teacher, 30, seed=7)
    np.testing.assert_allclose(outputs(in_graph.model, feeds), outputs(on_host.model, feeds), rtol=1e-3, atol=1e-3)


def wide_map_net() -> onnx.ModelProto:
    """A 3×3 conv on a 64×64 map, another after a stride-2 conv (32×32), and a 1×1 on 8×8."""
    b = NetBuilder(9)
    x = b.conv("wide", "input", 3, 8)
    x = b.conv("half", b.node("Relu", "r1", [x]), 8, 8, stride=2)
    x = b.node("MaxPool", "pool", [b.node("Relu", "r2", [x])], kernel_shape=[4, 4], strides=[4, 4])
    x = b.conv("small", x, 8, 8, k=1)
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    return b.model(b.gemm("fc", x, 8, 4), (3, 64, 64), 4, "wide_map")


def test_position_stride_keeps_a_grid_and_enough_rows_per_feature():
    graph = GraphIndex(wide_map_net())
    points = {p.name: p for p in find_points(graph).points}
    stride = lambda name, samples, option="auto", features=9: position_stride(option, points[name], graph, features, samples)  # noqa: E731
    assert stride("wide", 1000) == 4      # 64×64 → a 16×16 grid
    assert stride("half", 1000) == 2      # 32×32 → 16×16; 11×11 at 3 is under 14×14
    assert stride("small", 1000) == 1     # 8×8 is under the grid already
    assert stride("fc", 1000) == 1        # not a conv
    assert stride("wide", 1000, "all") == 1
    assert stride("wide", 100, features=1999) == 1  # 100·32² rows < 64 rows per feature × 2000
    assert stride("wide", 64, features=99) == 2    # 64·32² rows suffice, 64·22² are under 2¹⁵ in all
    assert stride("wide", 16) == 1                 # 16·32² rows: under 2¹⁵, every row is kept


@pytest.mark.parametrize("stride", [2, 3, 4])
@pytest.mark.parametrize("opset", [9, OPSET])
def test_grid_node_picks_the_sampled_positions(stride, opset):
    """The in-graph grid (segments' sampled outputs, probes' sampled inputs) is sample_positions exactly,
    on odd map sizes too, also under opsets before Slice took steps."""
    node = grid_node("x", "y", stride)
    graph = helper.make_graph([node], "grid", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", opset)])
    x = np.random.default_rng(stride).normal(size=(3, 5, 13, 10)).astype(np.float32)
    got = make_session(model, CPU).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(got, sample_positions(x, stride))


def test_fit_on_sampled_positions_stays_close_to_all_positions():
    """On maps large enough to be sampled, the fit on a grid of positions recovers as much as the fit on
    every position (held-out output error within 10 %), and says which stride each point used."""
    teacher = wide_map_net()
    student = perturbed(teacher, 0.3)
    samples = Samples(random_inputs(teacher, 64))
    sampled = fit(teacher, student, samples, FitConfig(solver="q", augment="none"))
    every = fit(teacher, student, samples, FitConfig(solver="q", augment="none", stats_positions="all"))
    assert {p.student: p.position_stride for p in sampled.report.points}["wide"] > 1
    assert {p.position_stride for p in every.report.points} == {1}
    assert sampled.report.after.relative_error < 0.5 * sampled.report.before.relative_error
    assert sampled.report.after.relative_error <= 1.1 * every.report.after.relative_error


def inverted_residual_net(seed: int = 0) -> onnx.ModelProto:
    """Stem, then a 6× 1×1 expansion, a depthwise 3×3 and a 1×1 projection added back to the stem."""
    b = NetBuilder(seed)
    stem = b.conv_bn_relu("stem", "input", 3, 8)
    x = b.conv_bn_relu("expand", stem, 8, 48, k=1)
    x = b.conv_bn_relu("dw", x, 48, 48, group=48)
    x = b.node("Add", "add", [b.conv("project", x, 48, 8, k=1), stem])
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    return b.model(b.gemm("fc", x, 8, 10), (3, 12, 12), 10, "inverted_residual")


def test_wide_inputs_are_recomputed_inside_the_probe(monkeypatch):
    """The depthwise point reads the 6×-expanded tensor: its probe recomputes it from the cached narrow
    block input (with the expansion's fitted update folded in) instead of caching it, and the fit is the
    same as with it cached. (The expansion's own input, the stem's 8 channels, is 2.7× the 3-channel
    image it comes from: recomputed too; the projection reads its own, narrow, output.)"""
    teacher = inverted_residual_net()
    student = perturbed(teacher, 0.3)
    samples = Samples(random_inputs(teacher, 50))
    recomputed: list[str] = []
    side_graph = SegmentRunner.side_graph

    def spy(runner, target):
        side = side_graph(runner, target)
        if side is not None:
            recomputed.append(target)
        return side

    monkeypatch.setattr(SegmentRunner, "side_graph", spy)
    config = FitConfig(solver="q", augment="none", reselect=False)
    side = fit(teacher, student, samples, config)
    names = {p.input: p.name for p in find_points(GraphIndex(student)).points}
    assert sorted(names[t] for t in recomputed) == ["dw", "expand"]
    monkeypatch.setattr(SegmentRunner, "side_graph", lambda runner, target: None)
    cached = fit(teacher, student, samples, config)
    assert [p.status for p in side.report.points] == [p.status for p in cached.report.points]
    assert side.adapters.keys() == cached.adapters.keys() and {"dw", "project"} <= side.adapters.keys()
    for name, adapter in side.adapters.items():
        np.testing.assert_allclose(adapter.q, cached.adapters[name].q, atol=1e-4)
    assert side.report.exactness <= 1e-4 and side.report.consistency <= 1e-5
    assert side.report.after.relative_error < 0.5 * side.report.before.relative_error


def projection_behind_prefix():
    """The inverted residual block's projection point, the prefix that recomputes its input (expansion,
    depthwise 3×3) from the block input, that input, and the projection's output y and a target t."""
    model = inverted_residual_net()
    graph = GraphIndex(model)
    point = next(p for p in find_points(graph).points if p.name == "project")
    block_input = graph.node_by_name["expand"].input[0]
    prefix = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model([block_input], [point.input])
    got = tensors(model, inputs_for(model, 11), [block_input, point.output])
    y = got[point.output]
    t = (0.8 * y + 0.3 * np.random.default_rng(4).normal(size=y.shape) + 2.0).astype(np.float32)
    return graph, point, prefix, {block_input: got[block_input]}, y, t


@pytest.mark.parametrize("stride", [2, 3])
def test_prefix_computes_a_sampled_projection_input_on_the_sampled_positions_only(stride):
    """A 1×1 projection read on every s-th row and column, behind a recomputed prefix (expansion, depthwise
    3×3): the prefix's depthwise conv runs with s times its strides and the projection's copy with its own,
    and the sums are still exactly those of the sampled positions."""
    graph, point, prefix, x, y, t = projection_behind_prefix()
    probe = StatsProbe(point, graph, np.arange(point.channels), point.channels, CPU, stride=stride, prefix=prefix)
    strides = {node.name: [list(a.ints) for a in node.attribute if a.name == "strides"]
               for node in probe.model.graph.node if node.op_type == "Conv"}
    assert strides["dw"] == [[stride, stride]] and strides["expand"] == [[1, 1]] and strides["fskd/copy0"] == [[1, 1]]
    stats = probe.accumulate(ProbeFeeds(x, sampled_rows(t, stride)), [slice(0, 11)], 4)[0]
    assert_close(stats, reference(sampled_rows(y, stride), sampled_rows(t, stride), 1, point.channels, 1), 1e-5)


def test_probe_cuts_its_batches_to_the_arena_bound(monkeypatch):
    """A probe whose prefix recomputes a wide tensor runs fewer rows per batch under a small arena bound,
    with the same sums."""
    graph, point, prefix, x, _, t = projection_behind_prefix()
    make = lambda: StatsProbe(point, graph, np.arange(point.channels), point.channels, CPU, prefix=prefix)  # noqa: E731
    whole = make().accumulate(ProbeFeeds(x, t), [slice(0, 8), slice(8, 11)], 4)
    monkeypatch.setattr(runtime, "ARENA_BATCH_BYTES", 2 * 4 * (48 * 3 * 2 + 8) * 144)  # about 2 samples' worth
    cut = make()
    cut.session = ShapeRecorder(cut.session)
    for got_stats, want in zip(cut.accumulate(ProbeFeeds(x, t), [slice(0, 8), slice(8, 11)], 4), whole):
        assert_close(got_stats, want, 1e-5)
    assert max(cut.session.sizes) == 2


def test_strided_tail_stops_where_positions_would_mix():
    """The tail conv is strided only behind position-wise ops whose tensors nothing else reads: not behind
    a constant that varies over positions, nor when its output is read twice."""
    b = NetBuilder(0)
    conv = b.conv("c", "input", 3, 4)
    relu = b.node("Relu", "r", [b.bn("bn", conv, 4)])
    constants = {t.name: t for t in b.inits}
    tail = sampling.strided_tail(b.nodes, relu, 2, constants)
    assert [list(a.ints) for a in tail[0].attribute if a.name == "strides"] == [[2, 2]]
    assert [list(a.ints) for a in b.nodes[0].attribute if a.name == "strides"] == [[1, 1]]  # changed in a copy
    by_position = helper.make_node("Add", [relu, "map"], ["shifted"])
    constants["map"] = onnx.numpy_helper.from_array(np.ones((1, 1, 8, 8), np.float32), "map")
    assert sampling.strided_tail(b.nodes + [by_position], "shifted", 2, constants) is None
    per_channel = helper.make_node("Add", [relu, "bias"], ["biased"])
    constants["bias"] = onnx.numpy_helper.from_array(np.ones((4, 1, 1), np.float32), "bias")
    assert sampling.strided_tail(b.nodes + [per_channel], "biased", 2, constants) is not None
    read_twice = helper.make_node("Relu", [conv], ["again"])
    assert sampling.strided_tail(b.nodes + [read_twice], relu, 2, constants) is None


@pytest.mark.parametrize("make", [resnet_net, inverted_residual_net])
def test_probe_fed_the_output_fits_as_the_probe_that_recomputes_it(make, monkeypatch):
    """3×3 convs on small maps and projections: the segment computes the point's output uncorrected, the
    probe reads it, and Q is applied to it afterwards; the same fit as recomputing the op in the probe."""
    teacher = make()
    student = perturbed(teacher, 0.3)
    samples = Samples(random_inputs(teacher, 50))
    graph = GraphIndex(student)
    fed = [p.name for p in find_points(graph).points if probes.probe_reads_output(p, graph, 1)]
    assert fed
    config = FitConfig(solver="q", augment="none", reselect=False)
    reading = fit(teacher, student, samples, config)
    monkeypatch.setattr(pipeline, "probe_reads_output", lambda point, graph, stride: False)
    recomputing = fit(teacher, student, samples, config)
    assert [p.status for p in reading.report.points] == [p.status for p in recomputing.report.points]
    assert set(fed) <= reading.adapters.keys() == recomputing.adapters.keys()
    for name, adapter in reading.adapters.items():
        np.testing.assert_allclose(adapter.q, recomputing.adapters[name].q, atol=1e-4)
    assert reading.report.exactness <= 1e-4 and reading.report.consistency <= 1e-5


def test_shifted_gram_is_the_im2col_gram_in_float64():
    """The block-Toeplitz assembly (probes._ShiftedGram) from whole-map, border-row, border-column and
    corner products of the centred input gives the zero-padded 3×3 im2col Gram exactly, over batches
    with different channel means, on a map that is not square."""
    rng = np.random.default_rng(4)
    channels, h, w = 3, 5, 7
    gram = probes._ShiftedGram(channels, h, w)
    patches = []
    for samples, offset in ((2, 3.0), (3, -1.5)):
        x = rng.normal(size=(samples, channels, h, w)) + offset * np.arange(1, channels + 1)[None, :, None, None]
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        patches.append(np.stack([padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=2)
                       .transpose(0, 3, 4, 1, 2).reshape(-1, 9 * channels))  # features (c, i, j): the weight's
        m = x.mean(axis=(0, 2, 3))
        centred = (x - m[None, :, None, None]).transpose(1, 0, 2, 3)
        values = {"shifted/m": m, "shifted/M": centred.sum(axis=1)}
        for name, (r0, r1, c0, c1), (di, dj) in probes._shifted_pieces(h, w):
            left = centred[:, :, r0:r1, c0:c1].reshape(channels, -1)
            right = centred[:, :, r0 + di:r1 + di, c0 + dj:c1 + dj].reshape(channels, -1)
            values[f"shifted/{name}"] = left @ right.T
        gram.add(values, samples)
    rows = np.concatenate(patches)
    np.testing.assert_allclose(gram.gram(), rows.T @ rows, rtol=1e-12, atol=1e-9)
    # Written into the leading block of a wider matrix (the system's).
    system = np.full((9 * channels + 1, 9 * channels + 1), np.nan)
    gram.gram(system[:-1, :-1])
    np.testing.assert_allclose(system[:-1, :-1], rows.T @ rows, rtol=1e-12, atol=1e-9)
    assert np.isnan(system[-1]).all() and np.isnan(system[:, -1]).all()
