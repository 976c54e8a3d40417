"""What a fresh ORT session costs on a provider against a warm one, by input shape: the fit makes about
50 sessions, each running a few batches.

    python bench/cuda_sessions.py [--provider cuda|cpu] [--batch 64] [--short 13]

For the MobileNetV2-like net (bench/nets.py, 52 convs), three fresh sessions in turn, each: set-up, a first
run of ``--batch`` samples, a second run of them, then a first run of a new shape (``--short`` samples, a
short last batch) and a second one; on CUDA the same again with one arena shared by all sessions (ORT's
environment allocator), then host↔device copies of a 294 MiB activation (pageable host memory)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
from nets import mobilenet_v2ish  # noqa: E402

from onnx_fskd.runtime import resolve_providers, session_providers  # noqa: E402


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sessions(model_bytes: bytes, providers: list[str], batch: np.ndarray, short: np.ndarray, shared: bool) -> None:
    for attempt in range(3):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if shared:
            options.add_session_config_entry("session.use_env_allocators", "1")
        start = time.perf_counter()
        session = ort.InferenceSession(model_bytes, options, providers=session_providers(providers, exact=True))
        setup = time.perf_counter() - start
        run = lambda x, s=session: seconds(lambda: s.run(["logits"], {"input": x}))  # noqa: E731
        times = [run(batch), run(batch), run(short), run(short)]
        del run  # holds the session
        print(f"{'shared arena' if shared else 'own arena'} session {attempt}: set-up {setup:.3f} s; "
              f"{len(batch)} samples: first run {times[0]:.3f} s, second {times[1]:.3f} s; "
              f"then {len(short)} samples: first run {times[2]:.3f} s, second {times[3]:.3f} s", flush=True)
        del session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--provider", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--short", type=int, default=13)
    args = parser.parse_args()
    providers = resolve_providers(args.provider)
    model_bytes = mobilenet_v2ish().SerializeToString()
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(args.batch, 3, 224, 224)).astype(np.float32)
    sessions(model_bytes, providers, batch, batch[:args.short], shared=False)
    if "CUDAExecutionProvider" not in providers:
        return
    info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, {}, ort.OrtArenaCfg({}))
        sessions(model_bytes, providers, batch, batch[:args.short], shared=True)
    except Exception as exc:  # noqa: BLE001 - a measurement: say what failed, go on
        print(f"shared arena: {exc}", flush=True)
    activation = rng.normal(size=(256, 96, 56, 56)).astype(np.float32)
    for _ in range(3):
        start = time.perf_counter()
        value = ort.OrtValue.ortvalue_from_numpy(activation, "cuda", 0)
        up = time.perf_counter() - start
        down = seconds(value.numpy)
        print(f"copy {activation.nbytes / 2**20:.0f} MiB: host→device {up:.3f} s ({activation.nbytes / up / 2**30:.1f} GiB/s), "
              f"device→host {down:.3f} s ({activation.nbytes / down / 2**30:.1f} GiB/s)", flush=True)


if __name__ == "__main__":
    main()
