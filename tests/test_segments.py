"""The segment runner's sampled tensors (every s-th row and column, for the statistics' grid): what a
segment returns is the full tensor sliced, whether a strided copy of the producing conv or a Slice
computes it, and the full tensor is not cached for it."""

from __future__ import annotations

import numpy as np
import pytest

import onnx_fskd.runtime as runtime
import onnx_fskd.segments as segments
from builders import mobile_net, random_inputs, resnet_net
from onnx_fskd.graph import GraphIndex
from onnx_fskd.points import find_points
from onnx_fskd.segments import SegmentRunner, sampled_name
from onnx_fskd.solve import Adapter

CPU = ["CPUExecutionProvider"]


@pytest.mark.parametrize("copies", [True, False])
@pytest.mark.parametrize("make", [resnet_net, mobile_net])
def test_sampled_tensors_are_the_full_tensors_sliced(make, copies, monkeypatch):
    if not copies:
        monkeypatch.setattr(segments, "MAX_COPY_MACS", 0)
    model = make()
    graph = GraphIndex(model)
    feeds = random_inputs(model, 10)
    outputs = [p.output for p in find_points(graph).points if p.op_type == "Conv"]
    full = SegmentRunner(model, graph, CPU, 4, None)
    full.start(feeds)
    want = full.compute(outputs)
    for stride in (2, 3):
        runner = SegmentRunner(model, graph, CPU, 4, None)
        runner.start(feeds)
        names = [sampled_name(name, stride) for name in outputs]
        got = runner.compute(names[:1], prefetch=names[1:])
        got |= runner.compute(names[1:])
        for name, sampled in zip(outputs, names):
            np.testing.assert_allclose(got[sampled], want[name][:, :, ::stride, ::stride], rtol=1e-5, atol=1e-5)
        # full tensors stay on the host only as boundaries of the nodes not run yet (the last block's Add)
        assert outputs[0] not in runner.cache
        assert all(runner._still_needed(name) for name in set(outputs) & set(runner.cache))


def test_strided_copies_only_where_cheap():
    """A copy of the producing conv with s times its strides stands in for a slice when it costs at most
    MAX_COPY_MACS multiply-adds per output element (a depthwise or narrow 1×1 conv, or a large stride)."""
    graph = GraphIndex(mobile_net())
    points = {p.name: p for p in find_points(graph).points}
    depthwise, grouped = points["dw1"], points["gc1"]
    assert segments._strided_recipe(graph, depthwise.output, 2) is not None      # 9 per output
    assert segments._strided_recipe(graph, grouped.output, 1) is None            # 8·9 = 72 per output > 64
    assert segments._strided_recipe(graph, grouped.output, 2) is not None        # 72 / 4
    assert segments._strided_recipe(graph, points["stem"].output, 2) is not None
    assert segments._strided_recipe(graph, "input", 2) is None                   # no conv produces it


@pytest.mark.parametrize("group_size", [16, 4, 1])
def test_deferred_correction_is_applied_by_every_reader(group_size, monkeypatch):
    """A correction deferred on a cached tensor (dense, block-diagonal or diagonal Q, and d) reaches both
    of its readers, run in two segments (a conv, and later a residual Add), as if the corrected tensor had
    been cached, through a 1×1 conv grouped as Q's blocks are (group_size multiply-adds per element, not
    16); the tensor itself comes back corrected when asked for."""
    segment_models = []
    make_session = segments.make_session
    monkeypatch.setattr(segments, "make_session",
                        lambda model, *args, **kwargs: segment_models.append(model) or make_session(model, *args, **kwargs))
    model = resnet_net()
    graph = GraphIndex(model)
    feeds = random_inputs(model, 10)
    rng = np.random.default_rng(3)
    adapter = Adapter(np.eye(group_size) + 0.3 * rng.normal(size=(16 // group_size, group_size, group_size)),
                      rng.normal(size=16))
    stem, first, block = "stem.relu", "b1.c1.relu", "b1.relu"
    host, deferred = (SegmentRunner(model, graph, CPU, 4, None) for _ in range(2))
    for runner in (host, deferred):
        runner.start(feeds)
        runner.compute([stem])
    corrected = adapter.apply(host.compute([stem])[stem], 1)
    host.replace(stem, corrected)
    deferred.defer(stem, adapter)
    assert not np.allclose(deferred.cache[stem], corrected)  # not applied on the host
    for name in (first, block):  # b1.c1 reads it in one segment, b1.add in the next
        segment_models.clear()
        np.testing.assert_allclose(deferred.compute([name])[name], host.compute([name])[name], rtol=1e-4, atol=1e-4)
        (correction,) = [n for m in segment_models for n in m.graph.node if n.output[0] == f"{stem}/fskd_corrected"]
        kernel = next(t for m in segment_models for t in m.graph.initializer if t.name == correction.input[1])
        assert correction.op_type == "Conv" and tuple(kernel.dims) == (16, group_size, 1, 1)
        assert [a.i for a in correction.attribute if a.name == "group"] == [16 // group_size]
    asked = SegmentRunner(model, graph, CPU, 4, None)
    asked.start(feeds)
    asked.compute([stem])
    asked.defer(stem, adapter)
    np.testing.assert_allclose(asked.compute([stem])[stem], corrected, rtol=1e-6, atol=1e-6)


def test_segments_cut_their_batches_to_the_arena_bound(monkeypatch):
    """With a small arena bound each segment runs fewer rows per batch, fewer where its node outputs per
    sample are larger, and computes the same tensors."""
    model = resnet_net()
    graph = GraphIndex(model)
    feeds = random_inputs(model, 10)
    names = [p.output for p in find_points(graph).points]
    want = SegmentRunner(model, graph, CPU, 8, None)
    want.start(feeds)
    expected = {name: want.compute([name])[name] for name in names}
    rows: list[int] = []
    run_batched = segments.run_batched
    monkeypatch.setattr(segments, "run_batched", lambda session, feeds, outputs, batch, *rest, **kw: (
        rows.append(batch), run_batched(session, feeds, outputs, batch, *rest, **kw))[1])
    monkeypatch.setattr(runtime, "ARENA_BATCH_BYTES", 4 * 16 * 16 * 16 * 4)  # four of the stem's outputs per sample
    runner = SegmentRunner(model, graph, CPU, 8, None)
    runner.start(feeds)
    for name in names:
        np.testing.assert_allclose(runner.compute([name])[name], expected[name], rtol=1e-5, atol=1e-5)
    assert max(rows) < 8 and min(rows) < max(rows)


def test_later_tensors_come_out_of_the_segment_that_computes_them(monkeypatch):
    """A tensor asked for later whose producer runs in this segment comes out of it (sampled or not), and
    the later request runs nothing; one whose producer does not run here is left to its own segment. Without
    ``later`` the inner tensor is dropped, and asking for it reruns the block from the stem's output."""
    model = resnet_net()
    graph = GraphIndex(model)
    feeds = random_inputs(model, 10)
    inner, inner_sampled, beyond = "b1.c1.relu", sampled_name("b1.c2.bn", 2), "b2.relu"
    want = SegmentRunner(model, graph, CPU, 4, None)
    want.start(feeds)
    expected = want.compute([inner, "b1.c2.bn", beyond])
    runs: list[list[str]] = []
    run_segment = SegmentRunner._run_segment
    monkeypatch.setattr(SegmentRunner, "_run_segment", lambda self, missing: (runs.append(missing),
                                                                               run_segment(self, missing))[1])
    for later, reruns in (([inner, inner_sampled, beyond], 0), ([], 1)):
        runner = SegmentRunner(model, graph, CPU, 4, None)
        runner.start(feeds)
        runner.compute(["b1.relu"], later=later)
        assert (beyond in runner.cache) is False
        runs.clear()
        got = runner.compute([inner])[inner]
        assert len(runs) == reruns
        np.testing.assert_allclose(got, expected[inner], rtol=1e-5, atol=1e-5)
        if later:
            np.testing.assert_allclose(runner.compute([inner_sampled])[inner_sampled],
                                       expected["b1.c2.bn"][:, :, ::2, ::2], rtol=1e-5, atol=1e-5)
            assert not runs


def test_a_prefetch_never_starts_a_segment_by_itself(monkeypatch):
    """Prefetched tensors ride along with a run that a wanted tensor needs; when every wanted tensor is
    cached, nothing runs and nothing more is fetched."""
    model = resnet_net()
    graph = GraphIndex(model)
    outputs = [p.output for p in find_points(graph).points if p.op_type == "Conv"]
    runner = SegmentRunner(model, graph, CPU, 4, None)
    runner.start(random_inputs(model, 6))
    runs = []
    original = SegmentRunner._run_segment
    monkeypatch.setattr(SegmentRunner, "_run_segment", lambda self, missing: (runs.append(missing), original(self, missing)))
    runner.compute(outputs[:1], prefetch=outputs[1:2])
    assert len(runs) == 1 and outputs[1] in runner.cache
    runner.compute(outputs[1:2], prefetch=outputs[2:3])
    assert len(runs) == 1 and outputs[2] not in runner.cache
    runner.compute(outputs[2:3])
    assert len(runs) == 2
