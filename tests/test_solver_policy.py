"""--solver auto: full where its statistics are cheap relative to the layer, q elsewhere."""

from __future__ import annotations

import numpy as np

from builders import NetBuilder, mobile_net, random_inputs
from onnx_fskd.data import Samples
from onnx_fskd.graph import GraphIndex
from onnx_fskd.pipeline import FitConfig, fit
from onnx_fskd.points import find_points
from onnx_fskd.solver_policy import FULL_MAX_COST_RATIO, choose_solver, patch_features


def wide_then_narrow():
    """A Gemm reading 400 features into 2 outputs: full's statistics would cost 200× the layer."""
    b = NetBuilder(2)
    x = b.node("Relu", "h.relu", [b.gemm("h", "input", 20, 400)])
    return b.model(b.gemm("narrow", x, 400, 2), (20,), 2, "wide")


def test_policy_per_point():
    graph = GraphIndex(mobile_net())
    points = find_points(graph).by_name()
    chosen = {name: choose_solver("auto", p, graph, 200) for name, p in points.items()}
    assert chosen == {"stem": "full", "dw1": "q", "pw1": "full", "gc1": "q", "fc": "full"}
    # too few rows for the Gemm's 32 input features (one row per sample): q, not an overfitted full
    assert choose_solver("auto", points["fc"], graph, 100) == "q" and choose_solver("auto", points["pw1"], graph, 1) == "full"
    assert patch_features(points["stem"], graph) == 3 * 3 * 3
    assert {choose_solver("q", p, graph, 100) for p in points.values()} == {"q"}
    wide = GraphIndex(wide_then_narrow())
    narrow = find_points(wide).by_name()["narrow"]
    assert patch_features(narrow, wide) == 400 > FULL_MAX_COST_RATIO * narrow.channels
    assert choose_solver("auto", narrow, wide, 10_000) == "q" and choose_solver("full", narrow, wide, 10) == "full"


def test_fit_reports_the_solver_each_point_got():
    teacher = mobile_net()
    report = fit(teacher, teacher, Samples(random_inputs(teacher, 200)), FitConfig(solver="auto")).report
    assert report.solver == "auto"
    assert {p.student: p.solver for p in report.points} == {"stem": "full", "dw1": "q", "pw1": "full", "gc1": "q", "fc": "full"}
    model = wide_then_narrow()
    report = fit(model, model, Samples(random_inputs(model, 200)), FitConfig(solver="auto")).report
    assert {p.student: p.solver for p in report.points} == {"h": "full", "narrow": "q"}
    assert np.isfinite(report.after.relative_error)
