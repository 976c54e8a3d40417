"""Script-friendly output: the headline `fit MODEL --data`, JSON on stdout with '-', -q/-v, warnings once,
full-width tables in pipes, and a report that records what is needed to reproduce a run."""

from __future__ import annotations

import hashlib
import json
import logging

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from builders import prune_by_slicing, random_inputs, vgg_net
from onnx_fskd import __version__
from onnx_fskd.cli.main import main
from onnx_fskd.cli.output import output_options
from onnx_fskd.pairing import MAP_METADATA_KEY


@pytest.fixture
def files(tmp_path):
    teacher = vgg_net()
    paths = {"model": tmp_path / "model.onnx", "student": tmp_path / "student.onnx", "data": tmp_path / "data.npz"}
    onnx.save(teacher, paths["model"])
    onnx.save(prune_by_slicing(teacher, {"c2": np.arange(8)}), paths["student"])
    np.savez(paths["data"], **random_inputs(teacher, 40), labels=np.arange(40) % 10)
    return paths


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fit_with_only_model_and_data_prunes_and_writes_beside_the_input(files):
    result = run("fit", files["model"], "--data", files["data"], "--provider", "cpu")
    assert result.exit_code == 0, result.output
    out = files["model"].with_name("model.fskd.onnx")
    written = onnx.load(out)
    assert written.producer_name == "onnx-fskd" and written.producer_version == __version__
    assert not any(p.key == MAP_METADATA_KEY for p in written.metadata_props)
    teacher_filters = onnx.load(files["model"]).graph.initializer[0].dims[0]
    assert written.graph.initializer[0].dims[0] < teacher_filters  # pruned by the default ratio
    again = run("fit", files["model"], "--data", files["data"])
    assert again.exit_code == 2 and again.stderr.strip() == f"error: output {out} exists; pass --force to overwrite it"


def test_fit_without_data_says_which_samples_to_give(files):
    result = run("fit", files["model"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: fit needs unlabeled samples") and ".npz" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not files["model"].with_name("model.fskd.onnx").exists()


def test_fit_report_to_stdout_records_versions_options_seed_and_digests(files, tmp_path):
    out = tmp_path / "r.onnx"
    result = run("fit", files["model"], "--student", files["student"], "--data", files["data"], "-o", out,
                 "--report", "-", "--seed", "7", "--keep-map")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the tables went to stderr
    assert "FSKD fit" in result.stderr and f"wrote {out}" in result.stderr
    run_section = report["run"]
    assert run_section["seed"] == 7 and run_section["options"]["seed"] == 7
    assert run_section["options"]["solver"] == "auto" and run_section["options"]["output_path"] == str(out)
    assert run_section["versions"]["onnx-fskd"] == __version__ and run_section["versions"]["onnx"] == onnx.__version__
    for role in ("model", "student", "data"):
        name = "teacher" if role == "model" else role
        assert run_section["inputs"][name]["sha256"] == hashlib.sha256(files[role].read_bytes()).hexdigest()
    assert not (tmp_path / "-").exists()


def test_seed_changes_the_held_out_split(files, tmp_path):
    reports = []
    for seed in (0, 1):
        result = run("fit", files["model"], "--student", files["student"], "--data", files["data"],
                     "-o", tmp_path / f"r{seed}.onnx", "--report", "-", "--seed", str(seed), "-q")
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    assert reports[0]["before"]["relative_error"] != reports[1]["before"]["relative_error"]


def test_eval_json_to_stdout_parses_and_quiet_prints_nothing_else(files):
    result = run("eval", files["model"], "--data", files["data"], "--reference", files["model"], "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["agreement"] == 1.0 and document["relative_error"] == 0.0
    assert result.stderr == ""


def test_quiet_silences_tables_on_every_command(files, tmp_path):
    for args in (["prune", files["model"], "--ratio", "0.5", "-o", tmp_path / "p.onnx", "-q"],
                 ["decompose", files["model"], "--rank-ratio", "0.5", "-o", tmp_path / "d.onnx", "-q"],
                 ["fit", files["model"], "--data", files["data"], "-o", tmp_path / "f.onnx", "-q"],
                 ["eval", files["model"], "--data", files["data"], "-q"]):
        result = run(*args)
        assert result.exit_code == 0 and result.output == "", (args, result.output)
    assert onnx.load(tmp_path / "p.onnx").producer_name == "onnx-fskd"


def test_tables_are_not_wrapped_in_a_pipe(files, tmp_path):
    model = onnx.load(files["model"])
    long_name = "backbone/stage_one/block_zero/very_long_convolution_name/Conv"
    for node in model.graph.node:
        if node.name == "c1":
            node.name = long_name
    onnx.save(model, tmp_path / "long.onnx")
    result = run("prune", tmp_path / "long.onnx", "--ratio", "0.5", "-o", tmp_path / "p.onnx")
    assert result.exit_code == 0, result.output
    assert any(long_name in line for line in result.stdout.splitlines())
    assert max(len(line) for line in result.stdout.splitlines()) > 80


@click.command()
@output_options
def _chatty() -> None:
    log = logging.getLogger("onnx_fskd.runtime")
    for _ in range(10):
        log.warning("CUDA provider could not start; running on CPU")
    log.info("a progress note")
    click.echo("done")


@pytest.mark.parametrize("flags, stderr", [
    ([], "warning: CUDA provider could not start; running on CPU\n"),
    (["-v"], "warning: CUDA provider could not start; running on CPU\ninfo: a progress note\n"),
    (["-q"], ""),
])
def test_library_warnings_print_once_and_follow_verbosity(flags, stderr):
    result = CliRunner().invoke(_chatty, flags)
    assert result.exit_code == 0 and result.stdout == "done\n" and result.stderr == stderr
    logger = logging.getLogger("onnx_fskd")  # put back for whoever else watches it
    assert logger.propagate and not logger.handlers
