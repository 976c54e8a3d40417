"""The installed package: one top-level `onnx_fskd` in the wheel, `python -m onnx_fskd`, a --help that
loads no heavy module, and one line when no ONNX Runtime is installed."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import onnx_fskd
from onnx_fskd.cli.main import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("onnxruntime", "scipy", "onnx_graphsurgeon", "PIL")


def _python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, **kwargs)


def test_wheel_holds_only_the_onnx_fskd_package(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info into the tree it builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "bench",
                                                                "samples", "__pycache__"))
    built = _python("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(source))
    if built.returncode != 0 and "setuptools" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    wheel = next(tmp_path.glob("onnx_fskd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"onnx_fskd"}
    assert "onnx_fskd/cli/main.py" in names and "onnx_fskd/__main__.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "onnx-fskd = onnx_fskd.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_python_dash_m_prints_the_version():
    result = _python("-m", "onnx_fskd", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"onnx-fskd, version {onnx_fskd.__version__}"


def test_help_loads_no_heavy_module():
    code = ("import sys; from onnx_fskd.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr
    assert "fit" in result.stdout and result.stdout.strip().splitlines()[-1] == "[]"


def test_import_onnx_fskd_is_light_until_the_api_is_used():
    result = _python("-c", "import sys, onnx_fskd; print('onnxruntime' in sys.modules, callable(onnx_fskd.fit), "
                           "'onnxruntime' in sys.modules)")
    assert result.stdout.split() == ["False", "True", "True"], result.stderr


@pytest.mark.parametrize("name", list(COMMANDS))
def test_listed_help_matches_each_command(name):
    module, attribute, short_help = COMMANDS[name]
    command = getattr(importlib.import_module(f"onnx_fskd.cli.{module}"), attribute)
    assert main.get_command(None, name) is command
    assert command.get_short_help_str(limit=80) == short_help


def test_missing_onnxruntime_is_one_error_line(tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from onnx_fskd.cli.main import main\n"
            f"main(['eval', {str(tmp_path / 'm.onnx')!r}, '--data', 'x.npz'])")
    result = _python("-c", code)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'error: no ONNX Runtime found: install one build, pip install "onnx-fskd[cpu]" '
        '(or "onnx-fskd[gpu]" for CUDA, see README)']


def test_missing_onnxruntime_is_an_fskd_error_in_the_api():
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "import onnx_fskd\n"
            "try:\n    onnx_fskd.fit\nexcept onnx_fskd.FskdError as exc:\n    print(exc)")
    result = _python("-c", code)
    assert result.returncode == 0 and result.stdout.strip() == onnx_fskd.NO_ONNXRUNTIME, result.stderr
