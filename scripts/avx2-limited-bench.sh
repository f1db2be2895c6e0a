#!/usr/bin/env bash
# The llama.cpp bench (issue 17) on an AVX-512 host with every CPU library held to AVX2, for
# when no AVX2-only host is at hand:
#
#   bash scripts/avx2-limited-bench.sh [OUT.json]      # THREADS=1 PRESET=small ITERS=5
#   EXTRA=--compile bash scripts/avx2-limited-bench.sh OUT.json   # more `vlm-ros bench` options
#
# What it limits: torch's own kernels (ATEN_CPU_CAPABILITY=avx2: the int4 kernel, attention,
# the elementwise ops), MKL's GEMV (MKL_ENABLE_INSTRUCTIONS), oneDNN (ONEDNN_MAX_CPU_ISA) and
# FBGEMM's dynamic int8 (FBGEMM_ENABLE_INSTRUCTIONS); llama.cpp is the pinned llama-cpp-python's
# own llama.cpp, built once here with AVX2/FMA/F16C only (GGML_NATIVE off, no AVX-512, no
# AVX-VNNI, no AMX) and loaded through llama-cpp-python's LLAMA_CPP_LIB_PATH. Both sides then
# run the kernels an AVX2-only CPU runs, and the JSON says so (machine.isa_limits, the peer's
# library and its own feature line).
#
# What it is not: an AVX2-only host. The memory system, caches and clocks are this host's, and
# llama.cpp built without AMX turns its repacked weight layouts back on (the AMX host's runs
# had them off), as an AVX2 host's llama.cpp does. Compare the ratios within one run only.
#
# Needs: the project's .venv with the peers (scripts/setup.sh --peers), cmake and a C++
# compiler for the one-time library build (3.5 min on 2 cores: the library only), cached by
# llama-cpp-python version under ~/.cache/vlm_ros.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${1:-$ROOT/bench/results/cpu-small-avx2-limited.json}"
THREADS="${THREADS:-1}"
PRESET="${PRESET:-small}"
ITERS="${ITERS:-5}"
read -ra EXTRA_ARGS <<<"${EXTRA:-}"

die() { echo "avx2-limited-bench: $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

grep -qw avx2 /proc/cpuinfo || die "this CPU has no AVX2"
[[ -x "$PY" ]] || die "no $PY: run scripts/setup.sh --peers first"
VER="$(sed -n 's/^llama-cpp-python[^=;#]*==\([0-9.]*\).*/\1/p' "$ROOT/scripts/requirements-peers.txt" | head -1)"
[[ -n "$VER" ]] || die "no pinned llama-cpp-python in scripts/requirements-peers.txt"
"$PY" -c "import llama_cpp" 2>/dev/null || die "llama-cpp-python is not installed: scripts/setup.sh --peers"
LIB_DIR="${VLM_ROS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vlm_ros}/llama-cpp-$VER-avx2-lib"

build_llama() {
    command -v cmake >/dev/null || die "cmake is needed to build llama.cpp (apt install cmake, or pip install cmake)"
    local work
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' RETURN
    log "fetching the llama-cpp-python $VER source (its vendored llama.cpp is what the bindings expect)"
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$VER" 2>&1 \
        | sed '/is ignored: it is neither a file nor a directory/d' >&2
    tar -xzf "$work"/llama_cpp_python-"$VER".tar.gz -C "$work"
    local src="$work/llama_cpp_python-$VER/vendor/llama.cpp"
    [[ -f "$src/CMakeLists.txt" ]] || die "no vendored llama.cpp in the llama-cpp-python $VER source"
    log "building llama.cpp with AVX2/FMA/F16C only into $LIB_DIR (once; a few minutes)"
    cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
        -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF >"$work/cmake.log" 2>&1 \
        || { tail -20 "$work/cmake.log" >&2; die "cmake configure failed"; }
    cmake --build "$work/build" --target llama -j "$(nproc)" >"$work/build.log" 2>&1 \
        || { tail -20 "$work/build.log" >&2; die "building llama.cpp failed"; }
    mkdir -p "$LIB_DIR.tmp"
    find "$work/build" -name 'lib*.so*' -exec cp -a {} "$LIB_DIR.tmp/" \;
    [[ -e "$LIB_DIR.tmp/libllama.so" ]] || die "the build left no libllama.so"
    rm -rf "$LIB_DIR" && mv "$LIB_DIR.tmp" "$LIB_DIR"
}
[[ -e "$LIB_DIR/libllama.so" ]] || build_llama

export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 LLAMA_CPP_LIB_PATH="$LIB_DIR"
export LD_LIBRARY_PATH="$LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"  # libllama's own ggml

# Refuse to write a result that is not what it says: torch on AVX2 kernels, llama.cpp without
# AVX-512 (its own line of features).
cd "$ROOT"
"$PY" - <<'EOF' || die "the ISA limits did not take effect (see above)"
import sys, torch
from vlm_ros.bench import llamacpp
cap = torch.backends.cpu.get_cpu_capability()
info = llamacpp.system_info()
print(f"torch CPU kernels: {cap}; llama.cpp: {info}", file=sys.stderr)
sys.exit(0 if cap == "AVX2" and "AVX512 = 1" not in info and "AVX2 = 1" in info else 1)
EOF
log "bench: preset $PRESET, $THREADS thread(s), $ITERS iterations -> $OUT"
exec "$PY" -m vlm_ros bench --preset "$PRESET" --iters "$ITERS" --int8 --int4 --bf16 --llamacpp \
    --threads "$THREADS" --out "$OUT" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
