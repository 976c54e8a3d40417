"""ONNX Runtime sessions: provider choice (CUDA when present, CPU otherwise) and batched runs."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from .errors import FskdError

log = logging.getLogger(__name__)

PROVIDER_CHOICES = ("auto", "cpu", "cuda")
DEFAULT_BATCH = 64
_PROTOBUF_LIMIT = 2**31 - 1


def resolve_providers(choice: str = "auto") -> list[str]:
    """Map --provider to ORT providers; 'auto' takes CUDA only when onnxruntime-gpu can actually use it."""
    if choice not in PROVIDER_CHOICES:
        raise FskdError(f"--provider must be one of {', '.join(PROVIDER_CHOICES)}, got {choice}")
    available = ort.get_available_providers()
    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if choice == "cuda":
        raise FskdError("--provider cuda: this onnxruntime has no CUDA provider (install onnx-fskd[gpu])")
    return ["CPUExecutionProvider"]


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu wheels find pip-installed CUDA/cuDNN only after preload_dlls (ORT >= 1.21)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # missing CUDA libraries: the session falls back to CPU below
            log.warning("onnxruntime.preload_dlls failed: %s", exc)


# CUDA runs float32 convs and MatMuls in TF32 by default (about 1e-3 relative): sessions whose numbers
# are compared at float32 precision (the fit's segments and statistics, the held-out checks) turn it off.
EXACT_CUDA_OPTIONS = {"use_tf32": "0"}
# cuDNN's default search (EXHAUSTIVE) times every conv algorithm the first time a session sees an input
# shape. The fit makes dozens of sessions that each run a few batches (a segment, a probe, a check), so
# sessions pick from cuDNN's heuristics instead unless they are ``tuned`` (timed or long runs).
UNTUNED_CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def session_providers(providers: list[str], exact: bool, tuned: bool = False) -> list[str | tuple[str, dict[str, str]]]:
    """The providers argument for onnxruntime: CUDA with TF32 off when ``exact``, and cuDNN's heuristic
    algorithm choice unless ``tuned``."""
    options = {**(EXACT_CUDA_OPTIONS if exact else {}), **({} if tuned else UNTUNED_CUDA_OPTIONS)}
    return [(name, dict(options)) if options and name == "CUDAExecutionProvider" else name for name in providers]


def make_session(model: onnx.ModelProto, providers: list[str], exact: bool = False,
                 tuned: bool = False) -> ort.InferenceSession:
    """A session on the given providers; falls back to CPU (with a warning) when CUDA cannot start.
    ``exact``: full float32 (no TF32) on CUDA, for numbers that are checked against each other.
    ``tuned``: let cuDNN time its conv algorithms for each input shape, for a session that runs many
    batches or is timed; the fit's short-lived sessions skip that.
    The fit's segments and probes keep ORT's full optimisation, NCHWc blocked layout included: on an idle
    2-core machine the ResNet-18 fit took 52.8 s with it and 70.2 s without (MobileNet-like: 37.4 s vs
    36.4 s), though every segment's inputs and outputs are host tensors in plain NCHW."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle ORT threads otherwise spin for a while after each run, starving the numpy work in between.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if "CUDAExecutionProvider" in providers:
        _preload_cuda_libraries()
    try:
        chosen = session_providers(providers, exact, tuned)
        if _weight_bytes(model) < _PROTOBUF_LIMIT // 2:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=chosen)
        else:
            session = _session_from_files(model, options, chosen)
    except Exception as exc:
        raise FskdError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None
    if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in session.get_providers():
        log.warning("CUDA provider could not start; running on CPU")
    return session


def _weight_bytes(model: onnx.ModelProto) -> int:
    """The bulk of a model's size, without serialising it as ByteSize() would (it is asked per segment)."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def _session_from_files(model: onnx.ModelProto, options: ort.SessionOptions,
                        providers: list[str | tuple[str, dict[str, str]]]) -> ort.InferenceSession:
    """Models over protobuf's 2 GiB limit cannot travel as bytes: ORT reads them from disk with external data."""
    with tempfile.TemporaryDirectory(prefix="onnx_fskd_") as folder:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        path = os.path.join(folder, "model.onnx")
        onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.data")
        return ort.InferenceSession(path, options, providers=providers)


def session_device(session: ort.InferenceSession) -> str:
    return "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"


def session_precision(session: ort.InferenceSession) -> str:
    """How the session computes float32, as the report states it: 'fp32' (CPU, or CUDA with TF32 off)
    or 'tf32' (CUDA's default)."""
    if "CUDAExecutionProvider" not in session.get_providers():
        return "fp32"
    tf32 = session.get_provider_options().get("CUDAExecutionProvider", {}).get("use_tf32", "1")
    return "fp32" if tf32 == "0" else "tf32"


# On CUDA the first run of each new input shape sets up cuDNN for every conv of the session: 0.72–0.85 s
# for the MobileNet-like net (52 convs) on an H100, against 0.011 s for a second run of that shape
# (bench/cuda_sessions.py). There every batch of a session has one shape: a short batch is padded.
_ONE_SHAPE_DEVICES = ("cuda",)


def one_batch_shape(providers: list[str]) -> bool:
    """Whether sessions on ``providers`` pad short batches to keep one input shape (CUDA)."""
    return any(name.removesuffix("ExecutionProvider").lower() in _ONE_SHAPE_DEVICES for name in providers)


def padded_rows(session: ort.InferenceSession, count: int, batch_size: int, fixed_batch: int | None) -> int | None:
    """The rows every batch of ``count`` samples is padded to, or None (batches run as they come): the
    model's fixed batch size, or on CUDA ``batch_size`` when the samples take more than one batch."""
    if fixed_batch:
        return fixed_batch
    return batch_size if count > batch_size and session_device(session) in _ONE_SHAPE_DEVICES else None


# A session keeps one batch's intermediates in its arena, which is fresh memory on its first run (on the
# development VM a first write costs 1.3 s per GiB, a second 0.1 s). On the CPU the fit's segments and probes
# cut their batches so that one batch's intermediates take at most this many bytes. MobileNet-like teacher,
# first segment alone: 64 rows, arena 1.6 GB, first run 1.8 s, second 0.5 s; 5 rows, 0.2 GB, 0.73 s, 0.63 s.
ARENA_BATCH_BYTES = 256 << 20


def rows_within_arena(session: ort.InferenceSession, per_sample_bytes: int, batch_size: int) -> int:
    """``batch_size``, or on the CPU fewer rows where a batch's intermediates (``per_sample_bytes`` per
    sample) would take more than ARENA_BATCH_BYTES. A GPU's arena is device memory, set up once, and small
    batches only cost it launches."""
    if session_device(session) != "cpu" or per_sample_bytes <= 0:
        return batch_size
    return max(1, min(batch_size, ARENA_BATCH_BYTES // per_sample_bytes))


# A whole model's arena holds a few of its largest activations at once (the memory pattern reuses the rest):
# the MobileNet-like bench net's student at 51 rows took about 1.25 GB (heap in use at the verification peak,
# less what the fit held besides), 5× its largest activation per sample.
WHOLE_MODEL_ARENA_FACTOR = 5


def whole_model_rows(session: ort.InferenceSession, largest_per_sample_bytes: int, batch_size: int) -> int:
    """Rows per run of a whole model, its arena estimated from its largest activation (rows_within_arena)."""
    return rows_within_arena(session, WHOLE_MODEL_ARENA_FACTOR * largest_per_sample_bytes, batch_size)


def batches(count: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


def run_batched(session: ort.InferenceSession, feeds: dict[str, np.ndarray], outputs: list[str],
                batch_size: int, fixed_batch: int | None = None,
                on_batch: Callable[[int, int], None] | None = None,
                allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray] = np.empty) -> dict[str, np.ndarray]:
    """Run over all samples in batches into preallocated arrays; a fixed batch dimension is honoured by
    padding the last batch, as is one shape per session on CUDA (padded_rows). ``on_batch(done, total)``
    reports progress in samples; ``allocate`` makes the result arrays (a BufferPool's recycled memory, say)."""
    count = len(next(iter(feeds.values())))
    size = fixed_batch or batch_size
    if count == size or (count < size and not fixed_batch):  # one batch: ORT's arrays are the result
        values = session.run(outputs, feeds)
        if on_batch:
            on_batch(count, count)
        return dict(zip(outputs, values))
    padded = padded_rows(session, count, batch_size, fixed_batch)
    results = _preallocated(session, outputs, count, allocate)
    binding = session.io_binding()
    for window in batches(count, size):
        chunk = {name: array[window] for name, array in feeds.items()}
        real = window.stop - window.start
        if padded and real < padded:
            chunk = pad_batch(chunk, padded)
        if results and real == size and all(a.flags.c_contiguous for a in chunk.values()):
            _run_into(session, binding, chunk, {name: results[name][window] for name in outputs})
        else:
            for name, value in zip(outputs, session.run(outputs, chunk)):
                if name not in results:
                    results[name] = allocate((count,) + value.shape[1:], value.dtype)
                results[name][window] = value[:real]
        if on_batch:
            on_batch(window.stop, count)
    return results


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _preallocated(session: ort.InferenceSession, outputs: list[str], count: int,
                  allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray]) -> dict[str, np.ndarray]:
    """Result arrays made before the first batch when the session knows every output's per-sample shape,
    so that every full batch is written in place; else empty (the first batch's outputs tell)."""
    declared = {arg.name: arg for arg in session.get_outputs()}
    specs = []
    for name in outputs:
        arg = declared.get(name)
        dims = arg.shape[1:] if arg is not None and arg.shape else None
        if dims is None or not all(isinstance(d, int) and d > 0 for d in dims) or arg.type not in _NUMPY_TYPES:
            return {}
        specs.append((name, (count, *dims), _NUMPY_TYPES[arg.type]))
    return {name: allocate(shape, dtype) for name, shape, dtype in specs}


def _run_into(session: ort.InferenceSession, binding: ort.IOBinding, feeds: dict[str, np.ndarray],
              targets: dict[str, np.ndarray]) -> None:
    """One run whose outputs ORT writes straight into the given (contiguous) host arrays: no copy of
    each batch's activations into the result afterwards."""
    binding.clear_binding_inputs()
    binding.clear_binding_outputs()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    for name, target in targets.items():
        binding.bind_output(name, "cpu", 0, target.dtype, list(target.shape), target.ctypes.data)
    session.run_with_iobinding(binding)


def pad_batch(feeds: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Every array of a short batch padded to ``rows`` samples by repeating its last one (a fixed batch
    size, or one shape per session: padded_rows); the caller drops or zero-weights the padding."""
    return {name: np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])
            for name, array in feeds.items()}
