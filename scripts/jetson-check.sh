#!/usr/bin/env bash
# The one check a Jetson Orin user runs once, on the device, after scripts/setup.sh: it writes
# OUTDIR/jetson-check.json (plus the logs beside it) to share or commit. The Jetson sibling of
# scripts/gpu-check.sh:
#   1. the device: board, L4T/JetPack, power mode (nvpmodel), clocks (jetson_clocks --show),
#      memory, swap/zram, torch/CUDA/TensorRT versions        -> environment.json
#   2. the GPU tests (fp16/bf16 parity, CUDA-graph decode, TensorRT build + parity)
#                                                                -> gpu-tests.log/.xml
#   3. `vlm-ros build-engines` for the model, where the profile uses TensorRT -> build-engines.log
#   4. the board's profile run: the model loaded as the board's params file says (memory plan
#      checked first), answering on a camera-sized image: tokens/s and image->answer latency
#      against the file's budgets, memory against the plan      -> profile.json
#   5. the bench (fast path vs transformers generate()) where a half-precision full-size model
#      fits the board (not on an 8 GB Orin)                       -> bench-*.json/.md, bench.log
#   6. everything in one file                                     -> jetson-check.json
#
#   bash scripts/jetson-check.sh [OUTDIR]        # default OUTDIR: bench/results/jetson-<board>
#
# Environment: VLM_ROS_JETSON_MODEL (checkpoint directory for steps 3-4; without it they are
# skipped, saying so), VLM_ROS_JETSON_PARAMS (params file; default: this board's LLaVA-Phi
# profile), PYTHON (default .venv/bin/python), VLM_ROS_JETSON_DEVICE (cuda; cpu = a dry run of
# this script, which CI runs), VLM_ROS_JETSON_PRESET / _ITERS / _TESTS / _TEST_LIMIT /
# _BENCH_LIMIT. Every step has its own timeout and the run goes on after a failure; the exit
# code is that of the first failed step.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
log() { echo "[jetson-check] $*"; }
# shellcheck source=scripts/platform.sh
source scripts/platform.sh
PY="${PYTHON:-}"
[[ -z "$PY" && -x .venv/bin/python ]] && PY=.venv/bin/python
PY="${PY:-python3}"
DEVICE="${VLM_ROS_JETSON_DEVICE:-cuda}"
ITERS="${VLM_ROS_JETSON_ITERS:-5}"
TEST_LIMIT="${VLM_ROS_JETSON_TEST_LIMIT:-900}"
BENCH_LIMIT="${VLM_ROS_JETSON_BENCH_LIMIT:-1200}"
MODEL="${VLM_ROS_JETSON_MODEL:-}"
export VLM_ROS_L4T VLM_ROS_JETPACK PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLM_ROS_REQUIRE_ROS=0
VLM_ROS_L4T="$(l4t_version "${VLM_ROS_SYSROOT:-}")"
VLM_ROS_JETPACK="$( [[ -n "$VLM_ROS_L4T" ]] && jetpack_of "$VLM_ROS_L4T" )"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

BOARD="$("$PY" -c 'from vlm_ros.model.boards import detect_board as d; b = d(); print(b.key if b else "")')"
[[ -z "$BOARD" ]] && log "WARNING: not a Jetson Orin (no device tree model): measuring this machine anyway"
OUTDIR="${1:-bench/results/jetson-${BOARD:-unknown}}"
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/{gpu-tests,bench,build-engines}.log "$OUTDIR/steps.txt"
case "$BOARD" in  # the LLaVA-Phi profile of this board (docs/JETSON.md)
    orin-nano-8gb | orin-nx-8gb) DEFAULT_PARAMS=config/llava_phi_orin_nano.yaml ;;
    orin-nx-16gb) DEFAULT_PARAMS=config/llava_phi_orin_nx.yaml ;;
    *) DEFAULT_PARAMS=config/llava_phi_orin.yaml ;;
esac
PARAMS="${VLM_ROS_JETSON_PARAMS:-$DEFAULT_PARAMS}"
PRESET="${VLM_ROS_JETSON_PRESET:-llava-phi-full}"

RC=0
step() {  # step NAME SECONDS LOG CMD...: run under a timeout, tee to LOG, keep the first failure
    local name=$1 limit=$2 out=$3
    shift 3
    log "$name (limit ${limit}s)"
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$out"
    local rc=${PIPESTATUS[0]}
    log "$name: exit $rc"
    printf '%s\t%s\n' "$name" "$rc" >>"$OUTDIR/steps.txt"
    (( rc != 0 && RC == 0 )) && RC=$rc
    return 0
}
skip() {  # skip NAME WHY
    log "$1: skipped ($2)"
    printf '%s\tskipped: %s\n' "$1" "$2" >>"$OUTDIR/steps.txt"
}
setting() {  # setting NAME: a parameter of $PARAMS
    "$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["/**"]["ros__parameters"].get(sys.argv[2], ""))' "$PARAMS" "$1"
}

# 1. the device
step "environment" 120 /dev/null "$PY" -m vlm_ros.bench.jetson environment "$OUTDIR/environment.json"

# 2. the GPU tests (on CUDA only those marked gpu; their CPU siblings run in CI)
TESTS=(test/test_parity.py test/test_static_decode.py test/test_trt.py)
[[ -n "${VLM_ROS_JETSON_TESTS:-}" ]] && read -r -a TESTS <<<"$VLM_ROS_JETSON_TESTS"
MARK=()
[[ "$DEVICE" == cuda ]] && MARK=(-m gpu)
step "GPU tests" "$TEST_LIMIT" "$OUTDIR/gpu-tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider \
    ${MARK[@]+"${MARK[@]}"} "${TESTS[@]}" --junitxml="$OUTDIR/gpu-tests.xml"

# 3. the TensorRT engines of the model, built on this device (engines are per GPU + TensorRT)
if [[ -z "$MODEL" ]]; then
    skip "build-engines" "no VLM_ROS_JETSON_MODEL"
elif [[ "$(setting vision_backend)" != tensorrt ]]; then
    skip "build-engines" "$PARAMS does not use the TensorRT vision stage"
elif ! "$PY" -c 'import tensorrt' 2>/dev/null; then
    skip "build-engines" "tensorrt does not import: sudo apt install python3-libnvinfer"
else
    step "build-engines" "$BENCH_LIMIT" "$OUTDIR/build-engines.log" "$PY" -m vlm_ros build-engines \
        --model "$MODEL" --engine-dir "$(setting engine_dir)"
fi

# 4. the board's profile: the product path at the params file's settings
if [[ -z "$MODEL" ]]; then
    skip "profile" "no VLM_ROS_JETSON_MODEL (a checkpoint directory)"
else
    DEV_ARGS=()
    [[ "$DEVICE" != cuda ]] && DEV_ARGS=(--device "$DEVICE")
    step "profile $PARAMS" "$BENCH_LIMIT" "$OUTDIR/profile.log" "$PY" -m vlm_ros.bench.jetson profile \
        --params "$PARAMS" --model "$MODEL" --iters "$ITERS" ${DEV_ARGS[@]+"${DEV_ARGS[@]}"} \
        "$OUTDIR/profile.json"
fi

# 5. the bench, where its half-precision model fits this board by the memory plan
FITS="$("$PY" - "$PRESET" "$BOARD" <<'EOF'
import sys
from vlm_ros.config import RuntimeConfig
from vlm_ros.model import memory_plan as mp
preset, board = sys.argv[1], sys.argv[2]
family = {"llava-phi-full": "llava_phi", "mipha-full": "mipha_phi", "tinyllava-full": "tinyllava"}
if board not in mp.BOARDS or preset not in family:
    print("yes")  # not a known board, or a small preset: nothing to refuse
else:
    plan = mp.make_plan(mp.published(family[preset]), RuntimeConfig(device="cuda"), "bfloat16",
                        mp.BOARDS[board])
    print("yes" if plan.fits else f"no: bf16 {preset} needs {mp.gib(plan.need)} of {mp.gib(plan.capacity)}")
EOF
)"
if [[ "$FITS" != yes ]]; then
    skip "bench $PRESET" "$FITS; the profile run is this board's figure"
else
    COMPILE=()
    [[ "$DEVICE" == cuda ]] && COMPILE=(--compile)
    step "bench $PRESET" "$BENCH_LIMIT" "$OUTDIR/bench.log" "$PY" -m vlm_ros bench --preset "$PRESET" \
        --device "$DEVICE" --iters "$ITERS" ${COMPILE[@]+"${COMPILE[@]}"} --out "$OUTDIR/bench-$PRESET.json"
fi

# 6. one JSON
step "summary" 60 /dev/null "$PY" -m vlm_ros.bench.jetson summary "$OUTDIR"
log "wrote $OUTDIR/jetson-check.json"
exit "$RC"
