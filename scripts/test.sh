#!/usr/bin/env bash
# Run every check of vlm_ros: install/update .venv/ (scripts/setup.sh, idempotent), then ruff,
# vermin (Python 3.10 APIs), mypy (the TensorRT module against tensorrt-stubs), the core's
# tests on the oldest supported transformers (scripts/compat.sh) and pytest over test/. Extra
# arguments go to pytest (and skip the compat run), e.g. `bash scripts/test.sh -k interfaces -x`.
#
# The ROS tests run over real rclpy / Fast DDS; rclpy and the generated interfaces are required
# (a missing rclpy fails the run instead of skipping) unless VLM_ROS_REQUIRE_ROS=0 is set.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VLM_ROS_VENV:-$ROOT/.venv}"

bash scripts/setup.sh --peers   # the llama.cpp peer too: its tests run here

export VLM_ROS_REQUIRE_ROS="${VLM_ROS_REQUIRE_ROS:-1}"
[[ "${CI:-}" == true ]] && export VLM_ROS_REQUIRE_ROS=1
# Keep DDS traffic of the tests on this machine's loopback, in a domain of its own per run.
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( (RANDOM % 90) + 10 ))}"
case "${ROS_DISTRO:-kilted}" in
    humble|iron) export ROS_LOCALHOST_ONLY=1 ;;
    *) export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ;;
esac
export PYTHONDONTWRITEBYTECODE=1
echo "[test] ROS_DOMAIN_ID=$ROS_DOMAIN_ID VLM_ROS_REQUIRE_ROS=$VLM_ROS_REQUIRE_ROS"

FAILED=()
echo "[test] ruff check (target py310)"
"$VENV/bin/ruff" check "$ROOT" || FAILED+=(ruff)
echo "[test] ruff format --check"
"$VENV/bin/ruff" format --check "$ROOT" || FAILED+=(ruff-format)

# ruff's py310 target checks syntax; vermin also checks the stdlib APIs used (tomllib,
# datetime.UTC, ... are 3.11+): users run Python 3.10 (Humble, JetPack 6) to 3.12.
echo "[test] vermin (Python 3.10 and later)"
"$VENV/bin/vermin" --no-tips --quiet -t=3.10- --violations --eval-annotations \
    vlm_ros test launch scripts setup.py || FAILED+=(vermin)

if [[ -f vlm_ros/engines/trt_engine.py ]]; then
    echo "[test] mypy vlm_ros/engines/trt_engine.py (tensorrt-stubs)"
    MYPYPATH="$VENV/typestubs" "$VENV/bin/mypy" vlm_ros/engines/trt_engine.py || FAILED+=(mypy)
fi

# The oldest supported transformers, on the core's tests (full runs only, not `test.sh -k ...`).
if (( $# == 0 )) && [[ "${VLM_ROS_SKIP_COMPAT:-0}" != 1 ]]; then
    echo "[test] transformers floor (scripts/compat.sh)"
    bash scripts/compat.sh || FAILED+=("compat (oldest transformers)")
fi

echo "[test] pytest test/ $*"
set +e
"$VENV/bin/python" -m pytest test/ "$@"
RC=$?
set -e
case $RC in
    0) ;;
    5) echo "[test] ERROR: pytest collected no tests (exit code 5)" >&2; FAILED+=("pytest: no tests") ;;
    *) FAILED+=("pytest (exit $RC)") ;;
esac

if (( ${#FAILED[@]} )); then
    echo "[test] FAILED: ${FAILED[*]}" >&2
    exit 1
fi
# (no trailing output: pytest's summary stays the closing line)
