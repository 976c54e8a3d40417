"""The segment runner's sampled tensors (every s-th row and column, for the statistics' grid): what a
segment returns is the full tensor sliced, whether a strided copy of the producing conv or a Slice
computes it, and the full tensor is not cached for it."""

from __future__ import annotations

import numpy as np
import pytest

import onnx_fskd.segments as segments
from builders import mobile_net, random_inputs, resnet_net
from onnx_fskd.graph import GraphIndex
from onnx_fskd.points import find_points
from onnx_fskd.segments import SegmentRunner, sampled_name

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
