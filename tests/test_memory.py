"""--max-memory: past the budget the activation cache is memory-mapped from an unnamed temporary file;
the fit is the same, nothing is left on disk, and a full disk is one clear error."""

from __future__ import annotations

import errno
import os
import tempfile

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnx_fskd.memory as memory
from builders import NetBuilder, random_inputs
from onnx_fskd.buffers import BufferPool
from onnx_fskd.cli.main import main
from onnx_fskd.data import Samples
from onnx_fskd.errors import FskdError
from onnx_fskd.memory import ActivationMemory, parse_size
from onnx_fskd.pipeline import FitConfig, fit
from test_fit import perturbed

MB = 1 << 20


def plain_net() -> onnx.ModelProto:
    """Three 3×3 convs on a 64×64 map: the cached inputs of the 2nd and 3rd are 8 MB at 64 samples."""
    b = NetBuilder(5)
    x = b.conv_bn_relu("c1", "input", 8, 8)
    x = b.conv_bn_relu("c2", x, 8, 8)
    x = b.conv_bn_relu("c3", x, 8, 8)
    x = b.node("Flatten", "flat", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    return b.model(b.gemm("fc", x, 8, 4), (8, 64, 64), 4, "plain")


@pytest.fixture(scope="module")
def pair():
    teacher = plain_net()
    return teacher, perturbed(teacher, 0.3), Samples(random_inputs(teacher, 64))


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_a_zero_budget_maps_the_cache_and_fits_exactly_the_same(pair):
    teacher, student, samples = pair
    in_ram = fit(teacher, student, samples, FitConfig(augment="none", batch_size=16, max_memory=1 << 40))
    mapped = fit(teacher, student, samples, FitConfig(augment="none", batch_size=16, max_memory=0))
    assert in_ram.report.memory["peak_mapped_bytes"] == 0 and in_ram.report.memory["peak_in_ram_bytes"] >= 8 * MB
    assert mapped.report.memory["peak_in_ram_bytes"] == 0 and mapped.report.memory["peak_mapped_bytes"] >= 8 * MB
    assert mapped.report.memory["limit_bytes"] == 0
    got, want = weights(mapped.model), weights(in_ram.model)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert mapped.report.after.relative_error == in_ram.report.after.relative_error
    assert mapped.report.after.relative_error < 0.5 * mapped.report.before.relative_error


def test_the_mapped_file_never_has_a_name_on_disk(pair, tmp_path, monkeypatch):
    teacher, student, samples = pair
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    allocate = memory._mapped

    def watched(*args):
        array = allocate(*args)
        seen.append(sorted(os.listdir(tmp_path)))
        return array

    monkeypatch.setattr(memory, "_mapped", watched)
    fit(teacher, student, samples, FitConfig(augment="none", batch_size=16, max_memory=0))
    assert seen and all(listing == [] for listing in seen)
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_one_clear_error_and_nothing_is_written(pair, tmp_path, monkeypatch):
    teacher, student, samples = pair

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(FskdError, match="no room .* raise --max-memory"):
        fit(teacher, student, samples, FitConfig(augment="none", batch_size=16, max_memory=0))
    for name, model in (("teacher.onnx", teacher), ("student.onnx", student)):
        onnx.save(model, tmp_path / name)
    np.save(tmp_path / "data.npy", samples.arrays["input"])
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fit", str(tmp_path / "teacher.onnx"), "--student", str(tmp_path / "student.onnx"),
                                       "--data", str(tmp_path / "data.npy"), "-o", str(out), "--max-memory", "0", "--batch-size", "16"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "no room" in lines[0], result.output
    assert not out.exists()


def test_ram_within_the_budget_then_mapped_and_freed_buffers_give_it_back():
    cache = ActivationMemory(limit=12 * MB)
    first = cache.allocate((2 * MB,), np.float32)            # 8 MB: fits
    second = cache.allocate((2 * MB,), np.float32)           # 16 MB would not: mapped
    assert not isinstance(first, np.memmap) and isinstance(second, np.memmap)
    second[:] = 1.5
    assert float(second[::4096].sum()) == 1.5 * 512 and cache.mapped == 8 * MB
    del first, second
    assert cache.in_ram == 0 and cache.mapped == 0
    assert cache.summary() == {"limit_bytes": 12 * MB, "peak_in_ram_bytes": 8 * MB, "peak_mapped_bytes": 8 * MB}
    assert not isinstance(cache.allocate((3 * MB,), np.float32), np.memmap)  # 12 MB: RAM again


def test_the_pool_gives_back_free_buffers_too_small_to_reuse_before_mapping():
    cache = ActivationMemory(limit=12 * MB)
    pool = BufferPool(memory=cache)
    pool.retire(pool.empty((2 * MB,), np.float32))   # 8 MB in RAM, free in the pool
    assert cache.in_ram == 8 * MB
    bigger = pool.empty((3 * MB,), np.float32)      # 12 MB: the free 8 MB is given back, then it fits
    assert not isinstance(bigger, np.memmap) and cache.in_ram == 12 * MB


@pytest.mark.parametrize("text, size", [("4096", 4096), ("512M", 512 * MB), ("1.5G", 3 * 512 * MB),
                                        ("2GB", 2048 * MB), ("3GiB", 3072 * MB), ("64k", 65536), ("0", 0)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "1.2.3M", "5X"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(FskdError, match="--max-memory"):
        parse_size(text)


def test_cli_refuses_a_bad_size_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["fit", str(tmp_path / "t.onnx"), "--data", str(tmp_path / "d.npy"),
                                       "--max-memory", "5X"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "'5X' is not a size" in lines[0], result.output


def test_cli_says_when_the_cache_was_mapped(pair, tmp_path):
    teacher, student, samples = pair
    for name, model in (("teacher.onnx", teacher), ("student.onnx", student)):
        onnx.save(model, tmp_path / name)
    np.save(tmp_path / "data.npy", samples.arrays["input"])
    args = ["fit", str(tmp_path / "teacher.onnx"), "--student", str(tmp_path / "student.onnx"),
            "--data", str(tmp_path / "data.npy"), "--batch-size", "16", "--augment", "none"]
    mapped = CliRunner().invoke(main, args + ["-o", str(tmp_path / "a.onnx"), "--max-memory", "4M"])
    in_ram = CliRunner().invoke(main, args + ["-o", str(tmp_path / "b.onnx"), "--max-memory", "1G"])
    assert mapped.exit_code == 0 and in_ram.exit_code == 0, mapped.output + in_ram.output
    assert "activation cache over --max-memory (4 MB)" in mapped.output
    assert "mapped from a temporary file" not in in_ram.output
