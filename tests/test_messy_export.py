"""The written model is the student's own graph: a PyTorch-style export with Constant-fed weights,
Identity of a weight, run-time Shape arithmetic, a Pad built from ConstantOfShape/Concat, a decomposed
BatchNorm and a weight shared by two ops comes back node-for-node, with new weights only."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builders import IR_VERSION, OPSET, random_inputs
from onnx_fskd.data import Samples
from onnx_fskd.graph import GraphIndex
from onnx_fskd.normalize import normalise
from onnx_fskd.pipeline import FitConfig, fit
from onnx_fskd.points import find_points
from onnx_fskd.runtime import make_session, run_batched
from onnx_fskd.verify import with_explicit_adapters


def _tensor(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def messy_export(seed: int = 0, noise: float = 0.0) -> onnx.ModelProto:
    """Unnamed nodes included, as some exporters emit them. ``noise`` perturbs the weights (a 'student')."""
    rng = np.random.default_rng(seed)
    jitter = np.random.default_rng(seed + 100)

    def w(*shape, scale=0.3):
        base = rng.normal(0, scale, shape)
        return base + noise * jitter.normal(0, scale, shape)

    const = lambda out, value, dtype=np.float32, name=None: helper.make_node(  # noqa: E731
        "Constant", [], [out], name=name if name is not None else out, value=_tensor(out + "_v", value, dtype))
    nodes = [
        const("w1_c", w(8, 3, 3, 3)),
        helper.make_node("Identity", ["w1_c"], ["w1"], name="w1_id"),
        const("b1", w(8, scale=0.1), name=""),  # an unnamed Constant
        helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
        const("bn_mean", w(1, 8, 1, 1, scale=0.1)),
        helper.make_node("Sub", ["conv1", "bn_mean"], ["bn_sub"], name="bn_sub"),
        helper.make_node("Mul", ["bn_sub", "bn_scale"], ["bn_mul"], name="bn_mul"),
        const("bn_beta", w(1, 8, 1, 1, scale=0.1)),
        helper.make_node("Add", ["bn_mul", "bn_beta"], ["bn_add"]),  # unnamed
        helper.make_node("Relu", ["bn_add"], ["relu1"], name="relu1"),
        const("two", [2], np.int64),
        helper.make_node("ConstantOfShape", ["two"], ["zeros2"], name="zeros2",
                         value=_tensor("zero", [0], np.int64)),
        const("ones2", [1, 1], np.int64),
        helper.make_node("Concat", ["zeros2", "ones2", "zeros2", "ones2"], ["pads"], name="pads", axis=0),
        helper.make_node("Pad", ["relu1", "pads"], ["padded"], name="pad", mode="constant"),
        helper.make_node("Conv", ["padded", "w2"], ["conv2"], name="conv2", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("Shape", ["relu2"], ["shape"], name="shape"),
        const("zero_index", 0, np.int64),
        helper.make_node("Gather", ["shape", "zero_index"], ["batch"], name="gather", axis=0),
        const("axes0", [0], np.int64),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"], name="unsqueeze"),
        const("minus_one", [-1], np.int64),
        helper.make_node("Concat", ["batch1", "minus_one"], ["flat_shape"], name="flat_shape", axis=0),
        helper.make_node("Reshape", ["relu2", "flat_shape"], ["flat"], name="reshape"),
        helper.make_node("Identity", ["fc1_w"], ["fc1_w_id"], name="fc1_w_id"),
        helper.make_node("Gemm", ["flat", "fc1_w_id", "fc1_b"], ["fc1"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["h"], name="fc1_relu"),
        helper.make_node("Gemm", ["h", "shared_w", "fc2a_b"], ["fc2a"], name="fc2a", transB=1),
        helper.make_node("Gemm", ["h", "shared_w", "fc2b_b"], ["fc2b"], name="fc2b", transB=1),
        helper.make_node("Add", ["fc2a", "fc2b"], ["logits"], name="sum"),
    ]
    inits = [_tensor("bn_scale", np.abs(w(1, 8, 1, 1)) + 0.5), _tensor("w2", w(8, 8, 3, 3, scale=0.15)),
             _tensor("fc1_w", w(16, 8 * 8 * 8, scale=0.05)), _tensor("fc1_b", w(16, scale=0.1)),
             _tensor("shared_w", w(10, 16)), _tensor("fc2a_b", w(10, scale=0.1)), _tensor("fc2b_b", w(10, scale=0.1))]
    graph = helper.make_graph(nodes, "messy",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="pytorch", producer_version="2.13.0")
    helper.set_model_props(model, {"exporter": "test"})
    onnx.checker.check_model(model)
    return model


def _without_tensor_values(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for attribute in copy.attribute:
        if attribute.type == onnx.AttributeProto.TENSOR:
            attribute.t.ClearField("raw_data")
            attribute.t.ClearField("float_data")
    return copy


def _fit_messy():
    teacher, student = messy_export(), messy_export(noise=0.3)
    samples = Samples(random_inputs(teacher, 400))
    return teacher, student, samples, fit(teacher, student, samples, FitConfig(holdout=0.25, solver="q"))


def test_written_model_is_the_students_graph_node_for_node():
    teacher, student, _, result = _fit_messy()
    out = result.model
    assert len(out.graph.node) == len(student.graph.node) == 31
    added = {t.name for t in out.graph.initializer} - {t.name for t in student.graph.initializer}
    assert added == {"conv2/fskd_bias2"}  # conv2 had no bias; nothing else is new
    for before, after in zip(student.graph.node, out.graph.node):
        after_inputs = list(after.input)
        if before.name == "conv2":
            assert after_inputs == list(before.input) + ["conv2/fskd_bias2"]
            after = _without_tensor_values(after)
            del after.input[-1]
        assert _without_tensor_values(before) == _without_tensor_values(after), before.name
    for field in ("input", "output", "value_info"):
        assert list(getattr(out.graph, field)) == list(getattr(student.graph, field))
    assert out.ir_version == student.ir_version and list(out.opset_import) == list(student.opset_import)
    assert list(out.metadata_props) == list(student.metadata_props)
    assert (out.producer_name, out.producer_version) == ("pytorch", "2.13.0")
    # the weights did change where they are held: a Constant's value, an initializer read through Identity
    changed = {n.name for b, n in zip(student.graph.node, out.graph.node) if b != n}
    assert {"w1_c", "conv2"} <= changed
    assert numpy_helper.to_array(_init(out, "fc1_w")).tolist() != numpy_helper.to_array(_init(student, "fc1_w")).tolist()
    # the shared weight is left alone, and said so
    assert _init(out, "shared_w") == _init(student, "shared_w")
    assert {s["node"] for s in result.report.skipped} >= {"fc2a", "fc2b"}


def test_written_model_computes_the_explicit_q_reference():
    teacher, student, samples, result = _fit_messy()
    assert result.adapters, "the fit must keep some corrections for this test to mean anything"
    folded = normalise(student)
    points = {p.name: p for p in find_points(GraphIndex(folded)).points}
    reference = with_explicit_adapters(folded, [(points[name], a) for name, a in result.adapters.items()])
    feeds = {"input": samples.arrays["input"][:16]}
    got, want = (run_batched(make_session(m, ["CPUExecutionProvider"]), feeds, ["logits"], 16)["logits"]
                 for m in (result.model, reference))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    before = run_batched(make_session(student, ["CPUExecutionProvider"]), feeds, ["logits"], 16)["logits"]
    assert np.abs(got - before).max() > 1e-3  # the weights really changed


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def test_prune_and_decompose_say_that_they_write_the_folded_graph(tmp_path):
    """Compression rebuilds the graph from the folded copy (it must rewrite the constants it slices); it
    says so rather than silently dropping the student's Constant/Shape nodes."""
    from click.testing import CliRunner

    from onnx_fskd.cli.main import main

    path = tmp_path / "messy.onnx"
    onnx.save(messy_export(), path)
    removed = len(messy_export().graph.node) - len(normalise(messy_export()).graph.node)
    assert removed > 0
    for args in (["prune", path, "--ratio", "0.3"], ["decompose", path, "--rank-ratio", "0.5"]):
        out = tmp_path / f"{args[0]}.onnx"
        result = CliRunner().invoke(main, [str(a) for a in args + ["-o", out]])
        assert result.exit_code == 0, result.output
        assert f"has {removed} fewer nodes than the input" in " ".join(result.stdout.split())
        assert not any(n.op_type == "Constant" for n in onnx.load(out).graph.node)
