"""`onnx-fskd fit`: recover a compressed student from a few unlabeled samples."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnx_fskd.api import DEFAULT_PRUNE_RATIO, NO_DATA_MESSAGE, default_output_path, finish_recovered
from onnx_fskd.compare import ModelFigures, model_figures
from onnx_fskd.compress import CompressResult
from onnx_fskd.data import input_specs, load_samples
from onnx_fskd.errors import UsageError
from onnx_fskd.model_io import load_model, write_model
from onnx_fskd.outputs import OutputSet, protected_files, write_json as write_json_file
from onnx_fskd.pipeline import FitConfig, check_compatible, fit, make_student
from onnx_fskd.provenance import run_record, stamp_producer
from onnx_fskd.report import HELD_OUT, FitReport, OutputMetrics
from onnx_fskd.runtime import DEFAULT_BATCH, PROVIDER_CHOICES, resolve_providers

from onnx_fskd.costs import check_input_shapes

from .common import (ByteSize, FiniteFloat, OneLineErrors, build_image_options, build_input_shapes, image_options,
                     input_shapes_option, reports_errors)
from .output import human_console, is_stdout, output_options, print_json, warning_console

_DEFAULTS = FitConfig()


@click.command("fit", cls=OneLineErrors)
@click.argument("teacher_path", metavar="TEACHER.onnx", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--student", "student_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The compressed model to recover (pruned or decomposed).")
@click.option("--prune", "prune_ratio", type=FiniteFloat(), default=None,
              help="Instead of --student: prune this fraction of TEACHER's channels (L1), then recover. "
                   f"With none of --student/--prune/--decompose: --prune {DEFAULT_PRUNE_RATIO}.")
@click.option("--decompose", "rank_ratio", type=FiniteFloat(), default=None,
              help="Instead of --student: decompose TEACHER's layers at this rank ratio, then recover.")
@click.option("--student-out", type=click.Path(dir_okay=False, path_type=Path),
              help="With --prune/--decompose: also write the unrecovered student here (an existing file needs --force).")
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="Unlabeled samples (a few hundred): .npy, .npz (one array per input), a folder of .npz "
                   "batches or a folder of images.")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the recovered student (default: TEACHER.fskd.onnx beside TEACHER).")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Use only the first N samples.")
@click.option("--mode", type=click.Choice(["sequential", "parallel"]), default=_DEFAULTS.mode, show_default=True,
              help="sequential: each point sees the corrected earlier points (the paper); parallel: one pass, for comparison.")
@click.option("--points", type=click.Choice(["auto", "block-ends"]), default=_DEFAULTS.points, show_default=True,
              help="auto: every paired Conv/Gemm/MatMul; block-ends: the last linear op of each block only.")
@click.option("--residual-target", type=click.Choice(["sum", "plain"]), default=_DEFAULTS.residual_target,
              show_default=True, help="For a point feeding a residual Add: match the teacher's sum, or its own output.")
@click.option("--solver", type=click.Choice(["q", "full", "auto"]), default=_DEFAULTS.solver, show_default=True,
              help="q: the paper's C×C map after each op (fast); full: refit each op's whole weight from its "
                   "input patches (recovers more, statistics cost ~k²·C_in/C_out times q's); auto: "
                   "full where that cost is at most 16× the layer's, q elsewhere (on ImageNet-size nets "
                   "1–3× the fit time of q: use q when time matters).")
@click.option("--stats-positions", type=click.Choice(["auto", "all"]), default=_DEFAULTS.stats_positions,
              show_default=True,
              help="auto: a conv's statistics read every 2nd–4th row and column of its output map where that "
                   "still leaves a 14×14 grid per sample and 64 rows per feature (2–16× less statistics work); "
                   "all: every position.")
@click.option("--max-memory", type=ByteSize(), default=None, metavar="SIZE",
              help="RAM for the activations the fit caches (both nets' tensors at its cut points, for every "
                   "sample), e.g. 2G or 512M; beyond it they are memory-mapped from an unnamed temporary file in "
                   "TMPDIR (same fit, at the disk's speed). Default: half the RAM available at the start.")
@click.option("--ridge", type=FiniteFloat(low=0), default=_DEFAULTS.ridge, show_default=True,
              help="Ridge strength relative to the Gram trace; Q is shrunk towards identity.")
@click.option("--holdout", type=FiniteFloat(0, 1, high_open=True), default=_DEFAULTS.holdout, show_default=True,
              help="Fraction of samples held out to accept or reject each point's Q (needs >= 2 samples; "
                   "0 turns the guard off and keeps every correction).")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH, show_default=True,
              help="Batch size for ONNX Runtime (a fixed batch dimension in the model wins).")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
              help="ONNX Runtime provider; auto takes CUDA when onnxruntime-gpu can use it.")
@click.option("--map", "map_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON map of teacher→student points and kept channels (see README), when pairing is ambiguous.")
@click.option("--reselect/--no-reselect", default=_DEFAULTS.reselect, show_default=True,
              help="Before the fit, re-choose which teacher channels a pruned student keeps, from the data "
                   "(needs the channel map: ours, --map, or found from weights).")
@click.option("--augment", type=click.Choice(["auto", "none", "flip", "flip+shift"]), default=_DEFAULTS.augment,
              show_default=True, help="Extra fit rows from image samples: horizontal flips (auto: for image "
                                      "inputs only), optionally ±2-pixel shifts.")
@click.option("--polish", "polish_steps", type=click.IntRange(min=0), default=_DEFAULTS.polish_steps,
              show_default=True, metavar="STEPS",
              help="After the closed form, STEPS Adam steps of unlabeled distillation on the outputs, kept only "
                   "if the held-out error drops (needs the 'polish' extra: PyTorch, onnx2torch).")
@click.option("--polish-lr", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.polish_lr,
              show_default=True, help="Learning rate of --polish.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Also write the fit report as JSON ('-': to stdout, the tables then go to stderr; an existing "
                   "file needs --force).")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
              help="Seed of the held-out split (recorded in the report).")
@click.option("--keep-map", is_flag=True,
              help="Keep the internal onnx_fskd.map channel map in the recovered model's metadata.")
@click.option("--force", is_flag=True, help="Overwrite existing output files (-o, --report, --student-out).")
@image_options
@input_shapes_option
@output_options
@reports_errors
def fit_command(teacher_path: Path, student_path: Path | None, prune_ratio: float | None, rank_ratio: float | None,
                student_out: Path | None, data_path: Path | None, output_path: Path | None,
                num_samples: int | None, mode: str, points: str, residual_target: str, solver: str,
                stats_positions: str, max_memory: int | None, ridge: float,
                holdout: float, batch_size: int, provider: str, map_path: Path | None, reselect: bool,
                augment: str, polish_steps: int, polish_lr: float, report_path: Path | None, seed: int,
                keep_map: bool, force: bool, input_shapes, **image) -> None:
    """Recover a compressed student of TEACHER.onnx from a few unlabeled samples.

    Fits one least-squares correction per point of the student so its outputs follow the teacher's,
    merges them into the student's weights (no node added) and writes -o (default TEACHER.fskd.onnx).
    The student is --student, or made from TEACHER with --prune R or --decompose R; with none of the
    three, TEACHER is pruned by the default ratio."""
    options = click.get_current_context().params.copy()
    if sum(option is not None for option in (student_path, prune_ratio, rank_ratio)) > 1:
        raise UsageError("give at most one of --student, --prune R or --decompose R")
    if student_path is None and rank_ratio is None and prune_ratio is None:
        prune_ratio = options["prune_ratio"] = DEFAULT_PRUNE_RATIO
    if data_path is None:
        raise UsageError(NO_DATA_MESSAGE)
    if student_out is not None and student_path is not None:
        raise UsageError("--student-out goes with --prune or --decompose")
    output_option = "-o" if output_path is not None else "output"
    output_path = options["output_path"] = output_path or default_output_path(teacher_path)
    outputs = OutputSet(protected_files([teacher_path, student_path], [data_path, map_path]), force)
    outputs.claim(output_path, output_option)
    for option, extra in (("--student-out", student_out), ("--report", None if is_stdout(report_path) else report_path)):
        if extra is not None:
            outputs.claim(extra, option)
    shapes = build_input_shapes(input_shapes)
    teacher = load_model(teacher_path)
    check_input_shapes(teacher, shapes)
    compressed = None
    if student_path is not None:
        student = load_model(student_path)
    else:
        compressed = make_student(teacher, prune_ratio, rank_ratio)
        student = compressed.model
    check_compatible(teacher, student)
    samples = load_samples(data_path, input_specs(student), num_samples, build_image_options(**image))
    config = FitConfig(mode=mode, points=points, residual_target=residual_target, solver=solver,
                       stats_positions=stats_positions, max_memory=max_memory, ridge=ridge,
                       holdout=holdout, batch_size=batch_size, provider=provider, seed=seed,
                       reselect=reselect, augment=augment, polish_steps=polish_steps, polish_lr=polish_lr)
    console = human_console(data_on_stdout=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks = {"points": bar.add_task("points", total=None), "samples": bar.add_task("samples", total=None)}
        result = fit(teacher, student, samples, config, str(map_path) if map_path else None,
                     progress=lambda stage, done, total: bar.update(tasks[stage], completed=done, total=total))
    figures = None
    if compressed is not None:
        figures = model_figures({"teacher": teacher, "student": student, "recovered": result.model}, samples,
                                resolve_providers(provider), batch_size, input_shapes=shapes)
    result.report.run = run_record(options, seed, {"teacher": teacher_path, "student": student_path,
                                                   "data": data_path, "map": map_path})
    document = result.report.to_json() | ({"costs": [asdict(f) for f in figures]} if figures else {})
    with outputs.commit_on_success():
        outputs.stage(output_path, lambda path: write_model(finish_recovered(result.model, keep_map), path, like=student))
        if student_out:
            outputs.stage(student_out, lambda path: write_model(stamp_producer(student), path, like=teacher))
        if report_path and not is_stdout(report_path):
            outputs.stage(report_path, lambda path: write_json_file(document, path))
    if is_stdout(report_path):
        print_json(document)
    console = human_console(data_on_stdout=is_stdout(report_path))
    _print_report(console, result.report, output_path)
    if compressed is not None:
        _print_compression(console, compressed, figures, student_out)


def _print_compression(console: Console, compressed: CompressResult, figures: list[ModelFigures],
                       student_out: Path | None) -> None:
    for note in compressed.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    keys = list(figures[0].latency_ms)
    table = Table(title="cost")
    for column in ["model", "params", "MACs / sample"] + [f"latency {k.replace('_', ' ')} (ms)" for k in keys]:
        table.add_column(column, justify="right")
    for f in figures:
        table.add_row(f.name, f"{f.params:,}", f"{f.macs:,}", *(f"{f.latency_ms[k]:.3f}" for k in keys))
    console.print(table)
    if student_out:
        console.print(f"wrote unrecovered student {student_out}")


def _print_report(console: Console, report: FitReport, output_path: Path) -> None:
    held_out = report.measured_on == HELD_OUT
    table = Table(title=f"FSKD fit ({report.mode}, solver {report.solver}, {report.samples_fit} fit + "
                        f"{report.samples_heldout} held-out samples, {report.provider})")
    error_column = "held-out error" if held_out else "error (in-sample)"
    for column in ("point", "op", "channels", "rows", "target", "map", "solver", error_column, "status"):
        table.add_column(column, overflow="fold")
    for p in report.points:
        channels = f"{p.channels}/{p.teacher_channels}" if p.channels != p.teacher_channels else str(p.channels)
        table.add_row(p.student, p.op_type + (f" g={p.groups}" if p.groups > 1 else ""), channels, f"{p.rows:,}",
                      p.target, p.channel_map, p.solver, f"{p.error_before:.4f} → {p.error_after:.4f}",
                      "[green]kept[/]" if p.status == "kept" else "[yellow]rejected[/]")
    console.print(table)
    for skipped in report.skipped:
        console.print(f"skipped {skipped['node']}: {skipped['reason']}", markup=False, highlight=False)
    if report.rejected:
        console.print(f"guard rejected {len(report.rejected)} point(s): {', '.join(report.rejected)}")
    for group in report.reselection:
        line = (f"{group['changed']} of {group['kept']} kept channels changed, consumer reconstruction error "
                f"{group['error_before']:.4f} → {group['error_after']:.4f}" if group["error_before"] is not None
                else f"not re-selected: {group['note']}")
        console.print(f"re-selection {', '.join(group['producers'])}: {line}", markup=False, highlight=False)
    if report.samples_augmented:
        console.print(f"augmentation {report.augmentation}: {report.samples_augmented} extra fit rows")
    if report.polish:
        p = report.polish
        console.print(f"polish {p['steps']} steps ({p['seconds']:.1f}s, {p['parameters']} weights): written model "
                      f"relative error {p['relative_error_before']:.4f} → {p['relative_error_after']:.4f}, {p['status']}")
    b, a, w = report.before, report.after, report.written_in_sample
    if held_out:
        console.print(f"output vs teacher, held-out ({report.samples_heldout} samples no correction was fitted on): "
                      f"relative error {b.relative_error:.4f} → {a.relative_error:.4f}, {_similarity(b, a)}")
        console.print(f"written model, in-sample (its kept corrections were refitted on all "
                      f"{report.samples_fit + report.samples_heldout} samples, these included): relative error "
                      f"{w.relative_error:.4f}, {_similarity(w)}")
    else:
        console.print(f"output vs teacher, in-sample (nothing held out; the fit samples): relative error "
                      f"{b.relative_error:.4f} → {a.relative_error:.4f}, {_similarity(b, a)}")
    consistency = "" if report.consistency is None else f", consistency {report.consistency:.1e}"
    console.print(f"merge exactness {report.exactness:.1e}{consistency}; time "
                  + ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items()))
    if report.memory.get("peak_mapped_bytes"):
        console.print(f"activation cache over --max-memory ({_size(report.memory['limit_bytes'])}): up to "
                      f"{_size(report.memory['peak_mapped_bytes'])} of it was mapped from a temporary file")
    for warning in report.warnings:
        warning_console().print(f"warning: {warning}", markup=False, highlight=False)
    console.print(f"wrote {output_path}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MB"


def _similarity(*metrics: OutputMetrics) -> str:
    """'top-1 agreement 5.00% → 100.00%' (or cosine similarity for embeddings), for one or two models."""
    if metrics[-1].metric == "cosine":
        return "cosine similarity " + " → ".join(f"{m.cosine:.4f}" for m in metrics)
    return "top-1 agreement " + " → ".join(f"{m.agreement:.2%}" for m in metrics)
