"""`onnx-fskd eval`: a model's accuracy, agreement with a reference, costs and latency, as a table and JSON."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from onnx_fskd.data import input_specs, load_batches
from onnx_fskd.evaluation import EvalResult, evaluate
from onnx_fskd.metrics import METRICS
from onnx_fskd.model_io import load_model
from onnx_fskd.outputs import OutputSet, protected_files, write_json as write_json_file
from onnx_fskd.runtime import DEFAULT_BATCH, PROVIDER_CHOICES, resolve_providers

from onnx_fskd.costs import check_input_shapes

from .common import (OneLineErrors, build_image_options, build_input_shapes, image_options, input_shapes_option,
                     reports_errors)
from .output import human_console, is_stdout, output_options, print_json


@click.command("eval", cls=OneLineErrors)
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Samples: .npy, .npz (labels under 'labels'), a folder of .npz batches, or a folder of images "
                   "(class sub-folders give labels).")
@click.option("--reference", "reference_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Model to compare outputs with, usually the uncompressed teacher.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Also write the results as JSON to this file (overwritten if present); '-' writes them to "
                   "stdout and the table to stderr.")
@click.option("--output", "output_name", metavar="NAME", default=None,
              help="The output to measure accuracy, agreement and cosine on (default: the first); every "
                   "output's relative error is reported.")
@click.option("--metric", type=click.Choice(METRICS), default="auto", show_default=True,
              help="Agreement with --reference: top-1 (per position for rank-3 logits) or cosine similarity; "
                   "auto takes cosine for embedding-like outputs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH, show_default=True,
              help="Batch size for inference and for the batched latency.")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
              help="ONNX Runtime provider; auto takes CUDA when available.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Use only the first N samples.")
@image_options
@input_shapes_option
@output_options
@reports_errors
def eval_command(model_path: Path, data_path: Path, reference_path: Path | None, json_path: Path | None,
                 output_name: str | None, metric: str, batch_size: int, provider: str, num_samples: int | None,
                 input_shapes, **image) -> None:
    """Evaluate MODEL.onnx on the --data samples: accuracy (with labels), agreement with --reference,
    parameters, MACs and latency."""
    outputs = OutputSet(protected_files([model_path, reference_path], [data_path]), force=True)
    to_file = json_path is not None and not is_stdout(json_path)
    if to_file:  # checked before the slow part, so a bad path fails at once
        outputs.claim(json_path, "--json")
    shapes = build_input_shapes(input_shapes)
    model = load_model(model_path)
    check_input_shapes(model, shapes)
    reference = load_model(reference_path) if reference_path else None
    batches = load_batches(data_path, input_specs(model), num_samples, build_image_options(**image))
    result = evaluate(model, batches, reference, resolve_providers(provider), batch_size, output=output_name,
                      metric=metric, input_shapes=shapes)
    if to_file:
        with outputs.commit_on_success():
            outputs.stage(json_path, lambda path: write_json_file(result.to_json(), path))
    human_console(data_on_stdout=is_stdout(json_path)).print(_table(result))
    if is_stdout(json_path):
        print_json(result.to_json())


def _table(result: EvalResult) -> Table:
    table = Table("metric", "value", title=f"evaluation of output {result.output}")
    table.add_row("accuracy", _fraction(result.accuracy, "n/a (samples carry no labels)"))
    if result.metric == "cosine":
        table.add_row("cosine similarity", "n/a (no --reference)" if result.cosine is None
                      else f"{result.cosine:.4f}")
    else:
        table.add_row("top-1 agreement", _fraction(result.agreement, "n/a (no --reference)"))
    if not result.outputs:
        table.add_row("relative error", "n/a (no --reference)")
    for name, values in result.outputs.items():
        table.add_row(f"relative error {name}" if len(result.outputs) > 1 else "relative error",
                      f"{values['relative_error']:.4g}")
    table.add_row("parameters", f"{result.params:,}")
    table.add_row("MACs per sample", f"{result.macs:,}")
    for key, milliseconds in result.latency_ms.items():
        table.add_row(f"latency {key.replace('_', ' ')}", f"{milliseconds:.3f} ms")
    table.add_row("samples", str(result.samples))
    table.add_row("provider", result.provider)
    return table


def _fraction(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value:.2%}"
