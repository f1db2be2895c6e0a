# Platform decisions of scripts/setup.sh, as functions it sources (and tests call through
# setup.sh's dry run). Why a Jetson is different: its torch is NVIDIA's CUDA build for JetPack,
# not a PyPI wheel (PyPI's aarch64 torch has no CUDA for Tegra), its TensorRT comes only from
# JetPack's apt packages, and the ROS 2 wheels on PyPI are x86-64 only. So setup keeps what
# JetPack installed and only checks it, and says in one line what to install where it cannot.

# l4t_version [ROOT]: "36.4.3" from ROOT/etc/nv_tegra_release ("# R36 (release), REVISION: 4.3,
# ..."), else from the nvidia-l4t-core package version ("36.4.3-20250107174145"), else "".
l4t_version() {
    local root=${1:-} release major revision version
    release="$root/etc/nv_tegra_release"
    if [[ -f "$release" ]]; then
        major="$(sed -n 's/^# R\([0-9][0-9]*\) (release).*/\1/p' "$release" | head -1)"
        revision="$(sed -n 's/.*REVISION: \([0-9][0-9.]*\).*/\1/p' "$release" | head -1)"
        if [[ -n "$major" ]]; then
            echo "$major.${revision:-0}"
            return 0
        fi
    fi
    if command -v dpkg-query >/dev/null; then
        version="$(dpkg-query -W -f='${Version}' nvidia-l4t-core 2>/dev/null || true)"
        [[ -n "$version" ]] && echo "${version%%-*}"
    fi
    return 0
}

# jetpack_of L4T: the JetPack release that ships that L4T (NVIDIA's JetPack archive).
jetpack_of() {
    case "$1" in
        36.4.4*) echo 6.2.1 ;;
        36.4.3*) echo 6.2 ;;
        36.4*) echo 6.1 ;;
        36.3*) echo 6.0 ;;
        36.2*) echo "6.0 DP" ;;
        36.*) echo "6.x" ;;
        35.*) echo "5.1.x" ;;
        34.*) echo "5.0.x" ;;
        *) echo "unknown (L4T R$1)" ;;
    esac
}

# jetson_check_torch PYTHON JETPACK [VENV]: torch imports in PYTHON and sees CUDA; else one line
# saying what to install (or which torch in VENV shadows JetPack's) and status 1.
jetson_check_torch() {
    local py=$1 jetpack=$2 venv=${3:-} out version file cuda available where=""
    if ! out="$("$py" -c 'import torch; print(torch.__version__, torch.__file__, torch.version.cuda, torch.cuda.is_available())' 2>&1)"; then
        echo "[setup] ERROR: no torch in $py: install NVIDIA's PyTorch wheel for JetPack $jetpack (docs/JETSON.md, 'torch'); setup.sh never installs torch on a Jetson: PyPI's aarch64 torch has no CUDA for Jetson" >&2
        return 1
    fi
    read -r version file cuda available <<<"${out##*$'\n'}"
    if [[ "$available" != True ]]; then
        [[ -n "$venv" && "$file" == "$venv"/* ]] \
            && where=", and it is inside $venv, shadowing JetPack's: $venv/bin/python -m pip uninstall torch"
        echo "[setup] ERROR: torch $version ($file, CUDA build: $cuda) does not see the GPU: not JetPack's build$where; install NVIDIA's PyTorch wheel for JetPack $jetpack (docs/JETSON.md, 'torch')" >&2
        return 1
    fi
    return 0
}

# jetson_check_tensorrt PYTHON JETPACK: `import tensorrt` works in PYTHON; else one line naming
# JetPack's package and status 1.
jetson_check_tensorrt() {
    local py=$1 jetpack=$2
    if ! "$py" -c 'import tensorrt' >/dev/null 2>&1; then
        echo "[setup] ERROR: 'import tensorrt' fails in $py: install JetPack $jetpack's TensorRT Python bindings: sudo apt install python3-libnvinfer (part of nvidia-jetpack), then run again" >&2
        return 1
    fi
    return 0
}

# jetson_requirements REQUIREMENTS TORCH_VERSION DIR: DIR/requirements-jetson.txt (REQUIREMENTS
# less its torch line) and DIR/constraints-jetson.txt (torch pinned to the version JetPack
# installed, which pip then finds satisfied and never replaces; numpy < 2, the ABI JetPack's
# torch and OpenCV were built against).
jetson_requirements() {
    local req=$1 torch=$2 dir=$3
    mkdir -p "$dir"
    grep -v -E '^[[:space:]]*torch([[:space:]]*[=<>!~;]|[[:space:]]*$)' "$req" >"$dir/requirements-jetson.txt"
    printf 'torch==%s\nnumpy<2\n' "$torch" >"$dir/constraints-jetson.txt"
}

# plan_dry_run: what setup.sh would do on this platform (steps 1-2), and on a Jetson the
# TensorRT check with the base interpreter; changes nothing outside a temporary directory.
plan_dry_run() {
    local reqs=("$ROOT/scripts/requirements.txt") venv_args="" tmp rc=0
    [[ "$MODE" == wheels ]] && reqs+=("$ROOT/scripts/requirements-ros.txt")
    [[ "$MODE" != wheels ]] && venv_args=" --system-site-packages"
    log "dry run: platform $PLATFORM, mode $MODE, interpreter $PY"
    log "would run: $PY -m venv$venv_args $VENV"
    if [[ $PLATFORM == jetson ]]; then
        tmp="$(mktemp -d)"
        jetson_requirements "$ROOT/scripts/requirements.txt" "$SYS_TORCH" "$tmp"
        log "would run: $VENV/bin/python -m pip install -r requirements-jetson.txt -c constraints-jetson.txt"
        log "requirements-jetson.txt: $(grep -v -E '^[[:space:]]*(#|$)' "$tmp/requirements-jetson.txt" | sed 's/[[:space:]]*#.*//' | tr '\n' ' ')"
        log "constraints-jetson.txt: $(tr '\n' ' ' <"$tmp/constraints-jetson.txt")"
        rm -rf "$tmp"
        log "would not run: pip install torch (JetPack's is kept), the ROS 2 wheels (x86-64 only)"
        jetson_check_tensorrt "$PY" "$JETPACK" || rc=1
    else
        log "would run: $VENV/bin/python -m pip install$(printf ' -r %s' "${reqs[@]##*/}")"
        log "requirements.txt: $(grep -v -E '^[[:space:]]*(#|$)' "$ROOT/scripts/requirements.txt" | sed 's/[[:space:]]*#.*//' | tr '\n' ' ')"
    fi
    return $rc
}
