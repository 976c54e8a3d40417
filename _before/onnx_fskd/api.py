"""The Python API: the CLI's pipeline as functions that take paths or ModelProtos and any form of samples.

    result = onnx_fskd.fit("teacher.onnx", "student.onnx", data, solver="q")
    result.model, result.report, result.save("recovered.onnx")
    student = onnx_fskd.prune("teacher.onnx", ratio=0.5)
    metrics = onnx_fskd.evaluate("recovered.onnx", data, reference="teacher.onnx")

Errors are ``onnx_fskd.FskdError`` with the same one-line messages the CLI prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import onnx

from . import pipeline
from .compress import decompose_model, prune_model
from .compress.decompose import check_decompose_options
from .data import DataSource, ImageOptions, batches_from, input_specs, samples_from
from .errors import FskdError, UsageError, raises_fskd_error
from .evaluation import evaluate as _evaluate
from .memory import parse_size
from .model_io import load_model
from .outputs import save_model_atomic
from .provenance import drop_channel_map, run_record, stamp_producer
from .runtime import DEFAULT_BATCH, resolve_providers

# `fit` with only a teacher and samples prunes this fraction of channels (L1, per layer) and recovers
# it: on the shipped MNIST VGG that is 98.2 % → 9.2 % pruned → 96.9 % recovered with 100 samples
# (BENCHMARKS.md), a halving of MACs that FSKD repairs well; deeper cuts lose more than it recovers.
DEFAULT_PRUNE_RATIO = 0.5
NO_DATA_MESSAGE = ("fit needs unlabeled samples of the model's inputs (a few hundred): --data with a .npz "
                   "(one array per input name), a .npy (single-input models), a folder of .npz files "
                   "(one batch each) or a folder of images")
ModelSource = str | os.PathLike | onnx.ModelProto


@dataclass
class FitResult:
    """A recovered model, its report (the --report JSON schema), and how to write it."""

    model: onnx.ModelProto
    report: dict
    _like: onnx.ModelProto = field(repr=False)  # IR version and opsets the written file keeps

    @raises_fskd_error
    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write atomically; an existing file needs ``force``, as on the command line."""
        return save_model_atomic(self.model, path, self._like, force=force, option="path")


_DEFAULTS = pipeline.FitConfig()


@raises_fskd_error
def fit(teacher: ModelSource, student: ModelSource | None = None, data: DataSource | None = None, *,
        prune: float | None = None, decompose: float | None = None, solver: str = _DEFAULTS.solver,
        mode: str = _DEFAULTS.mode, points: str = _DEFAULTS.points,
        residual_target: str = _DEFAULTS.residual_target, ridge: float = _DEFAULTS.ridge,
        holdout: float = _DEFAULTS.holdout, seed: int = _DEFAULTS.seed, batch_size: int = _DEFAULTS.batch_size,
        provider: str = _DEFAULTS.provider, num_samples: int | None = None, images: ImageOptions | None = None,
        map_path: str | os.PathLike | None = None, keep_map: bool = False, reselect: bool = _DEFAULTS.reselect,
        augment: str = _DEFAULTS.augment, polish_steps: int = _DEFAULTS.polish_steps,
        polish_lr: float = _DEFAULTS.polish_lr, stats_positions: str = _DEFAULTS.stats_positions,
        max_memory: int | str | None = None) -> FitResult:
    """Recover ``student`` (or the teacher compressed by ``prune``/``decompose``; with none of the three,
    ``prune=DEFAULT_PRUNE_RATIO``) from ``data``; the other options are `onnx-fskd fit`'s (``max_memory``
    in bytes or as '2G'; None: half the available RAM)."""
    if sum(option is not None for option in (student, prune, decompose)) > 1:
        raise UsageError("give at most one of student, prune or decompose")
    if student is None and decompose is None and prune is None:
        prune = DEFAULT_PRUNE_RATIO
    if data is None:
        raise UsageError(NO_DATA_MESSAGE)
    settings = pipeline.FitConfig(mode=mode, points=points, residual_target=residual_target, solver=solver,
                                  ridge=ridge, holdout=holdout, batch_size=batch_size, provider=provider, seed=seed,
                                  reselect=reselect, augment=augment, polish_steps=polish_steps,
                                  polish_lr=polish_lr, stats_positions=stats_positions,
                                  max_memory=parse_size(max_memory) if isinstance(max_memory, str) else max_memory)
    teacher_model = _model(teacher)
    student_model = _model(student) if student is not None else \
        pipeline.make_student(teacher_model, prune, decompose).model
    pipeline.check_compatible(teacher_model, student_model)
    samples = samples_from(data, input_specs(student_model), num_samples, images)
    result = pipeline.fit(teacher_model, student_model, samples, settings, str(map_path) if map_path else None)
    options = {"prune": prune, "decompose": decompose, "num_samples": num_samples, "keep_map": keep_map,
               "map": map_path} | {f.name: getattr(settings, f.name) for f in fields(settings)}
    result.report.run = run_record(options, settings.seed, {
        "teacher": _source(teacher), "student": _source(student),
        "data": data if isinstance(data, (str, os.PathLike)) else samples.arrays, "map": map_path})
    model = finish_recovered(result.model, keep_map)
    return FitResult(model, result.report.to_json(), student_model)


@raises_fskd_error
def prune(model: ModelSource, ratio: float = DEFAULT_PRUNE_RATIO, *, criterion: str = "l1", global_: bool = False,
          exclude: str | None = None, round_to: int = 1, prune_residual: bool = False,
          seed: int = 0, head_ratio: float | None = None) -> onnx.ModelProto:
    """A channel-pruned student with the map ``fit`` reads in its metadata (options as `onnx-fskd prune`'s)."""
    result = prune_model(_model(model), ratio, criterion=criterion, global_=global_, exclude=exclude,
                         round_to=round_to, prune_residual=prune_residual, seed=seed, head_ratio=head_ratio)
    return stamp_producer(result.model)


@raises_fskd_error
def decompose(model: ModelSource, rank_ratio: float | None = None, *, method: str = "auto",
              energy: float | None = None, keep_ends: bool = True) -> onnx.ModelProto:
    """A low-rank student with the map ``fit`` reads (options as `onnx-fskd decompose`'s)."""
    check_decompose_options(rank_ratio, method, energy)
    return stamp_producer(decompose_model(_model(model), rank_ratio=rank_ratio, method=method, energy=energy,
                                          keep_ends=keep_ends).model)


@raises_fskd_error
def evaluate(model: ModelSource, data: DataSource, reference: ModelSource | None = None, *,
             provider: str = "auto", batch_size: int = DEFAULT_BATCH, num_samples: int | None = None,
             images: ImageOptions | None = None, output: str | None = None, metric: str = "auto",
             input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """``onnx-fskd eval``'s JSON as a dict: accuracy, agreement, relative error (per output), costs, latency."""
    model = _model(model)
    reference_model = _model(reference) if reference is not None else None
    batches = batches_from(data, input_specs(model), num_samples, images)
    return _evaluate(model, batches, reference_model, resolve_providers(provider), batch_size,
                     output=output, metric=metric, input_shapes=input_shapes).to_json()


def default_output_path(teacher_path: str | os.PathLike) -> Path:
    """model.onnx → model.fskd.onnx in the same folder."""
    path = Path(teacher_path)
    return path.with_name(f"{path.stem if path.suffix == '.onnx' else path.name}.fskd.onnx")


def finish_recovered(model: onnx.ModelProto, keep_map: bool = False) -> onnx.ModelProto:
    """What the written recovered model carries: our producer stamp, and no internal channel map
    (it describes the student's pruning, which means nothing to whoever deploys the model)."""
    stamp_producer(model)
    return model if keep_map else drop_channel_map(model)


def _model(source: ModelSource) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_model(source)
    raise FskdError(f"a model is a path or an onnx.ModelProto, got {type(source).__name__}")


def _source(source: ModelSource | None):
    return source if source is None or isinstance(source, onnx.ModelProto) else Path(source)
