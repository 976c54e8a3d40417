#!/usr/bin/env bash
# The GPU part of issue 11 as one prepared device call.
#
# Run it on a lent GPU machine after ../shared/GPU.md's install steps (onnxruntime-gpu in /tmp/site),
# from the repository root:
#     export PYTHONPATH=/tmp/site:$PWD && bash bench/gpu_check.sh
# Everything goes to $OUT (the device tool's output folder; /tmp/gpu_check otherwise):
#   providers.txt   the ORT build, its providers and the GPU
#   log.txt         each step's tail: `fit --provider cuda` on the shipped VGG pair and on a
#                   50 %-pruned MobileNet-style ImageNet net, with the merge check's provider and tolerance
#   fit_cost.txt    bench/fit_cost.py rows: CUDA (q and auto, both nets, no flips; step defaults: auto with
#                   flips; mobilenet q with each $COMPARE option),
#                   then the host's CPU provider
# The whole script took no GPU here; a dry run on the CPU checks its logic:
#     PROVIDER=cpu SAMPLES=16 OUT=/tmp/dry bash bench/gpu_check.sh
#   sessions.txt    (step sessions) bench/cuda_sessions.py: a fresh session's first run of each input shape
#   cprofile/       (step cprofile) pstats of the CUDA `q` fit on both nets: python -m pstats FILE, here
# Step ab (with BEFORE=DIR, a folder holding another commit's onnx_fskd/, e.g. from
#     git archive REV onnx_fskd | tar -x -C DIR): the `q` rows of both nets, this code, that one, this one.
# The device time of a task is short: every step is cut at DEADLINE seconds from the start (default 300),
# the most important first, and a step that would get under 20 s is skipped and logged as such.
# STEPS picks the steps, in this order: sessions vgg mobilenet_fit q auto defaults ab compare cpu cprofile
# (default: vgg mobilenet_fit q auto compare cpu).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
PROVIDER=${PROVIDER:-cuda}
SAMPLES=${SAMPLES:-256}
DEADLINE=${DEADLINE:-300}
# CUDA provider options to compare with the fit's own on the MobileNet-style net (space-separated KEY=VALUE)
COMPARE=${COMPARE:-cudnn_conv_algo_search=EXHAUSTIVE}
STEPS=" ${STEPS:-vgg mobilenet_fit q auto compare cpu} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
mkdir -p "$OUT" "$OUT/work"
log() { echo "== $*  [t=${SECONDS}s]" | tee -a "$OUT/log.txt"; }
within() {  # within LIMIT CMD...: run CMD under min(LIMIT, time left before DEADLINE)
    local limit=$1 left=$((DEADLINE - SECONDS)); shift
    ((left < limit)) && limit=$left
    if ((limit < 20)); then log "skipped, past the deadline: $*"; return 124; fi
    timeout "$limit" "$@"
}
fskd() { python3 -c 'from cli.main import main; main()' "$@"; }
summary() {  # the merge check and the held-out result of a --report file
    python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print('verified_on', r['verified_on'], \
'exactness', r['exactness'], 'tolerance', r['exactness_tolerance'], 'provider', r['provider'], \
'held-out error', round(r['before']['relative_error'], 4), '->', round(r['after']['relative_error'], 4), \
'seconds', r['seconds'])" "$1" 2>&1 | tee -a "$OUT/log.txt"
}

python3 -c "import onnxruntime as o; getattr(o, 'preload_dlls', lambda: None)(); print(o.__version__, o.get_available_providers())" \
    2>&1 | tee "$OUT/providers.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/providers.txt"

if step sessions; then
    log "fresh sessions, by input shape ($PROVIDER)"
    within 60 python3 bench/cuda_sessions.py --provider "$PROVIDER" 2>&1 | grep -v "onnxruntime:Default" | tee "$OUT/sessions.txt"
fi

if step vgg; then
log "fit --provider $PROVIDER: shipped VGG pair"
within 60 python3 -c 'from cli.main import main; main()' fit samples/vgg_teacher.onnx --student samples/vgg_student.onnx \
    --data samples/calib.npz --provider "$PROVIDER" -o "$OUT/work/vgg.fskd.onnx" --report "$OUT/vgg_report.json" --force \
    2>&1 | tail -4 | tee -a "$OUT/log.txt"
summary "$OUT/vgg_report.json"
fi

if step mobilenet_fit; then
log "fit --provider $PROVIDER: MobileNet-style ImageNet net pruned 50 %, $SAMPLES random crops"
python3 - "$OUT/work" "$SAMPLES" <<'EOF'
import sys
sys.path.insert(0, "bench")
import numpy as np, onnx
from nets import mobilenet_v2ish
onnx.save(mobilenet_v2ish(), f"{sys.argv[1]}/mobilenet.onnx")
np.save(f"{sys.argv[1]}/crops.npy", np.random.default_rng(0).normal(size=(int(sys.argv[2]), 3, 224, 224)).astype(np.float32))
EOF
within 90 python3 -c 'from cli.main import main; main()' fit "$OUT/work/mobilenet.onnx" --prune 0.5 --data "$OUT/work/crops.npy" \
    --provider "$PROVIDER" --augment none -o "$OUT/work/mobilenet.fskd.onnx" --report "$OUT/mobilenet_report.json" --force \
    2>&1 | tail -4 | tee -a "$OUT/log.txt"
summary "$OUT/mobilenet_report.json"
fi
rm -rf "$OUT/work"

fit_cost() { within "$1" python3 bench/fit_cost.py --augment none --samples "$SAMPLES" --batch 64 "${@:2}" 2>&1 \
    | tee -a "$OUT/fit_cost.txt"; }
for solver in q auto; do
    step "$solver" || continue
    for net in mobilenet resnet18; do
        log "fit_cost $PROVIDER $net $solver"
        fit_cost 75 --net "$net" --solver "$solver" --provider "$PROVIDER"
    done
done
if step defaults; then  # the fit's own defaults: solver auto, flipped copies of the samples
    for net in mobilenet resnet18; do
        log "fit_cost $PROVIDER $net auto, flips"
        fit_cost 120 --net "$net" --solver auto --augment auto --provider "$PROVIDER"
    done
fi
if step ab && [ -n "${BEFORE:-}" ]; then
    for net in mobilenet resnet18; do
        for code in this before this; do
            log "fit_cost $PROVIDER $net q, $code code"; echo "## $net q, $code code" >> "$OUT/fit_cost.txt"
            if [ "$code" = before ]; then
                PYTHONPATH="$BEFORE:${PYTHONPATH:-}" fit_cost 75 --net "$net" --solver q --provider "$PROVIDER"
            else
                fit_cost 75 --net "$net" --solver q --provider "$PROVIDER"
            fi
        done
    done
fi
if [ "$PROVIDER" != cpu ] && step compare; then  # other CUDA options for the fit's sessions, against its first mobilenet q row
    for option in $COMPARE; do
        log "fit_cost $PROVIDER mobilenet q with $option"
        fit_cost 75 --net mobilenet --solver q --provider "$PROVIDER" --cuda-option "$option"
    done
fi
if [ "$PROVIDER" != cpu ] && step cpu; then
    for net in mobilenet resnet18; do
        log "fit_cost cpu $net q (the same host's CPU provider)"
        fit_cost 90 --net "$net" --solver q --provider cpu
    done
fi
if step cprofile; then  # where the fit's time goes, by function (cProfile slows the fit: times are not ratios)
    mkdir -p "$OUT/cprofile"
    for net in mobilenet resnet18; do
        log "cprofile $PROVIDER $net q"
        fit_cost 90 --net "$net" --solver q --provider "$PROVIDER" --cprofile "$OUT/cprofile/$net.pstats"
    done
fi
log "done"
