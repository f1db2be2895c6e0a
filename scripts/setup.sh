#!/usr/bin/env bash
# Install everything vlm_ros needs into .venv/ at the repository root. Idempotent: a second run
# with unchanged requirements and interface files is a fast no-op.
#
#   bash scripts/setup.sh            # install / update
#   bash scripts/setup.sh --force    # redo every step
#   bash scripts/setup.sh --peers    # also the benchmark's peers (llama.cpp; scripts/test.sh)
#
# Two modes:
#   * no ROS 2 sourced (ROS_DISTRO unset): ROS 2 Kilted from PyPI wheels (CPython 3.11 only) into
#     the venv, the interfaces built with CMake against those wheels;
#   * a ROS 2 sourced (Humble/Jazzy/Kilted...): a venv with --system-site-packages on top of it,
#     the interfaces built with the sourced ament/rosidl.
# On a Jetson (L4T/JetPack detected from /etc/nv_tegra_release or the nvidia-l4t-core package):
#   * a sourced ROS 2 Humble is required (the PyPI wheels are x86-64 CPython 3.11 only), and the
#     venv is made with the system python3 (the one Humble and JetPack's torch are built for);
#   * torch is never installed: JetPack's CUDA build (system site-packages) is kept, pinned by a
#     pip constraint so that no dependency can pull PyPI's aarch64 torch over it (numpy < 2 too:
#     JetPack's torch is built against numpy 1.x);
#   * torch must see CUDA and `tensorrt` (JetPack's python3-libnvinfer) must import, in the venv;
#     otherwise the script stops with one line naming what to install (docs/JETSON.md).
# Any other platform without a sourced ROS 2 but x86-64 stops the same way. x86-64 is unchanged.
# Either way the generated interfaces are installed to .venv/vlm_ros_interfaces/ (a .pth file puts
# their Python dir on sys.path, RPATH finds their shared libraries) and the repository root is
# put on sys.path (like an editable install), so `.venv/bin/python -c "from vlm_ros.msg import SceneAnswer"` and
# `.venv/bin/vlm-ros` work with no environment setup.
#
# Environment: VLM_ROS_VENV (venv path, default <repo>/.venv), PYTHON (interpreter to create it),
# VLM_ROS_SETUP_DRY_RUN=1 (print the platform's decisions and the install commands, run the
# platform checks with the base interpreter, change nothing; test/test_setup_platform.py),
# VLM_ROS_SYSROOT (read etc/nv_tegra_release under this root instead of /; for those tests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLM_ROS_VENV:-$ROOT/.venv}"
IFACE_PREFIX="$VENV/vlm_ros_interfaces"
FORCE=0
PEERS="${VLM_ROS_PEERS:-0}"
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        --peers) PEERS=1 ;;
        *) echo "[setup] ERROR: unknown argument $arg (--force, --peers)" >&2; exit 2 ;;
    esac
done

log() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }
START=$SECONDS

# ---- 0. the platform: a Jetson keeps JetPack's torch and TensorRT -----------------------------
DRY_RUN="${VLM_ROS_SETUP_DRY_RUN:-0}"
# shellcheck source=scripts/platform.sh
source "$ROOT/scripts/platform.sh"
MACHINE="$(uname -m)"
L4T="$(l4t_version "${VLM_ROS_SYSROOT:-}")"
PLATFORM="$MACHINE"
if [[ -n "$L4T" ]]; then
    PLATFORM=jetson
    JETPACK="$(jetpack_of "$L4T")"
    log "Jetson: L4T R$L4T (JetPack $JETPACK), $MACHINE"
    (( ${L4T%%.*} >= 36 )) || die "L4T R$L4T is JetPack $JETPACK (Ubuntu 20.04, Python 3.8): vlm_ros needs JetPack 6 (L4T R36: Python 3.10, ROS 2 Humble); flash JetPack 6, or run docker/jetson.Dockerfile"
    [[ -n "${ROS_DISTRO:-}" ]] || die "Jetson (JetPack $JETPACK): source ROS 2 Humble first (source /opt/ros/humble/setup.bash; install: apt install ros-humble-ros-base), then run again: the ROS 2 wheels on PyPI are x86-64 CPython 3.11 only"
elif [[ "$MACHINE" != x86_64 && -z "${ROS_DISTRO:-}" ]]; then
    die "no ROS 2 sourced on $MACHINE: the ROS 2 wheels on PyPI are x86-64 CPython 3.11 only; source a ROS 2 install (e.g. /opt/ros/humble/setup.bash) and run again"
fi

if [[ -n "${ROS_DISTRO:-}" ]]; then
    MODE="sourced-$ROS_DISTRO"
    log "ROS 2 '$ROS_DISTRO' is sourced: using it as is (venv with --system-site-packages)"
else
    MODE="wheels"
    log "no ROS 2 sourced: ROS 2 Kilted from PyPI wheels"
fi

# The interpreter to create the venv with: on a Jetson the system python3 (Humble's and
# JetPack torch's; a python3.11 from elsewhere would see neither), else python3.11 if present.
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ $PLATFORM != jetson ]] && command -v python3.11 >/dev/null; then PY=python3.11; else PY=python3; fi
fi
if [[ $PLATFORM == jetson ]]; then
    # Before anything is installed: JetPack's torch, with CUDA, is what the venv will keep.
    jetson_check_torch "$PY" "$JETPACK" || exit 1
    SYS_TORCH="$("$PY" -c 'import torch; print(torch.__version__)')"
    log "keeping JetPack's torch $SYS_TORCH (never installed from PyPI on a Jetson)"
fi

# ---- 1. the venv -------------------------------------------------------------------------------
if [[ $DRY_RUN == 1 ]]; then
    plan_dry_run  # prints the commands of steps 1-2, checks TensorRT; changes nothing
    exit $?
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    VENV_ARGS=()
    [[ "$MODE" != wheels ]] && VENV_ARGS+=(--system-site-packages)
    log "creating $VENV with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv "${VENV_ARGS[@]}" "$VENV"
elif [[ "$MODE" != wheels ]] && ! grep -qi 'include-system-site-packages = true' "$VENV/pyvenv.cfg"; then
    log "enabling system site-packages in the existing venv (for the sourced ROS 2)"
    sed -i 's/^include-system-site-packages.*/include-system-site-packages = true/I' "$VENV/pyvenv.cfg"
fi
PYBIN="$VENV/bin/python"
PYVER="$("$PYBIN" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [[ "$MODE" == wheels && "$PYVER" != 3.11 ]]; then
    die "the ROS 2 Kilted wheels on PyPI are built for CPython 3.11 only; $VENV has Python $PYVER.
       Install python3.11 (or source a ROS 2 install), remove $VENV and run again."
fi
SITE="$("$PYBIN" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
STAMP_DIR="$VENV/.vlm_ros_setup"
mkdir -p "$STAMP_DIR"

# ---- 2. Python dependencies (and the ROS 2 wheels) ---------------------------------------------
REQS=("$ROOT/scripts/requirements.txt")
[[ "$MODE" == wheels ]] && REQS+=("$ROOT/scripts/requirements-ros.txt")
DEPS_HASH="$MODE-$PYVER-$(hash_of "${REQS[@]}" "$ROOT/scripts/requirements-stubs.txt")"
CONSTRAINTS=()
if [[ $PLATFORM == jetson ]]; then
    # requirements.txt less its torch line, and constraints that make pip keep JetPack's torch
    # (an exact pin it already satisfies: anything wanting another torch fails instead)
    jetson_requirements "$ROOT/scripts/requirements.txt" "$SYS_TORCH" "$STAMP_DIR"
    REQS=("$STAMP_DIR/requirements-jetson.txt")
    CONSTRAINTS=(-c "$STAMP_DIR/constraints-jetson.txt")
    DEPS_HASH="$DEPS_HASH-jetson-$(hash_of "$STAMP_DIR/constraints-jetson.txt")"
fi
# pip, quiet; pip's config here may name local find-links/indexes that do not exist for every
# project, and their warnings are noise. Keeps pip's exit status (pipefail; sed exits 0).
pip_q() {
    "$PYBIN" -m pip --disable-pip-version-check -q "$@" 2>&1 \
        | sed '/is ignored: it is neither a file nor a directory/d'
}
if [[ $FORCE == 1 || "$(cat "$STAMP_DIR/deps" 2>/dev/null)" != "$DEPS_HASH" ]]; then
    log "installing Python dependencies ($(basename -a "${REQS[@]}" | tr '\n' ' '))"
    pip_q install --upgrade pip || die "pip upgrade failed"
    REQ_ARGS=()
    for r in "${REQS[@]}"; do REQ_ARGS+=(-r "$r"); done
    pip_q install "${REQ_ARGS[@]}" ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} || die "pip install failed"
    log "installing type stubs into $VENV/typestubs (for mypy only)"
    pip_q install --no-deps --upgrade --target "$VENV/typestubs" -r "$ROOT/scripts/requirements-stubs.txt" \
        || die "pip install of the type stubs failed"
    echo "$DEPS_HASH" > "$STAMP_DIR/deps"
    rm -f "$STAMP_DIR/interfaces"   # rebuild the interfaces against what was installed
else
    log "Python dependencies up to date"
fi

# ---- 2b. the benchmark's peers (--peers: scripts/test.sh, CI) --------------------------------
# llama-cpp-python compiles llama.cpp for the CPU it is built on (GGML_NATIVE): a wheel built on
# an AVX-512 host dies with SIGILL on an AVX2-only one, and pip's own wheel cache is keyed by the
# source archive, not by the CPU. So it is built once per CPU kind (the hash of /proc/cpuinfo's
# flags) into a wheel folder of ours, and pip takes it from there (--find-links: a wheel of the
# pinned version wins over the sdist).
PEER_REQS="$ROOT/scripts/requirements-peers.txt"
if [[ $PEERS == 1 && $MACHINE == x86_64 && $PLATFORM != jetson ]]; then
    LLAMA_VER="$(sed -n 's/^llama-cpp-python[^=;#]*==\([0-9.]*\).*/\1/p' "$PEER_REQS" | head -1)"
    CPU_KEY="$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | tr ' ' '\n' | sed '/^$/d' | sort | sha256sum | cut -c1-12)"
    WHEELS="${VLM_ROS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vlm_ros/wheels}/llama-cpp-python-$LLAMA_VER-cpu-$CPU_KEY"
    PEERS_HASH="$(cat "$STAMP_DIR/deps" 2>/dev/null)-$(hash_of "$PEER_REQS")-cpu-$CPU_KEY"
    if [[ $FORCE == 1 || "$(cat "$STAMP_DIR/peers" 2>/dev/null)" != "$PEERS_HASH" ]]; then
        if ! compgen -G "$WHEELS/llama_cpp_python-$LLAMA_VER-*.whl" >/dev/null; then
            log "building llama-cpp-python $LLAMA_VER for this CPU into $WHEELS (once per CPU kind: 15-45 min on 2 cores)"
            mkdir -p "$WHEELS"
            CMAKE_ARGS="-DGGML_NATIVE=ON ${CMAKE_ARGS:-}" pip_q wheel --no-deps --no-cache-dir \
                -w "$WHEELS" "llama-cpp-python==$LLAMA_VER" || die "building llama-cpp-python failed"
        fi
        log "installing the benchmark's peers (requirements-peers.txt)"
        pip_q install -r "$PEER_REQS" --find-links "$WHEELS" || die "pip install of the peers failed"
        echo "$PEERS_HASH" > "$STAMP_DIR/peers"
    else
        log "benchmark peers up to date"
    fi
fi

# tensorrt-stubs 10.13 (generated by pybind11-stubgen) has a few lines that are not valid Python:
# a parameter named `in`, and a parameter without default after defaults. mypy stops at syntax
# errors even in stubs, so fix those lines (idempotent; the stubs' other errors are silenced in
# pyproject.toml).
TRT_PYI="$VENV/typestubs/tensorrt_bindings/tensorrt.pyi"
if [[ -f "$TRT_PYI" ]]; then
    sed -i -E 's/([(,] *)in: /\1in_: /g; s/, channel_axis: int\) -> IScaleLayer/, channel_axis: int = ...) -> IScaleLayer/' "$TRT_PYI"
fi

# ---- 3. the include-folder pitfall of the wheels -----------------------------------------------
# The wheels' exported CMake targets name the Python and numpy include folders of the machine they
# were built on (/opt/python/cp311-cp311/...), and CMake's generate step fails while those are
# missing. Rewrite them, in the venv's own copies of those files, to this interpreter's folders:
# nothing outside the venv is touched and no root is needed.
if [[ "$MODE" == wheels ]]; then
    PY_INC="$("$PYBIN" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    NP_INC="$("$PYBIN" -c 'import numpy; print(numpy.get_include())')"
    [[ -f "$PY_INC/Python.h" ]] || die "no Python.h in $PY_INC: install the Python 3.11 headers (e.g. python3.11-dev)"
    mapfile -t BAD < <(grep -rl --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null || true)
    if (( ${#BAD[@]} )); then
        log "pointing ${#BAD[@]} CMake export files at $PY_INC and $NP_INC"
        sed -i \
            -e "s#/opt/python/cp311-cp311/include/python3.11#$PY_INC#g" \
            -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$NP_INC#g" \
            "${BAD[@]}"
    fi
fi

# ---- 4. the interfaces (msg/srv/action) --------------------------------------------------------
IFACE_FILES=("$ROOT"/msg/*.msg "$ROOT"/srv/*.srv "$ROOT"/action/*.action "$ROOT/CMakeLists.txt" "$ROOT/package.xml")
IFACE_HASH="$MODE-$(hash_of "${IFACE_FILES[@]}")-$(printf '%s\n' "${IFACE_FILES[@]##*/}" | hash_of /dev/stdin)"
IFACE_PY="$IFACE_PREFIX/lib/python$PYVER/site-packages"
if [[ $FORCE == 1 || "$(cat "$STAMP_DIR/interfaces" 2>/dev/null)" != "$IFACE_HASH" || ! -d "$IFACE_PY/vlm_ros/msg" ]]; then
    log "building the interfaces into $IFACE_PREFIX"
    BUILD="$IFACE_PREFIX/build"
    rm -rf "$IFACE_PREFIX"
    mkdir -p "$BUILD"
    (
        export PATH="$VENV/bin:$PATH"
        if [[ "$MODE" == wheels ]]; then
            export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
        fi
        GEN=()
        command -v ninja >/dev/null && GEN=(-G Ninja)
        cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" \
            -DVLM_ROS_INTERFACES_ONLY=ON \
            -DBUILD_TESTING=OFF \
            -DCMAKE_BUILD_TYPE=Release \
            -DCMAKE_INSTALL_PREFIX="$IFACE_PREFIX" \
            -DCMAKE_INSTALL_RPATH="$IFACE_PREFIX/lib" \
            -DPython3_EXECUTABLE="$PYBIN" \
            > "$BUILD/configure.log" 2>&1 \
            || { tail -40 "$BUILD/configure.log"; exit 1; }
        cmake --build "$BUILD" -j "$(nproc)" > "$BUILD/build.log" 2>&1 \
            || { grep -m20 -B2 -A8 -i 'error' "$BUILD/build.log"; exit 1; }
        cmake --install "$BUILD" > "$BUILD/install.log" 2>&1 \
            || { tail -20 "$BUILD/install.log"; exit 1; }
    ) || die "interface build failed (logs in $IFACE_PREFIX/build/)"
    # The repo's vlm_ros/ is the distribution; rosidl's egg-info would be a second one.
    rm -rf "$IFACE_PY"/vlm_ros-*.egg-info
    echo "$IFACE_HASH" > "$STAMP_DIR/interfaces"
else
    log "interfaces up to date"
fi

# ---- 5. make the source tree and the interfaces importable, and the `vlm-ros` command ----------
# One .pth file: the repository root first, so `import vlm_ros` is the source tree (edits take
# effect at once, like an editable install), then the generated interfaces' folder, which our
# vlm_ros/__init__.py adds to its __path__ (pkgutil.extend_path) so vlm_ros.msg/srv/action resolve.
# (Not `pip install -e .`: setuptools' editable finder runs after sys.path, where the generated
# vlm_ros/ would shadow the source, and its path-based 'compat' mode is deprecated.)
rm -f "$SITE"/__editable__*vlm_ros*.pth "$SITE/vlm_ros_interfaces.pth"
printf '%s\n%s\n' "$ROOT" "$IFACE_PY" > "$SITE/vlm_ros.pth"
# The generated typesupport libraries are also dlopen()ed by bare name at run time (rosidl's
# type-support dispatch), which RPATH does not cover: they must be on LD_LIBRARY_PATH or already
# loaded.
find "$VENV/lib" -maxdepth 1 -name 'libvlm_ros__*.so' -type l -delete
if [[ "$MODE" == wheels ]]; then
    # ros_wheels_bootstrapper re-executes Python with <venv>/lib on LD_LIBRARY_PATH: link them there.
    ln -sf "$IFACE_PREFIX"/lib/libvlm_ros__*.so "$VENV/lib/"
else
    # A sourced ROS 2 set LD_LIBRARY_PATH before Python started: preload them at start-up instead.
    echo "import ctypes, functools, glob; list(map(functools.partial(ctypes.CDLL, mode=ctypes.RTLD_GLOBAL), sorted(glob.glob('$IFACE_PREFIX/lib/libvlm_ros__*.so'))))" \
        >> "$SITE/vlm_ros.pth"
fi
cat > "$VENV/bin/vlm-ros" <<EOF_SCRIPT
#!$PYBIN
# vlm-ros command (written by scripts/setup.sh; pip installs write the same from pyproject.toml)
import sys
from vlm_ros.cli import main
sys.exit(main())
EOF_SCRIPT
chmod +x "$VENV/bin/vlm-ros"

# ---- 6. check, from another directory and with no environment setup ----------------------------
CHECK='import rclpy
from vlm_ros.msg import SceneAnswer, ActionHint, StageLatency
from vlm_ros.srv import Ask
from vlm_ros.action import Describe
import vlm_ros
assert any(p.endswith("vlm_ros") and "vlm_ros_interfaces" not in p for p in vlm_ros.__path__), vlm_ros.__path__
print(rclpy.__file__)'
CLEAN_ENV=()
[[ "$MODE" == wheels ]] && CLEAN_ENV=(-u PYTHONPATH -u LD_LIBRARY_PATH -u _ROS_WHEELS_BOOTSTRAP_COMPLETE)
if ! OUT="$(cd / && env "${CLEAN_ENV[@]}" "$PYBIN" -c "$CHECK" 2>&1)"; then
    echo "$OUT" >&2
    die "the import check failed (rclpy + vlm_ros interfaces from $PYBIN)"
fi
log "import check passed (rclpy from ${OUT##*$'\n'})"
if [[ $PLATFORM == jetson ]]; then
    # In the venv, as the node will run: JetPack's torch with CUDA, and TensorRT
    jetson_check_torch "$PYBIN" "$JETPACK" "$VENV" || exit 1
    jetson_check_tensorrt "$PYBIN" "$JETPACK" || exit 1
    log "Jetson checks passed: torch sees CUDA, tensorrt imports"
fi
log "done in $((SECONDS - START)) s: $VENV  (python $PYVER, mode $MODE)"
