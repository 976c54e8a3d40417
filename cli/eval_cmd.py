"""`onnx-fskd eval`: a model's accuracy, agreement with a reference, costs and latency, as a table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from onnx_fskd.data import input_specs, load_samples
from onnx_fskd.errors import FskdError
from onnx_fskd.evaluate import EvalResult, evaluate
from onnx_fskd.model_io import check_output_path, load_model
from onnx_fskd.runtime import DEFAULT_BATCH, PROVIDER_CHOICES, resolve_providers

from .common import build_image_options, image_options, reports_errors


@click.command("eval")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Samples: .npy, .npz (labels under 'labels') or a folder of images (class sub-folders give labels).")
@click.option("--reference", "reference_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Model to compare outputs with, usually the uncompressed teacher.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results to this JSON file (overwritten if present).")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH, show_default=True,
              help="Batch size for inference and for the batched latency.")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
              help="ONNX Runtime provider; auto takes CUDA when available.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Use only the first N samples.")
@image_options
@reports_errors
def eval_command(model_path: Path, data_path: Path, reference_path: Path | None, json_path: Path | None,
                 batch_size: int, provider: str, num_samples: int | None, **image) -> None:
    """Evaluate MODEL.onnx on the --data samples: accuracy (with labels), agreement with --reference,
    parameters, MACs and latency."""
    model = load_model(model_path)
    reference = load_model(reference_path) if reference_path else None
    if json_path:  # checked before the slow part, so a bad path fails at once
        check_output_path(json_path, [model_path, reference_path, data_path], force=True)
    samples = load_samples(data_path, input_specs(model), num_samples, build_image_options(**image))
    result = evaluate(model, samples, reference, resolve_providers(provider), batch_size)
    Console().print(_table(result))
    if json_path:
        try:
            json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        except OSError as exc:
            raise FskdError(f"cannot write {json_path}: {exc.strerror or exc}") from None


def _table(result: EvalResult) -> Table:
    table = Table("metric", "value", title="evaluation")
    table.add_row("accuracy", _fraction(result.accuracy, "n/a (samples carry no labels)"))
    table.add_row("top-1 agreement", _fraction(result.agreement, "n/a (no --reference)"))
    table.add_row("relative error", "n/a (no --reference)" if result.relative_error is None
                  else f"{result.relative_error:.4g}")
    table.add_row("parameters", f"{result.params:,}")
    table.add_row("MACs per sample", f"{result.macs:,}")
    for key, milliseconds in result.latency_ms.items():
        table.add_row(f"latency {key.replace('_', ' ')}", f"{milliseconds:.3f} ms")
    table.add_row("samples", str(result.samples))
    table.add_row("provider", result.provider)
    return table


def _fraction(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value:.2%}"
