#!/usr/bin/env bash
# The GPU half of vlm_ros's checks, as one prepared run for a machine with a CUDA GPU (and,
# where installed, TensorRT): the CUDA tests (fp16/bf16 parity, CUDA-graph decode, TensorRT
# engine build + parity), then the full-size benchmark against transformers generate().
#
#   bash scripts/gpu-check.sh [OUTDIR]          # default OUTDIR: $OUT, else bench/results/gpu
#
# Written for a bare GPU box with a CUDA build of PyTorch already in `python3` (PYTHON=...
# to choose another): nothing is installed from the network. A transformers wheel in .whl/
# (the version this project is tested with) is installed into /tmp/site first, if present.
# Every step has its own timeout and the run goes on after a failure, so one call yields
# everything it can; the exit code is that of the first failed step. Results (at most 8 files,
# flat, the lent device's limit): pytest log + JUnit XML, bench log, bench JSON + Markdown (and,
# where TensorRT is installed, a second bench with the TensorRT vision engine: JSON + Markdown),
# environment with nvidia-smi.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUTDIR="${1:-${OUT:-bench/results/gpu}}"
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/{gpu-tests,bench}.log  # the steps append to these
PY="${PYTHON:-python3}"
PRESET="${VLM_ROS_GPU_PRESET:-llava-phi-full}"
ITERS="${VLM_ROS_GPU_ITERS:-10}"
DEVICE="${VLM_ROS_GPU_DEVICE:-cuda}"  # cpu: a dry run of this script (CI checks it so)
# Step limits: 200 + 360 s fit the lent device's 600 s per call with room to spare (the
# TensorRT bench only runs where tensorrt is installed, which that image is not).
TEST_LIMIT="${VLM_ROS_GPU_TEST_LIMIT:-200}"
BENCH_LIMIT="${VLM_ROS_GPU_BENCH_LIMIT:-360}"
export PYTHONUNBUFFERED=1 VLM_ROS_REQUIRE_ROS=0 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEELS="${VLM_ROS_GPU_WHEELS:-.whl}"  # a folder of wheels to install first ("none": skip)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl; then
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    else
        echo "[gpu-check] WARNING: installing $WHEELS/*.whl failed: the machine's own packages are used"
    fi
fi
RC=0
step() {  # step NAME SECONDS LOG CMD...: run under a timeout, tee to LOG, keep the first failure
    local name=$1 limit=$2 log=$3
    shift 3
    echo "[gpu-check] $name (limit ${limit}s)"
    # SIGINT first: pytest still writes its JUnit XML and summary; KILL 15 s later if need be
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "[gpu-check] $name: exit $rc"
    (( rc != 0 && RC == 0 )) && RC=$rc
    return 0
}

{
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__,
      "transformers", transformers.__version__, "cuda", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import tensorrt
    print("tensorrt", tensorrt.__version__)
except ImportError as exc:
    print("tensorrt: not installed:", exc)
EOF
} >"$OUTDIR/environment.txt" 2>&1
cat "$OUTDIR/environment.txt"

# These files hold every CUDA/TensorRT test; on CUDA only those marked gpu run (their CPU
# siblings run in CI: device time is scarce). -rs names each skip and why, so a missing
# TensorRT shows in the log instead of passing silently.
TESTS=(test/test_parity.py test/test_static_decode.py test/test_trt.py test/test_weight_int4.py)
[[ -n "${VLM_ROS_GPU_TESTS:-}" ]] && read -r -a TESTS <<<"$VLM_ROS_GPU_TESTS"
MARK=()
[[ "$DEVICE" == cuda ]] && MARK=(-m gpu)
step "CUDA tests" "$TEST_LIMIT" "$OUTDIR/gpu-tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider \
    ${MARK[@]+"${MARK[@]}"} "${TESTS[@]}" --junitxml="$OUTDIR/gpu-tests.xml"
COMPILE=()
[[ "$DEVICE" == cuda ]] && COMPILE=(--compile)  # the decode step in a CUDA graph
step "bench $PRESET" "$BENCH_LIMIT" "$OUTDIR/bench.log" "$PY" -m vlm_ros bench --preset "$PRESET" --device "$DEVICE" \
    --iters "$ITERS" --int4 ${COMPILE[@]+"${COMPILE[@]}"} --out "$OUTDIR/$DEVICE-$PRESET.json"
# The vision target (encoder + projector <= 2 ms) is TensorRT's: where it is installed, the same
# bench with the engine built for the run (the lent H200 image has no TensorRT: skipped there).
if [[ "$DEVICE" == cuda ]] && "$PY" -c "import tensorrt; tensorrt.Builder" 2>/dev/null; then
    step "bench $PRESET, TensorRT vision" "$BENCH_LIMIT" "$OUTDIR/bench.log" "$PY" -m vlm_ros bench \
        --preset "$PRESET" --device cuda --iters "$ITERS" --compile --vision-backend tensorrt \
        --out "$OUTDIR/cuda-$PRESET-tensorrt.json"
else
    echo "[gpu-check] TensorRT vision bench: skipped (needs CUDA and an importable tensorrt)" \
        | tee -a "$OUTDIR/bench.log"
fi
exit "$RC"
