"""Adapters applied in any layout, block-diagonal solves, and the buffer pool's safety."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_fskd.buffers import BufferPool
from onnx_fskd.solve import Adapter, solve_adapter
from onnx_fskd.stats import GramStats, MappedGramStats, as_planes, as_rows


@pytest.mark.parametrize("shape,axis,group", [((3, 8, 5, 4), 1, 8), ((3, 8, 5, 4), 1, 2), ((3, 8, 5, 4), 1, 1),
                                               ((6, 8), 1, 8), ((2, 5, 8), 2, 4)])
def test_apply_matches_explicit_product(shape, axis, group):
    rng = np.random.default_rng(0)
    channels = shape[axis]
    adapter = Adapter(rng.normal(size=(channels // group, group, group)), rng.normal(size=channels))
    y = rng.normal(size=shape).astype(np.float32)
    expected = np.moveaxis(np.moveaxis(y, axis, -1) @ adapter.q.T + adapter.d, -1, axis)
    np.testing.assert_allclose(adapter.apply(y, axis), expected, rtol=1e-5, atol=1e-5)
    out = np.empty_like(y)
    assert adapter.apply(y, axis, out) is out
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_block_solve_recovers_a_block_diagonal_map_from_planes():
    rng = np.random.default_rng(1)
    truth = Adapter(rng.normal(size=(4, 3, 3)), rng.normal(size=12))
    y = rng.normal(size=(20, 12, 30)).astype(np.float32)
    target = truth.apply(y, 1)
    stats = GramStats.empty(12, blocks=4)
    stats.add(as_planes(y, 1), as_planes(target, 1))
    rows = GramStats.empty(12, blocks=4)
    rows.add(as_rows(y, 1), as_rows(target, 1))
    np.testing.assert_allclose(stats.zz, rows.zz, rtol=1e-9)
    fitted = solve_adapter(stats, ridge=0.0)
    np.testing.assert_allclose(fitted.q, truth.q, atol=1e-4)
    np.testing.assert_allclose(fitted.d, truth.d, atol=1e-4)
    assert stats.relative_error(fitted.params) < 1e-5


def test_pool_never_hands_out_an_array_still_in_use():
    pool = BufferPool()
    held = np.ones(1 << 21, np.float32)  # 8 MB, above the pool's threshold
    pool.retire(held)
    fresh = pool.empty((1 << 21,), np.float32)
    assert not np.shares_memory(fresh, held)  # ``held`` is still referenced here
    address = held.__array_interface__["data"][0]
    del held
    reused = pool.empty((1 << 20,), np.float32)
    assert reused.__array_interface__["data"][0] == address


def test_pool_keeps_at_most_its_budget_of_free_memory_largest_given_back_first():
    mb = 1 << 20
    pool = BufferPool(max_free_bytes=20 * mb)
    for size in (16, 8, 12):  # MB, retired and no longer referenced anywhere else
        pool.retire(np.empty(size * mb, np.uint8))
    assert sorted(b.nbytes // mb for b in pool._free) == [8, 12]  # 16 + 8 > 20 gave the 16 MB one back
    reused = pool.empty((10 * mb,), np.uint8)  # best fit: the 12 MB buffer
    assert reused.base is not None and reused.base.nbytes == 12 * mb
    assert [b.nbytes // mb for b in pool._free] == [8]


def test_one_blas_thread_limits_every_blas_library_and_restores_them():
    """Every BLAS library loaded (numpy's and scipy's OpenBLAS) runs on one thread inside, on two again
    outside."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from onnx_fskd.solve import one_blas_thread

    blas = lambda: {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}  # noqa: E731
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas()
        assert before and set(before.values()) == {2}
        with one_blas_thread():
            assert set(blas().values()) == {1}
        assert blas() == before


@pytest.mark.parametrize("cores, unknowns, threads", [(16, 130, 8), (16, 63, 1), (2, 130, 1), (3, 64, 1), (5, 64, 2)])
def test_large_systems_are_solved_on_half_the_cores(monkeypatch, cores, unknowns, threads):
    """A system of PARALLEL_SOLVE_UNKNOWNS unknowns or more is solved with BLAS on half the usable cores
    (one on a 2-core machine); a smaller one on one thread."""
    import onnx_fskd.solve as solve

    monkeypatch.setattr(solve.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(solve, "PARALLEL_SOLVE_UNKNOWNS", 64)  # small systems for the test
    asked: list[int] = []
    limit = solve.blas_threads
    monkeypatch.setattr(solve, "blas_threads", lambda count: (asked.append(count), limit(count))[1])
    rng = np.random.default_rng(0)
    a = rng.normal(size=(unknowns + 3, unknowns))
    lhs, rhs = (a.T @ a + np.eye(unknowns))[None], rng.normal(size=(1, unknowns, 2))
    np.testing.assert_allclose(lhs[0] @ solve._solve_spd(lhs, rhs)[0], rhs[0], atol=1e-8)
    assert asked == [threads]


@pytest.mark.parametrize("name", ["stem", "dw1", "gc1"])
def test_weight_update_by_blocks_is_the_dense_product(name):
    """adapter_update multiplies block by block of Q (a depthwise conv's rows scaled, a grouped conv's
    blocks): the same weights and shift as the dense Q·W, Q·offset + d."""
    from builders import mobile_net
    from onnx_fskd.fuse import adapter_update, bias_slot, chain_scale
    from onnx_fskd.graph import GraphIndex
    from onnx_fskd.points import find_points

    graph = GraphIndex(mobile_net())
    point = next(p for p in find_points(graph).points if p.name == name)
    rng = np.random.default_rng(0)
    count = point.channels // point.group_size
    adapter = Adapter(rng.normal(size=(count, point.group_size, point.group_size)), rng.normal(size=point.channels))
    update = adapter_update(point, graph, adapter)
    node = graph.node_by_name[point.name]
    scale = chain_scale(point)
    major = point.op.to_output_major(node, graph.constant(point.weight).astype(np.float64))
    dense = np.tensordot(adapter.q * scale[None, :] / scale[:, None], major, axes=(1, 0))
    np.testing.assert_allclose(update.weight, dense, rtol=1e-12, atol=1e-12)
    slot = bias_slot(point, graph)
    offset = slot.scale_after * slot.shift + slot.shift_after
    want = (adapter.q @ offset + adapter.d - slot.shift_after) / slot.scale_after
    np.testing.assert_allclose(update.shift, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("blocks", [1, 4, 12])
def test_the_error_of_the_unchanged_student_is_the_general_formula(blocks):
    """squared_error of P = [I; 0] (taken from traces) equals Σ‖t − y‖² and the general product formula."""
    rng = np.random.default_rng(blocks)
    y = rng.normal(size=(300, 12))
    t = y + 0.1 * rng.normal(size=(300, 12)) + 0.5
    stats = GramStats.empty(12, blocks=blocks)
    stats.add(y, t)
    identity = Adapter.identity(12, 12 // blocks).params
    general = float(stats.tt - 2.0 * np.sum(identity * stats.zt) + np.sum(identity * (stats.zz @ identity)))
    assert stats.squared_error(identity) == pytest.approx(general, rel=1e-10)
    assert stats.squared_error(identity) == pytest.approx(float(np.sum((t - y) ** 2)), rel=1e-10)
    nudged = identity.copy()
    nudged[:, -1] += 1e-3  # not the identity: the general formula
    assert stats.squared_error(nudged) == pytest.approx(float(np.sum((t - y - 1e-3) ** 2)), rel=1e-9)


@pytest.mark.parametrize("fit_bias", [True, False])
def test_a_mapped_point_solves_and_scores_as_its_dense_sums(fit_bias):
    """y = A·x + b with x narrower than y: the solve in x's coordinates gives the dense solve's Q and d, and
    the guard's errors and ΣT² are the dense sums' — with few rows (Y is rank r, only the ridge decides)
    and with a target far from the student and far from zero mean."""
    rng = np.random.default_rng(7 + fit_bias)
    channels, inputs, rows = 24, 5, 60
    a, b = rng.normal(size=(channels, inputs)), rng.normal(size=channels)
    x = rng.normal(size=(rows, inputs)) + 2.0
    y = x @ a.T + b
    t = y @ rng.normal(size=(channels, channels)) * 0.3 + y + 0.1 * rng.normal(size=(rows, channels)) - 4.0
    d = t - y
    dense = GramStats.empty(channels)
    dense.add(y, t)
    mapped = MappedGramStats(a, b, x.T @ x, x.T @ d, x.sum(0), d.sum(0), float(np.sum(d * d)), float(rows))
    for got, want in ((mapped.dense().zz, dense.zz), (mapped.dense().zt, dense.zt)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    assert mapped.tt == pytest.approx(dense.tt, rel=1e-12)
    for ridge in (1e-3, 1.0):
        fast, slow = solve_adapter(mapped, ridge, fit_bias), solve_adapter(dense, ridge, fit_bias)
        np.testing.assert_allclose(fast.q, slow.q, atol=1e-8 * np.abs(slow.q).max())
        np.testing.assert_allclose(fast.d, slow.d, atol=1e-8 * np.abs(slow.d).max() + 1e-12)
        for params in (fast.params, Adapter.identity(channels, channels).params):
            assert mapped.squared_error(params) == pytest.approx(dense.squared_error(params), rel=1e-8)
            assert mapped.relative_error(params) == pytest.approx(dense.relative_error(params), rel=1e-8)
    added = mapped + mapped
    assert added.rows == 2 * rows and added.dense().zz == pytest.approx(2 * dense.zz)
