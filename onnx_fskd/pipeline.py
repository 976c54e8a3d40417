"""FSKD end to end: normalise → find points → pair → probe & run → accumulate → solve → guard →
merge → verify. The CLI and the tests call ``fit``; writing the result is the caller's step."""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from .data import ATTENTION_MASK, Samples, input_specs
from .errors import FskdError
from .compress import CompressResult, decompose_model, prune_model
from .augment import AUGMENTATIONS, augment_fit_rows
from .compress.prune import check_prune_options
from .compress.result import write_map
from .correct import (FitSettings, FullForm, PointFit, Rows, adapter_from_stats, fit_adapter, fit_weights,
                      full_form, weights_from_stats)
from .fuse import ModelWriter, WeightUpdate, unwritable_reason, write_update
from .graph import GraphIndex
from .heap import retained_heap
from .memory import ActivationMemory, default_budget
from .metrics import choose_metric, compare, padding_mask, relative_error
from .normalize import Normalised, normalise, normalise_for_merge
from .pairing import ChannelMapper, PointPair, match_activations, pair_points, read_map
from .points import CorrectionPoint, find_points
from .probes import ProbeFeeds, StatsProbe, probe_blocker, probe_reads_output
from .report import HELD_OUT, IN_SAMPLE, FitReport, OutputMetrics
from .reselect import Reselection, reselect_channels, updated_map
from .sampling import POSITIONS, position_stride, sample_positions
from .solver_policy import SOLVERS, choose_solver
from .runtime import DEFAULT_BATCH, make_session, resolve_providers, run_batched, session_device, whole_model_rows
from .segments import SegmentRunner, sampled_name
from .solve import Adapter, one_blas_thread
from .stats import as_rows
from .verify import CHECK_PROVIDERS, EXACTNESS_TOLERANCE, check_model, exactness, verified_on, with_explicit_adapters

# Memory the teacher may fill ahead with the outputs of upcoming points: longer teacher segments, but
# every byte is written once and held until its point. MobileNet-like, 256 samples, 2-core: 1 GiB took
# 9.0–9.2 s at 4.0–4.3 GB peak RSS, 256 MiB 7.5–7.8 s at 2.9–3.5 GB (5 teacher segments instead of 2;
# without heap.py 13.6–15.2 s against 11.6–12.0 s); ResNet-18 the same either way (20.4–21.0 s, 2.6 GB).
PREFETCH_BYTES = 256 << 20

Progress = Callable[[str, int, int], None]  # ("points" | "samples", done, total)


@dataclass(frozen=True)
class FitConfig:
    mode: str = "sequential"          # sequential | parallel
    points: str = "auto"              # auto | block-ends
    residual_target: str = "sum"      # sum | plain
    solver: str = "auto"              # q | full | auto (solver_policy.py: full where cheap, else q)
    ridge: float = 1e-3
    holdout: float = 0.2
    batch_size: int = DEFAULT_BATCH
    provider: str = "auto"
    seed: int = 0
    verify_samples: int = 8
    reselect: bool = True             # re-choose a pruned student's kept channels from the data first
    augment: str = "auto"             # auto | none | flip | flip+shift (auto: flip for image inputs)
    polish_steps: int = 0             # gradient steps of unlabeled distillation after the closed form
    polish_lr: float = 1e-4
    stats_positions: str = "auto"     # auto | all: conv statistics on a grid of output positions (sampling.py)
    max_memory: int | None = None     # RAM (bytes) for cached activations, mapped from a temporary file beyond;
                                      # None: half the RAM available at the start (memory.py)


@dataclass
class FitResult:
    model: onnx.ModelProto
    report: FitReport
    adapters: dict[str, Adapter] = field(default_factory=dict)


@dataclass
class _Plan:
    """What the analysis decided: the folded models it read, the student as loaded (what the merge writes
    into), their indexes, and the pairs in fit order."""

    teacher: onnx.ModelProto
    student: onnx.ModelProto
    student_loaded: Normalised
    t_graph: GraphIndex
    s_graph: GraphIndex
    pairs: list[PointPair]
    skipped: list[tuple[str, str]]


@dataclass
class _Fitted:
    """What the point loop produced: the merges to write, and the final outputs it saw on the way."""

    fits: list[tuple[CorrectionPoint, PointFit]]
    teacher_outputs: np.ndarray
    predicted_outputs: np.ndarray  # the student's output with every correction applied (sequential)


def fit(teacher: onnx.ModelProto, student: onnx.ModelProto, samples: Samples, config: FitConfig = FitConfig(),
        map_path: str | None = None, progress: Progress | None = None) -> FitResult:
    """Fit and merge one correction per paired point so the student's outputs follow the teacher's."""
    _check_config(config)
    # The fit's intermediates are all freed before the heap is trimmed; its host products and small solves
    # run on one BLAS thread (solve.one_blas_thread says why; large solves take more, solve_threads).
    with retained_heap(), one_blas_thread():
        return _fit(teacher, student, samples, config, map_path, progress)


def _fit(teacher: onnx.ModelProto, student: onnx.ModelProto, samples: Samples, config: FitConfig,
         map_path: str | None, progress: Progress | None) -> FitResult:
    clock = _Clock()
    plan = _analyse(teacher, student, config, map_path)
    clock.lap("analyse")
    fit_index, held_index = split_holdout(len(samples), config.holdout, config.seed)
    samples = samples.take(np.concatenate([fit_index, held_index]))  # fit rows first: chunks are views
    rows = Rows(slice(0, len(fit_index)), slice(len(fit_index), len(samples)))
    samples, rows, augmentation = augment_fit_rows(samples, rows, input_specs(plan.student), config.augment)
    report = FitReport(provider="", mode=config.mode, points_option=config.points,
                       residual_target=config.residual_target, solver=config.solver, samples_fit=len(fit_index),
                       samples_heldout=len(held_index),
                       skipped=[{"node": n, "reason": r} for n, r in plan.skipped],
                       augmentation=augmentation.kind, samples_augmented=augmentation.added)
    providers = resolve_providers(config.provider)
    given_student = plan.student
    if config.reselect:
        plan = _reselect(plan, samples, rows, config, providers, report)
        clock.lap("reselect")
    fitted = _fit_points(plan, samples, rows, config, providers, report, progress)
    clock.lap("fit")
    merged = _merged(plan, [(p, f.update) for p, f in fitted.fits])
    judged = _merged(plan, [(p, f.judged) for p, f in fitted.fits]) if len(held_index) else None
    clock.lap("merge")
    _verify(plan.student, plan.s_graph, given_student, merged, judged, fitted, samples, rows, config, providers, report)
    clock.lap("verify")
    if config.polish_steps:
        verify_rows = rows.held if judged is not None else rows.fit
        merged = _polish(merged, samples, rows, fitted.teacher_outputs, verify_rows, config, providers, report)
        clock.lap("polish")
    report.seconds = clock.laps
    return FitResult(merged, report, {p.name: f.adapter for p, f in fitted.fits if f.adapter is not None})


def _reselect(plan: _Plan, samples: Samples, rows: Rows, config: FitConfig, providers: list[str],
              report: FitReport) -> _Plan:
    """Channel re-selection (reselect.py) on the fit rows; the plan then carries the rewritten student
    and the pairs with their new kept channels, and the student's map metadata follows them."""
    fit_arrays = {k: v[rows.fit] for k, v in samples.arrays.items()}
    result = reselect_channels(plan.teacher, plan.student, plan.pairs, fit_arrays, providers, config.batch_size,
                               _writable(plan.student_loaded.original))
    report.reselection = [asdict(group) for group in result.groups]
    if not result.changed:
        return replace(plan, pairs=result.pairs)
    return replace(plan, student=result.student, student_loaded=_reselected_original(plan, result),
                   s_graph=GraphIndex(result.student), pairs=result.pairs)


def _writable(original: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Initializers of the student as loaded (what the merge writes into), with their shapes."""
    return {t.name: tuple(t.dims) for t in original.graph.initializer}


def _reselected_original(plan: _Plan, result: Reselection) -> Normalised:
    """The student as loaded with the re-selected initializers (same names there, by construction of
    ``writable``) and the updated channel map in its metadata; the folded copy is ``result.student``."""
    original = onnx.ModelProto()
    original.CopyFrom(plan.student_loaded.original)
    for tensor in original.graph.initializer:
        if tensor.name in result.initializers:
            tensor.CopyFrom(onnx.numpy_helper.from_array(result.initializers[tensor.name], tensor.name))
    entries = updated_map(plan.student, result.pairs)
    if entries is not None:
        write_map(original, entries)
        write_map(result.student, entries)
    return replace(plan.student_loaded, original=original, folded=result.student)


def reselect_student(teacher: onnx.ModelProto, student: onnx.ModelProto, samples: Samples,
                     config: FitConfig = FitConfig(), map_path: str | None = None) -> Reselection:
    """Re-selection on its own (``prune --data``): the student with data-chosen channels and its map
    updated in the metadata; no fit. All samples are used (there is no guard to hold any out for)."""
    with retained_heap(), one_blas_thread():
        return _reselect_student(teacher, student, samples, config, map_path)


def _reselect_student(teacher: onnx.ModelProto, student: onnx.ModelProto, samples: Samples, config: FitConfig,
                      map_path: str | None) -> Reselection:
    plan = _analyse(teacher, student, config, map_path)
    samples, rows, _ = augment_fit_rows(samples, Rows(slice(0, len(samples)), slice(len(samples), len(samples))),
                                        input_specs(plan.student), config.augment)
    result = reselect_channels(plan.teacher, plan.student, plan.pairs, samples.arrays,
                               resolve_providers(config.provider), config.batch_size,
                               _writable(plan.student_loaded.original))
    if not result.changed:
        return replace(result, student=student)
    loaded = _reselected_original(plan, result)
    return replace(result, student=loaded.restore_names(loaded.original))


def _output_metrics(model: onnx.ModelProto, feeds: dict[str, np.ndarray], reference: np.ndarray,
                    config: FitConfig, providers: list[str]) -> OutputMetrics:
    out_name = model.graph.output[0].name
    output = run_batched(make_session(model, providers), feeds, [out_name], config.batch_size,
                         input_specs(model)[0].batch_dim)[out_name]
    metric = choose_metric(model, out_name)
    return OutputMetrics.of(compare(output, reference, metric, padding_mask(feeds, output)), metric)


def _polish(merged: onnx.ModelProto, samples: Samples, rows: Rows, teacher_outputs: np.ndarray, verify_rows: slice,
            config: FitConfig, providers: list[str], report: FitReport) -> onnx.ModelProto:
    """Gradient polish (polish.py) from the written closed-form model, trained on the fit rows and kept
    only if the written model's output on the verify rows gets closer to the teacher's."""
    from .polish import polish_weights

    held = {k: v[verify_rows] for k, v in samples.arrays.items()}
    result = polish_weights(merged, {k: v[rows.fit] for k, v in samples.arrays.items()}, teacher_outputs[rows.fit],
                            config.polish_steps, config.polish_lr, config.batch_size, config.seed)
    after = _output_metrics(result.model, held, teacher_outputs[verify_rows], config, providers)
    before = report.written_in_sample
    kept = after.relative_error < before.relative_error
    report.polish = {"steps": config.polish_steps, "lr": config.polish_lr, "parameters": result.parameters,
                     "loss_first": result.loss_first, "loss_last": result.loss_last,
                     "relative_error_before": before.relative_error, "relative_error_after": after.relative_error,
                     "agreement_after": after.agreement, "status": "kept" if kept else "rejected",
                     "seconds": result.seconds}
    if not kept:
        return merged
    check_model(result.model)
    report.written_in_sample = after
    return result.model


def _analyse(teacher: onnx.ModelProto, student: onnx.ModelProto, config: FitConfig, map_path: str | None) -> _Plan:
    """Normalise both models, find their points and pair them, in the order the points will be fitted."""
    check_compatible(teacher, student)
    loaded = normalise_for_merge(student)
    teacher, student = normalise(teacher), loaded.folded
    t_graph, s_graph = GraphIndex(teacher), GraphIndex(student)
    t_points, s_points = find_points(t_graph), find_points(s_graph)
    pairs = pair_points(t_points.points, s_points.points, read_map(map_path, student))
    skipped = list(s_points.skipped)
    target = GraphIndex(loaded.original)
    for pair in list(pairs):
        reason = unwritable_reason(pair.student, s_graph, target)
        if reason is not None:
            pairs.remove(pair)
            skipped.append((pair.student.name, reason))
    if config.points == "block-ends":
        pairs = [p for p in pairs if p.student.block_end]
    if not pairs:
        raise FskdError("no correction points: the student has no Conv/Gemm/MatMul with constant weights "
                        "that pairs with the teacher")
    order = fit_order(s_graph)
    pairs.sort(key=lambda p: order[s_graph.producer[p.student.output].name])
    return _Plan(teacher, student, loaded, t_graph, s_graph, pairs, skipped)


@dataclass(frozen=True)
class _Choice:
    """How a point is fitted, decided before the loop (the teacher is fetched ahead by it): the full
    solver's form of the point (None: the q solver) and the stride of the positions its sums read."""

    form: FullForm | None
    stride: int

    def teacher_names(self, point: CorrectionPoint, with_skip: bool) -> list[str]:
        """The teacher tensors the point's statistics read, on its grid of positions (segments.sampled_name)."""
        return [sampled_name(name, self.stride) for name in _teacher_tensors(point, with_skip)]


def _teacher_tensors(point: CorrectionPoint, with_skip: bool) -> list[str]:
    return [point.output] + ([point.residual_skip] if with_skip and point.residual_skip else [])


def _choose(pair: PointPair, graph: GraphIndex, config: FitConfig, fit_count: int) -> _Choice:
    """``full`` where the solver policy picks it and the point has the full solver's form, else ``q``."""
    s = pair.student
    form = full_form(s, graph) if choose_solver(config.solver, s, graph, fit_count) == "full" else None
    features = s.group_size if form is None else form.current.shape[0] - 1
    return _Choice(form, position_stride(config.stats_positions, s, graph, features, fit_count))


def _fit_points(plan: _Plan, samples: Samples, rows: Rows, config: FitConfig, providers: list[str],
                report: FitReport, progress: Progress | None) -> _Fitted:
    """Front to back: run both nets up to the point, fit it, and (sequential) correct the student's
    cached output before anything downstream runs."""
    fixed_batch = input_specs(plan.student)[0].batch_dim
    on_batch = (lambda done, total: progress("samples", done, total)) if progress else None
    memory = ActivationMemory(default_budget() if config.max_memory is None else config.max_memory)
    t_run, s_run = (SegmentRunner(m, g, providers, config.batch_size, fixed_batch, on_batch, memory)
                    for m, g in ((plan.teacher, plan.t_graph), (plan.student, plan.s_graph)))
    for runner in (t_run, s_run):
        runner.start(samples.arrays)
    settings = FitSettings(config.ridge, config.batch_size)
    mapper = ChannelMapper(plan.t_graph, plan.s_graph)
    fits: list[tuple[CorrectionPoint, PointFit]] = []
    fitted_outputs: set[str] = set()
    pairs = plan.pairs
    point_outputs = {p.student.output for p in pairs}
    choices = [_choose(pair, plan.s_graph, config, rows.fit.stop - rows.fit.start) for pair in pairs]
    with_skips = config.residual_target == "sum"
    for index, (pair, choice) in enumerate(zip(pairs, choices)):
        s, t, stride = pair.student, pair.teacher, choice.stride
        use_sum = bool(config.residual_target == "sum" and s.residual_skip and t.residual_skip
                       and (s.residual_skip in fitted_outputs or s.residual_skip not in point_outputs))
        kind = "sum" if use_sum else "plain"
        prefetch = _teacher_prefetch(pairs[index + 1:], choices[index + 1:], t_run, plan.t_graph, len(samples),
                                     with_skips, _prefetch_budget(memory))
        later = _teacher_names(pairs[index + 1:], choices[index + 1:], with_skips)
        t_names = choice.teacher_names(t, use_sum)
        known = _known_kept(pair, mapper)
        form = choice.form
        if known is not None and s.name not in s_run.done and probe_blocker(s, plan.s_graph) is None:
            # In-graph statistics: only the point's input and the teacher's sampled tensors are cached; the
            # point's output is computed inside the probe, and later with its update folded into the weights.
            kept, how = known
            pair = PointPair(t, s, pair.source, kept)
            mapper.record(pair)
            # The probe reads the point's output where recomputing the op would cost more than applying Q
            # to it afterwards; else its input, and a wide input is recomputed inside the probe, never
            # cached (not with a fixed batch size: the probe's batches follow the fit/held-out split).
            fed = form is None and probe_reads_output(s, plan.s_graph, stride)
            side = s_run.side_graph(s.input) if fixed_batch is None and not fed else None
            x_names = [i.name for i in side.graph.input] if side is not None else [s.output if fed else s.input]
            s_out = s_run.compute(x_names + ([s.residual_skip] if use_sum else []))
            t_out = t_run.compute(t_names, prefetch=prefetch, later=later)
            mask = _row_mask(s, plan.s_graph, samples)
            probe = StatsProbe(s, plan.s_graph, kept, t.channels, providers, use_sum, use_sum, mask is not None,
                               stride, form.linear_map if form is not None else None, side, fed)
            feeds = ProbeFeeds({name: s_out[name] for name in x_names} if side is not None else s_out[x_names[0]],
                               t_out[t_names[0]], t_out[t_names[1]] if use_sum else None,
                               s_out[s.residual_skip] if use_sum else None, mask)
            stats = probe.accumulate(feeds, [rows.fit, rows.held], config.batch_size)
            if form is None:
                point_fit = adapter_from_stats(pair, plan.s_graph, (stats[0], stats[1]), settings, kind, how)
            else:
                point_fit = weights_from_stats(pair, form, (stats[0], stats[1]), settings, kind, how)[0]
            point_fit.report.statistics = "runtime"
            point_fit.report.position_stride = stride
            report.points.append(point_fit.report)
            if point_fit.update is not None:
                fits.append((s, point_fit))
                if config.mode == "sequential" and fed:  # the output ran uncorrected: its readers apply Q·y + d
                    s_run.defer(s.output, point_fit.adapter)
                elif config.mode == "sequential":
                    s_run.fold(s, point_fit.update)
            del s_out, t_out, feeds, probe  # the probe session holds its arena of batch intermediates
            _after_point(index, len(pairs), choice, s, t, t_run, fitted_outputs, progress, later)
            continue
        want_input = form is not None
        s_out = s_run.compute([s.output] + ([s.residual_skip] if use_sum else []) + ([s.input] if want_input else []))
        t_out = t_run.compute(t_names, prefetch=prefetch, later=later)
        y = s_out[s.output]
        kept, how = known if known is not None else _activation_kept(pair, sample_positions(y, stride), t_out[t_names[0]],
                                                                     rows.fit)
        pair = PointPair(t, s, pair.source, kept)
        mapper.record(pair)
        target = _restrict(t_out[t_names[0]], kept, s.channel_axis)
        if use_sum:  # teacher sum − student skip, built in a recycled buffer
            summed = s_run.buffers.empty(target.shape, target.dtype)
            np.add(target, _restrict(t_out[t_names[1]], kept, s.channel_axis), out=summed)
            target = np.subtract(summed, sample_positions(s_out[s.residual_skip], stride), out=summed)
            del summed
        if want_input:
            point_fit = fit_weights(pair, plan.s_graph, form, s_out[s.input], y, target, rows, settings, kind, how, stride)
        else:
            point_fit = fit_adapter(pair, plan.s_graph, y, target, rows, settings, kind, how, stride)
        point_fit.report.position_stride = stride
        report.points.append(point_fit.report)
        if point_fit.update is not None:
            fits.append((s, point_fit))
            if config.mode == "sequential":
                s_run.replace(s.output, point_fit.correct(s_run.buffers.empty))
        point_fit.correct = None  # it holds this point's activations
        if use_sum:
            s_run.buffers.retire(target)
        del s_out, t_out, y, target  # let the runners recycle them
        _after_point(index, len(pairs), choice, s, t, t_run, fitted_outputs, progress, later)
    out_name = plan.s_graph.graph_outputs[0]
    fitted = _Fitted(fits, t_run.compute([out_name])[out_name], s_run.compute([out_name])[out_name])
    report.memory = memory.summary()
    return fitted


def _prefetch_budget(memory: ActivationMemory) -> int:
    """Teacher tensors fetched ahead are a speed-up only: at most a quarter of the cache's RAM budget."""
    return PREFETCH_BYTES if memory.limit is None else min(PREFETCH_BYTES, memory.limit // 4)


def _after_point(index: int, total: int, choice: _Choice, s: CorrectionPoint, t: CorrectionPoint,
                 t_run: SegmentRunner, fitted_outputs: set[str], progress: Progress | None, later: list[str]) -> None:
    """Bookkeeping once a point is fitted: teacher tensors no later point asks for (``later``) are released."""
    fitted_outputs.add(s.output)
    asked = set(later)
    t_run.release([name for name in choice.teacher_names(t, True) if name not in asked])
    if progress:
        progress("points", index + 1, total)


def _teacher_names(pairs: list[PointPair], choices: list[_Choice], with_skips: bool) -> list[str]:
    """The teacher tensors that the points' statistics read, in fit order."""
    return [name for pair, choice in zip(pairs, choices) for name in choice.teacher_names(pair.teacher, with_skips)]


def _row_mask(point: CorrectionPoint, graph: GraphIndex, samples: Samples) -> np.ndarray | None:
    """The ``attention_mask`` input (N, seq) when the point's rows are tokens (N, seq, C): padded rows
    (mask 0) are left out of its statistics and held-out errors."""
    mask = samples.arrays.get(ATTENTION_MASK)
    if mask is None or mask.ndim != 2 or point.channel_axis == 1 or point.rank != 3:
        return None
    seq = graph.shapes.get(point.output, (None, None))[1]
    return mask.astype(np.int64, copy=False) if seq in (None, mask.shape[1]) else None


def _verify(student: onnx.ModelProto, graph: GraphIndex, given_student: onnx.ModelProto, merged: onnx.ModelProto,
            judged: onnx.ModelProto | None, fitted: _Fitted, samples: Samples, rows: Rows, config: FitConfig,
            providers: list[str], report: FitReport) -> None:
    """Check the written model (checker, exactness against explicit Q nodes of ``student``, the student the
    point loop fitted; consistency with the fit's own activations) and measure outputs against the teacher
    on the held-out samples: ``given_student`` (as given, before any channel re-selection) and ``judged``
    (the guard's candidates, fitted without them), and the written model, whose kept corrections were
    refitted on those samples too (in-sample, labelled so). Without held-out samples, all on the fit samples.
    The whole-model runs take as many rows at a time as keep their arena within the segments' bound
    (``graph``: the student's, whose shapes all these models share)."""
    check_model(merged)
    fixed_batch = input_specs(student)[0].batch_dim
    out_name = student.graph.output[0].name
    outputs = [o.name for o in student.graph.output]
    check_session = make_session(merged, CHECK_PROVIDERS, exact=True)
    verify_rows = rows.held if judged is not None else rows.fit
    check_rows = slice(verify_rows.start, min(verify_rows.stop, verify_rows.start + config.verify_samples))
    check_feeds = {k: v[check_rows] for k, v in samples.arrays.items()}
    checked = run_batched(check_session, check_feeds, outputs, config.batch_size, fixed_batch)
    report.verified_on = verified_on(check_session)
    # Each whole-model session is dropped as soon as it has run: their arenas are the fit's largest
    # allocations (the MobileNet-like bench net's peak memory was three of them held at once here).
    del check_session
    report.exactness = exactness(checked, _explicit_reference(student, fitted.fits), check_feeds,
                                 config.batch_size, fixed_batch)
    report.exactness_tolerance = EXACTNESS_TOLERANCE
    if report.exactness > EXACTNESS_TOLERANCE:
        raise FskdError(f"internal: merged model differs from the explicit-Q model by {report.exactness:.2e} "
                        f"(> {EXACTNESS_TOLERANCE}, checked on {report.verified_on}); nothing written")
    feeds = {k: v[verify_rows] for k, v in samples.arrays.items()}
    largest = 4 * graph.largest_per_sample()
    run = lambda session: run_batched(session, feeds, [out_name],  # noqa: E731
                                      whole_model_rows(session, largest, config.batch_size), fixed_batch)[out_name]
    reference = fitted.teacher_outputs[verify_rows]
    student_session = make_session(given_student, providers, exact=True)
    report.provider = session_device(student_session)
    before = run(student_session)
    del student_session
    if config.mode == "sequential":
        # The fit's own output of the corrected student is the written model's output (same weights): where
        # the two agree on the checked samples, it stands for the written model's run on the verify rows.
        report.consistency = relative_error(checked[out_name], fitted.predicted_outputs[check_rows])
    consistent = report.consistency is not None and report.consistency <= EXACTNESS_TOLERANCE
    if consistent:
        after = fitted.predicted_outputs[verify_rows]
    else:  # the written model runs where the fit did
        after = run(make_session(merged, providers, exact=True))
    metric, mask = choose_metric(student, out_name), padding_mask(feeds, before)
    measure = lambda y: OutputMetrics.of(compare(y, reference, metric, mask), metric)  # noqa: E731
    report.written_in_sample, report.before = measure(after), measure(before)
    if judged is None:
        report.measured_on = IN_SAMPLE
        report.after = report.written_in_sample
        report.warnings.append(
            f"nothing is held out ({report.samples_fit} sample(s), --holdout {config.holdout:g}): the guard is off, "
            f"every correction that lowers the error on the fit samples is kept, and all figures are in-sample; "
            f"give at least 2 samples (10+ recommended) and --holdout > 0 for held-out figures")
    else:
        report.measured_on = HELD_OUT
        report.after = measure(run(make_session(judged, providers, exact=True)))
    if report.after.relative_error > report.before.relative_error:
        report.warnings.append(
            f"the recovered model is further from the teacher than the student ({report.measured_on}: "
            f"relative error {report.before.relative_error:.4g} → {report.after.relative_error:.4g})"
            + ("; parallel mode fits each point on uncorrected inputs, try --mode sequential"
               if config.mode == "parallel" else ""))


def _merged(plan: _Plan, updates: list[tuple[CorrectionPoint, WeightUpdate]]) -> onnx.ModelProto:
    """The student as loaded, its weights updated in place: its own nodes, names and metadata."""
    merged = onnx.ModelProto()
    merged.CopyFrom(plan.student_loaded.original)
    writer = ModelWriter(merged, plan.s_graph)
    for point, update in updates:
        write_update(writer, point, update)
    return plan.student_loaded.restore_names(merged)


def _explicit_reference(student: onnx.ModelProto, fits: list[tuple[CorrectionPoint, PointFit]]) -> onnx.ModelProto:
    """The student with explicit Q nodes for Q-solver points and written weights for full-solver points."""
    explicit = with_explicit_adapters(student, [(p, f.adapter) for p, f in fits if f.adapter is not None])
    writer = ModelWriter(explicit)
    for point, point_fit in fits:
        if point_fit.adapter is None:
            write_update(writer, point, point_fit.update)
    return explicit


def make_student(teacher: onnx.ModelProto, prune_ratio: float | None = None,
                 rank_ratio: float | None = None) -> CompressResult:
    """The one-step path: compress the teacher (L1 pruning or decomposition) with the map fit will read."""
    if prune_ratio is not None:
        check_prune_options(prune_ratio, "l1", None, 1)
        return prune_model(teacher, prune_ratio)
    return decompose_model(teacher, rank_ratio=rank_ratio)


def check_compatible(teacher: onnx.ModelProto, student: onnx.ModelProto) -> None:
    """Teacher and student must take the same inputs (names, dtypes, shapes past the batch axis) and give
    the same outputs (names, dtypes, and shapes where both declare them)."""
    t_in, s_in = input_specs(teacher), input_specs(student)
    if [(i.name, i.dtype, i.shape[1:]) for i in t_in] != [(i.name, i.dtype, i.shape[1:]) for i in s_in]:
        raise FskdError("teacher and student have different inputs: "
                        f"{[(i.name, str(i.dtype), i.shape) for i in t_in]} vs "
                        f"{[(i.name, str(i.dtype), i.shape) for i in s_in]}; the student must be compressed from "
                        f"this teacher")
    t_out, s_out = _output_specs(teacher), _output_specs(student)
    if [o[:2] for o in t_out] != [o[:2] for o in s_out] or any(
            len(t[2]) != len(s[2]) or any(a is not None and b is not None and a != b for a, b in zip(t[2][1:], s[2][1:]))
            for t, s in zip(t_out, s_out)):
        raise FskdError(f"teacher and student have different outputs: {t_out} vs {s_out}; the student must give "
                        f"the teacher's outputs")


def _output_specs(model: onnx.ModelProto) -> list[tuple[str, str, tuple[int | None, ...]]]:
    """(name, dtype, shape) of each graph output; symbolic or undeclared dimensions as None."""
    specs = []
    for value in model.graph.output:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        specs.append((value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type
                      else "?", dims))
    return specs


def split_holdout(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices for fitting and for the guard; the guard needs at least one held-out sample."""
    order = np.random.default_rng(seed).permutation(count)
    held = int(round(count * fraction)) if fraction > 0 else 0
    if fraction > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    return np.sort(order[held:]), np.sort(order[:held])


def fit_order(graph: GraphIndex) -> dict[str, int]:
    """A topological order that runs short side branches first (smallest longest-path-to-output), so a
    projection shortcut is fitted before the main branch it is added to, and the residual target of the
    main branch sees the corrected shortcut. graphsurgeon's toposort has no priorities, hence this."""
    depth: dict[str, int] = {}
    for node in reversed(graph.nodes):
        below = [depth[c.name] for out in node.output for c in graph.consumers.get(out, [])]
        depth[node.name] = 1 + max(below, default=0)
    waiting = {n.name: sum(1 for i in n.input if i in graph.producer) for n in graph.nodes}
    ready = [(depth[n.name], graph.position[n.name], n.name) for n in graph.nodes if waiting[n.name] == 0]
    heapq.heapify(ready)
    order: dict[str, int] = {}
    while ready:
        _, _, name = heapq.heappop(ready)
        order[name] = len(order)
        for out in graph.node_by_name[name].output:
            for consumer in graph.consumers.get(out, []):
                waiting[consumer.name] -= 1
                if waiting[consumer.name] == 0:
                    heapq.heappush(ready, (depth[consumer.name], graph.position[consumer.name], consumer.name))
    return order


def _restrict(teacher_tensor: np.ndarray, kept: np.ndarray, axis: int) -> np.ndarray:
    """The teacher's tensor on the student's kept channels (itself, uncopied, when all are kept in order)."""
    if len(kept) == teacher_tensor.shape[axis] and np.array_equal(kept, np.arange(len(kept))):
        return teacher_tensor
    return np.take(teacher_tensor, kept, axis=axis)


def _teacher_prefetch(upcoming: list[PointPair], choices: list[_Choice], runner: SegmentRunner, graph: GraphIndex,
                      count: int, with_skips: bool, budget: int) -> list[str]:
    """Teacher tensors of the next points, on their grids of positions, that fit in the budget: the teacher
    needs no cut per point (nothing is corrected in it), so it runs in a few long segments instead of one
    per point. Tensors already cached count against the budget: it bounds what is held ahead (charging only
    the new ones let each point fetch another budget's worth: 1 GB of teacher tensors ahead on the
    MobileNet-like bench net at a 256 MiB budget)."""
    names: list[str] = []
    counted: set[str] = set()
    for pair, choice in zip(upcoming, choices):
        for tensor in _teacher_tensors(pair.teacher, with_skips):
            name, shape = sampled_name(tensor, choice.stride), graph.shapes.get(tensor)
            if name in counted:
                continue
            if shape is None or None in shape[1:]:
                return names
            per_sample = int(np.prod(shape[1:]))
            if choice.stride > 1:
                per_sample = int(np.prod(shape[1:2])) * -(-shape[2] // choice.stride) * -(-shape[3] // choice.stride)
            budget -= 4 * count * per_sample
            if budget < 0:
                return names
            counted.add(name)
            if name not in runner.cache:
                names.append(name)
    return names


def _known_kept(pair: PointPair, mapper: ChannelMapper) -> tuple[np.ndarray, str] | None:
    """Kept channels from the map or the weights, or None when only activations can tell."""
    s, t = pair.student, pair.teacher
    if pair.kept is not None:
        return _checked_kept(pair.kept, pair), pair.source
    kept = mapper.from_weights(pair)
    if kept is not None:
        return _checked_kept(kept, pair), "identity" if s.channels == t.channels else "weights"
    return None


def _activation_kept(pair: PointPair, y: np.ndarray, teacher_y: np.ndarray, fit_rows: slice) -> tuple[np.ndarray, str]:
    s = pair.student
    kept, score = match_activations(as_rows(y[fit_rows], s.channel_axis), as_rows(teacher_y[fit_rows], s.channel_axis))
    return _checked_kept(kept, pair), f"activations (r={score:.2f})"


def _checked_kept(kept: np.ndarray, pair: PointPair) -> np.ndarray:
    kept = np.asarray(kept, dtype=np.int64)
    if len(kept) != pair.student.channels or kept.min() < 0 or kept.max() >= pair.teacher.channels:
        raise FskdError(f"channel map for {pair.student.name} lists {len(kept)} channels in 0..{kept.max()}, "
                        f"but the student has {pair.student.channels} and the teacher {pair.teacher.channels}")
    return kept


def _check_config(config: FitConfig) -> None:
    if config.mode not in ("sequential", "parallel"):
        raise FskdError(f"--mode must be sequential or parallel, got {config.mode}")
    if config.points not in ("auto", "block-ends"):
        raise FskdError(f"--points must be auto or block-ends, got {config.points}")
    if config.solver not in SOLVERS:
        raise FskdError(f"--solver must be one of {', '.join(SOLVERS)}, got {config.solver}")
    if config.residual_target not in ("sum", "plain"):
        raise FskdError(f"--residual-target must be sum or plain, got {config.residual_target}")
    if not 0 <= config.holdout < 1:  # False for NaN too
        raise FskdError(f"--holdout must be in [0, 1), got {config.holdout}")
    if not 0 <= config.ridge < math.inf:
        raise FskdError(f"--ridge must be a finite number >= 0, got {config.ridge}")
    if config.batch_size <= 0:
        raise FskdError(f"--batch-size must be positive, got {config.batch_size}")
    if config.stats_positions not in POSITIONS:
        raise FskdError(f"--stats-positions must be one of {', '.join(POSITIONS)}, got {config.stats_positions}")
    if config.augment not in AUGMENTATIONS:
        raise FskdError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {config.augment}")
    if config.max_memory is not None and config.max_memory < 0:
        raise FskdError(f"--max-memory must be a size >= 0, got {config.max_memory}")
    if config.polish_steps < 0 or config.polish_lr <= 0:
        raise FskdError("--polish needs steps >= 0 and a positive learning rate")
    if config.polish_steps:
        from .polish import require_torch

        require_torch()


class _Clock:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 4)
        self._last = now
