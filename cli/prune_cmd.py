"""`onnx-fskd prune`: structured channel pruning by dependency groups, writing the map `fit` reads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
from rich.table import Table

from onnx_fskd.compress import CompressResult, prune_model
from onnx_fskd.compress.prune import check_prune_options
from onnx_fskd.compress.summary import summarize
from onnx_fskd.data import input_specs, load_samples
from onnx_fskd.model_io import load_model, write_model
from onnx_fskd.outputs import OutputSet, protected_files
from onnx_fskd.pairing import read_map
from onnx_fskd.pipeline import reselect_student
from onnx_fskd.provenance import stamp_producer

from onnx_fskd.costs import check_input_shapes

from .common import FiniteFloat, OneLineErrors, build_input_shapes, input_shapes_option, reports_errors
from .output import human_console, output_options


@click.command("prune", cls=OneLineErrors)
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ratio", type=FiniteFloat(), required=True, help="Fraction of output channels to remove, in [0, 1).")
@click.option("--head-ratio", type=FiniteFloat(), default=None,
              help="Fraction of attention heads to remove per attention block, in [0, 1) (default: --ratio).")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the pruned student.")
@click.option("--criterion", type=click.Choice(["l1", "l2", "bn", "random"]), default="l1", show_default=True,
              help="Channel importance: filter L1/L2 norm, BatchNorm |gamma| (network slimming), or random.")
@click.option("--global", "global_", is_flag=True,
              help="One threshold over importances normalised per group, instead of the same ratio per layer.")
@click.option("--exclude", metavar="REGEX", default=None, help="Leave layers whose node name matches REGEX unpruned.")
@click.option("--round-to", type=int, default=1, show_default=True, help="Keep channel counts multiples of N.")
@click.option("--prune-residual/--keep-residual", default=False, show_default=True,
              help="Prune the layers a residual Add couples, as one group with one kept set (default: keep them).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --criterion random.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="Unlabeled samples: re-choose each group's kept channels from the data (which teacher "
                   "channels best reconstruct the next layer's output) instead of by --criterion alone.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="With --data: use only the first N samples.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@input_shapes_option
@output_options
@reports_errors
def prune_command(model_path: Path, ratio: float, head_ratio: float | None, output_path: Path, criterion: str,
                  global_: bool, exclude: str | None, round_to: int, prune_residual: bool, seed: int,
                  data_path: Path | None, num_samples: int | None, force: bool, input_shapes) -> None:
    """Remove --ratio of the output channels of MODEL.onnx's Conv/Gemm/MatMul layers (with everything that
    reads them), keep node names, inputs and outputs, and write -o with the teacher→student map that
    `onnx-fskd fit` uses."""
    check_prune_options(ratio, criterion, exclude, round_to, head_ratio)
    shapes = build_input_shapes(input_shapes)
    outputs = OutputSet(protected_files([model_path], [data_path]), force)
    outputs.claim(output_path, "-o")
    model = load_model(model_path)
    check_input_shapes(model, shapes)
    samples = load_samples(data_path, input_specs(model), num_samples) if data_path else None
    result = prune_model(model, ratio, criterion=criterion, global_=global_, exclude=exclude, round_to=round_to,
                         prune_residual=prune_residual, seed=seed, head_ratio=head_ratio)
    reselection = None
    if samples is not None:
        reselection = reselect_student(model, result.model, samples)
        result = replace(result, model=reselection.student, entries=read_map(None, reselection.student)[0])
    with outputs.commit_on_success():
        outputs.stage(output_path, lambda path: write_model(stamp_producer(result.model), path, like=model))
    print_summary(model, result, "pruning", "channels in→out", output_path, result.folded_nodes, shapes)
    if reselection is not None:
        console = human_console()
        for group in reselection.groups:
            line = (f"{group.changed} of {group.kept} kept channels changed by the data, next layer's reconstruction "
                    f"error {group.error_before:.4f} → {group.error_after:.4f}" if group.error_before is not None
                    else f"kept as pruned: {group.note}")
            console.print(f"re-selection {', '.join(group.producers)}: {line}", markup=False, highlight=False)


def print_summary(teacher, result: CompressResult, title: str, change_label: str, output_path: Path,
                  folded: int = 0, input_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """The per-layer table (before → after), the totals, the notes on skipped layers, and how many
    constant-computing nodes the written graph no longer has (compression rebuilds the folded graph)."""
    rows, total = summarize(teacher, result, input_shapes=input_shapes)
    table = Table(title=title)
    for column in ("layer", "op", f"{change_label} before", "after", "params", "MACs"):
        table.add_column(column, justify="right" if column in ("params", "MACs") else "left")
    for row in rows:
        table.add_row(row.name, row.op_type, row.before, row.after, _pair(row.params), _pair(row.macs))
    table.add_section()
    table.add_row("total", "", "", "", _pair(total.params, percent=True), _pair(total.macs, percent=True))
    console = human_console()
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    if folded:
        console.print(f"note: {output_path} has {folded} fewer nodes than the input besides the compression: its "
                      f"constant sub-graphs (Constant, Identity of weights, static Shape arithmetic) are folded into "
                      f"initializers, which is what compression rewrites", markup=False, highlight=False)
    console.print(f"wrote {output_path} (map of {len(result.entries)} points in its metadata)")


def _pair(values: tuple[int, int], percent: bool = False) -> str:
    before, after = values
    text = f"{_short(before)} → {_short(after)}"
    return f"{text} ({after / before:.1%})" if percent and before else text


def _short(count: int) -> str:
    """1234 → 1.23k, 7225344 → 7.23M: the table stays narrow enough for a terminal."""
    for size, unit in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)
