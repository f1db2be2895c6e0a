#!/usr/bin/env bash
# The float32 and 4-bit weight-only (engines/weight_int4.py) paths on an aarch64 CPU, checked
# on an x86-64 Debian/Ubuntu host under qemu user-mode emulation: a correctness check only,
# emulated speed means nothing.
#
#   sudo bash scripts/arm64-emulated-check.sh [SYSROOT]      # default /tmp/vlm_ros_arm64
#
# Builds, once each (a step whose directory is complete is skipped on later runs):
#   SYSROOT/qemu   a static qemu-aarch64 >= 8.2 (Debian trixie's qemu-user) when the host's is
#                  older: qemu 7.2 (bookworm) hands the host's x86 /proc/cpuinfo to the guest
#                  and torch's cpuinfo then crashes (SIGSEGV) on the first elementwise op;
#                  8.2+ emulates an aarch64 /proc/cpuinfo.
#   SYSROOT/root   Debian bookworm arm64 with python3.11 (debootstrap --foreign, every .deb
#                  unpacked with dpkg -x: no chroot, no binfmt_misc needed)
#   SYSROOT/site   the aarch64 wheels (host pip, --platform/--target): torch as pinned in
#                  scripts/requirements.txt (PyPI's aarch64 wheel is the CUDA 13 build, so its
#                  nvidia-* wheels come too: ~3.5 GB download, ~5 GB on disk), the rest at
#                  the versions of .venv/ (read-only use of its pip)
# then, for each emulated CPU: a probe (torch version, CPU capability, a direct
# _weight_int4pack_mm_for_cpu check against the dequantized weights) and the test files, one
# at a time (OMP_NUM_THREADS=1, nice 10), GPU/ROS-marked tests deselected.
#
# Environment:
#   VLM_ROS_ARM64_CPUS     "cpu[:test,test...|none[:pytest -k expression]];..." (';' between
#                          CPUs; default "neoverse-n1;neoverse-v1:none"): neoverse-n1 = NEON
#                          only (the class of Jetson Orin's A78AE, Pi 5's A76, Graviton2) runs
#                          the probe and every file; neoverse-v1 = SVE 256-bit + bf16 (torch's
#                          SVE256 kernels, Graviton3) the probe only. Its int4 file runs with
#                          "neoverse-n1;neoverse-v1:$INT4:not demo_model": emulated SVE is
#                          slow, and the trained demo model's accuracy test alone had not
#                          finished after 15 min
#   VLM_ROS_ARM64_TESTS    the files a CPU without its own list runs
#   VLM_ROS_ARM64_RESULT   the JSON written (default bench/results/arm64-qemu-tests.json)
#   VLM_ROS_ARM64_TEST_LIMIT  seconds one emulated test may run (pytest-timeout; default 900)
#   VLM_ROS_ARM64_FILE_LIMIT  seconds one emulated test file may run (default 2400; killed
#                          beyond it, with no JUnit XML: keep it above the test limit)
#   VLM_ROS_ARM64_PYTHON   the host python whose pip installs the wheels (default .venv/bin/python)
# Needs root for apt-get/debootstrap on the first run only. Exit code: 0 when every probe and
# test file passed, 1 otherwise (the JSON is written either way).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
S="$(realpath -m "${1:-/tmp/vlm_ros_arm64}")"
INT4=test/test_weight_int4.py
CPUS="${VLM_ROS_ARM64_CPUS:-neoverse-n1;neoverse-v1:none}"
TESTS="${VLM_ROS_ARM64_TESTS:-$INT4 test/test_phi_step.py test/test_parity.py}"
RESULT="${VLM_ROS_ARM64_RESULT:-bench/results/arm64-qemu-tests.json}"
TEST_LIMIT="${VLM_ROS_ARM64_TEST_LIMIT:-900}"
FILE_LIMIT="${VLM_ROS_ARM64_FILE_LIMIT:-2400}"
HOST_PY="${VLM_ROS_ARM64_PYTHON:-$ROOT/.venv/bin/python}"
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
MARKERS="not gpu and not ros"
DESELECT_REASON="-m '$MARKERS': gpu tests need a CUDA device (qemu user-mode has none); ros tests need rclpy and the generated interfaces (not in the aarch64 sysroot)"
PY_ARM="$S/root/usr/bin/python3.11"
log() { printf '[arm64] %s\n' "$*" >&2; }
need_root() { [[ $EUID -eq 0 ]] || { log "step '$1' needs root (apt-get/debootstrap)"; exit 2; }; }
mkdir -p "$S"/{logs,junit,tmp,plugins}
T_START=$SECONDS

# --- 1. qemu-aarch64 >= 8.2 -------------------------------------------------------------------
version_ok() {  # "qemu-aarch64 version X.Y..." -> X.Y >= 8.2
    local v
    v="$("$1" --version 2>/dev/null | head -1 | sed -n 's/.*version \([0-9]*\.[0-9]*\).*/\1/p')"
    [[ -n "$v" ]] && awk -v v="$v" 'BEGIN { split(v, a, "."); exit !(a[1] > 8 || (a[1] == 8 && a[2] >= 2)) }'
}
QEMU=""
for candidate in "$S/qemu/usr/bin/qemu-aarch64" "$(command -v qemu-aarch64-static || true)" \
                 "$(command -v qemu-aarch64 || true)"; do
    if [[ -n "$candidate" && -x "$candidate" ]] && version_ok "$candidate"; then
        QEMU="$candidate"
        break
    fi
done
if [[ -z "$QEMU" ]]; then
    need_root qemu
    log "no qemu-aarch64 >= 8.2 on the host: fetching trixie's static qemu-user into $S/qemu"
    A=(-o "Dir::Etc::SourceList=$S/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
       -o "Dir::State::Lists=$S/apt/lists" -o "Dir::Cache=$S/apt/cache"
       -o APT::Architectures::=amd64)
    mkdir -p "$S"/apt/{lists/partial,cache/archives/partial}
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" \
        > "$S/apt/sources.list"
    apt-get "${A[@]}" update -qq
    rm -f "$S"/apt/qemu-user_*.deb
    (cd "$S/apt" && apt-get "${A[@]}" download qemu-user > "$S/logs/qemu-download.log" 2>&1) \
        || { cat "$S/logs/qemu-download.log" >&2; exit 2; }
    rm -rf "$S/qemu"
    dpkg-deb -x "$S"/apt/qemu-user_*.deb "$S/qemu"
    QEMU="$S/qemu/usr/bin/qemu-aarch64"
    version_ok "$QEMU" || { log "$QEMU is not >= 8.2"; exit 2; }
fi
QEMU_VERSION="$("$QEMU" --version | head -1)"
log "qemu: $QEMU ($QEMU_VERSION)"

# --- 2. the arm64 sysroot with python3.11 -----------------------------------------------------
if [[ ! -f "$S/root/.vlm_ros_complete" ]]; then
    need_root sysroot
    command -v debootstrap > /dev/null || apt-get install -y -qq debootstrap
    log "debootstrap --foreign $SUITE arm64 into $S/root"
    rm -rf "$S/root"
    debootstrap --arch=arm64 --foreign --variant=minbase \
        --include=python3.11,libpython3.11-stdlib,libgomp1,libstdc++6,zlib1g,libffi8,libssl3,libexpat1,libbz2-1.0,liblzma5,libsqlite3-0,ca-certificates \
        "$SUITE" "$S/root" "$MIRROR" > "$S/logs/debootstrap.log" 2>&1
    for deb in "$S"/root/var/cache/apt/archives/*.deb; do
        dpkg-deb -x "$deb" "$S/root"
    done
    rm -rf "$S/root/tmp"  # qemu -L would send the guest's "/tmp" here rather than the host's
    "$QEMU" -L "$S/root" "$PY_ARM" -c 'import ssl, sqlite3, ctypes, lzma, bz2, zlib'
    touch "$S/root/.vlm_ros_complete"
fi

# --- 3. aarch64 wheels ------------------------------------------------------------------------
TORCH_PIN="$(grep -m1 -E '^torch==' scripts/requirements.txt || echo torch)"
SPECS=("$TORCH_PIN")
for name in numpy safetensors tokenizers transformers pillow pyyaml huggingface-hub pytest pytest-timeout; do
    ver="$("$HOST_PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null || true)"
    SPECS+=("$name${ver:+==$ver}")
done
if [[ "$(cat "$S/site/.vlm_ros_complete" 2>/dev/null)" != "${SPECS[*]}" ]]; then
    log "pip install --target $S/site (aarch64): ${SPECS[*]}"
    PLATFORMS=(--platform manylinux2014_aarch64)
    for minor in $(seq 17 36); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done  # glibc 2.36
    rm -rf "$S/site"
    "$HOST_PY" -m pip install -q --no-warn-script-location --disable-pip-version-check \
        "${PLATFORMS[@]}" --python-version 3.11 --implementation cp --abi cp311 \
        --only-binary=:all: --target "$S/site" "${SPECS[@]}" > "$S/logs/pip.log" 2>&1 \
        || { grep -v 'is ignored: it is neither a file' "$S/logs/pip.log" >&2; exit 2; }
    printf '%s' "${SPECS[*]}" > "$S/site/.vlm_ros_complete"
fi

# --- 4. emulated runs -------------------------------------------------------------------------
cat > "$S/plugins/arm64_report.py" <<'PY'
"""Records the node ids pytest deselects (the -m expression) next to the JUnit XML."""
import json
import os


def pytest_deselected(items):
    path = os.environ.get("ARM64_DESELECTED_FILE")
    if path:
        with open(path, "a") as out:
            for item in items:
                out.write(json.dumps(item.nodeid) + "\n")
PY
cat > "$S/plugins/arm64_probe.py" <<'PY'
"""Inside the emulator: what torch sees, and the int4 CPU kernels against the dequantized
weights they stand for (the layer test's bound: 1e-2 of the largest output)."""
import json
import platform
import sys
import time

started = time.time()
import torch  # noqa: E402

from vlm_ros.engines.weight_int4 import (  # noqa: E402
    GROUP_SIZE, WeightOnlyInt4Linear, dequantize, inner_k_tiles, quantize_groups,
)

features = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                 if line.startswith("Features")), [])
out = {
    "python": sys.version.split()[0],
    "platform_machine": platform.machine(),
    "torch": torch.__version__,
    "torch_import_s": round(time.time() - started, 1),
    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "cuda_available": torch.cuda.is_available(),
    "config_show_head": torch.__config__.show().strip().splitlines()[:6],
    "cpuinfo_features": " ".join(features),
    "int4_checks": [],
}
generator = torch.Generator().manual_seed(0)
ok = True
for rows, n, k in ((1, 64, 128), (5, 80, 256), (33, 48, 96), (300, 32, 64)):
    weight = torch.randn(n, k, generator=generator)
    x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
    q, pairs = quantize_groups(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles(k))
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, pairs.to(torch.bfloat16))
    want = x.float() @ dequantize(q, pairs.to(torch.bfloat16).float()).t()
    error = (got.float() - want).abs().max().item()
    bound = 1e-2 * want.abs().max().item()
    layer = WeightOnlyInt4Linear(torch.nn.Linear(k, n - 3))  # padded rows, float32 in and out
    layer_out = layer(x.float())
    check_ok = error <= bound and layer_out.shape == (rows, n - 3) and bool(torch.isfinite(layer_out).all())
    ok = ok and check_ok
    out["int4_checks"].append({"rows": rows, "n": n, "k": k, "max_abs_error": error,
                               "bound": bound, "ok": check_ok})
x = torch.randn(7, 96, generator=generator)
w = torch.randn(40, 96, generator=generator, dtype=torch.float64)
fp32_error = (x @ w.float().t() - (x.double() @ w.t()).float()).abs().max().item()
out["fp32_matmul_max_abs_error_vs_float64"] = fp32_error
ok = ok and fp32_error < 1e-4
out["ok"] = ok
print(json.dumps(out))
sys.exit(0 if ok else 1)
PY

# the emulated python: -L routes the guest's /lib, /usr, /etc to the sysroot; host paths
# (this repo, SYSROOT/site) pass through unchanged
arm_python() {
    env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1 \
        PYTHONUNBUFFERED=1 PYTHONNOUSERSITE=1 TMPDIR="$S/tmp" VLM_ROS_REQUIRE_ROS=0 \
        PYTHONPATH="$S/site:$ROOT:$S/plugins" QEMU_CPU="$1" \
        nice -n 10 timeout --kill-after=30 "$FILE_LIMIT" "$QEMU" -L "$S/root" "$PY_ARM" "${@:2}"
}
STATUS=0
RUNS=()
# the same probe natively on this host, for comparison (its failure does not fail the run)
t0=$SECONDS
PYTHONPATH="$ROOT" OMP_NUM_THREADS=1 "$HOST_PY" "$S/plugins/arm64_probe.py" \
    > "$S/logs/probe-host.json" 2> "$S/logs/probe-host.err" || true
RUNS+=("probe|host|$((SECONDS - t0))|-|-|-")
IFS=';' read -ra ENTRIES <<< "$CPUS"
for entry in "${ENTRIES[@]}"; do
    IFS=: read -r cpu files kexpr <<< "$entry"
    cpu="${cpu// /}"
    files="${files:-$TESTS}"
    files="${files//,/ }"
    [[ "$files" != none ]] || files=""
    kargs=()
    [[ -z "$kexpr" ]] || kargs=(-k "$kexpr")
    log "[$cpu] probe"
    t0=$SECONDS
    if ! arm_python "$cpu" "$S/plugins/arm64_probe.py" > "$S/logs/probe-$cpu.json" 2> "$S/logs/probe-$cpu.err"; then
        STATUS=1
        log "[$cpu] probe FAILED: $(tail -3 "$S/logs/probe-$cpu.err")"
    fi
    RUNS+=("probe|$cpu|$((SECONDS - t0))|-|-|-")
    for file in $files; do
        name="$cpu-$(basename "$file" .py)"
        rm -f "$S/junit/$name.xml" "$S/logs/$name.deselected"
        log "[$cpu] pytest $file"
        t0=$SECONDS
        rc=0
        ARM64_DESELECTED_FILE="$S/logs/$name.deselected" arm_python "$cpu" -m pytest -q \
            -p no:cacheprovider -p arm64_report -o timeout="$TEST_LIMIT" -m "$MARKERS" \
            "${kargs[@]}" --junitxml="$S/junit/$name.xml" "$file" > "$S/logs/$name.log" 2>&1 || rc=$?
        [[ $rc -eq 0 ]] || STATUS=1
        log "[$cpu] $file: exit $rc in $((SECONDS - t0)) s: $(tail -1 "$S/logs/$name.log")"
        RUNS+=("pytest|$cpu|$((SECONDS - t0))|$file|$rc|$kexpr")
    done
done
rm -rf "${S:?}/tmp"/*

# --- 5. the JSON ------------------------------------------------------------------------------
mkdir -p "$(dirname "$RESULT")"
"$HOST_PY" - "$S" "$RESULT" "$QEMU" "$QEMU_VERSION" "$DESELECT_REASON" "$((SECONDS - T_START))" \
    "${SPECS[*]}" "${RUNS[@]}" <<'PY'
import datetime
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sysroot, result, qemu, qemu_version, deselect_reason, total_s, specs, *runs = sys.argv[1:]
S = Path(sysroot)


def du(path):
    return subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True).stdout.split()[0]


def pytest_result(cpu, file, wall, rc, kexpr):
    name = f"{cpu}-{Path(file).stem}"
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    skip_reasons, failures = {}, []
    xml = S / "junit" / f"{name}.xml"
    if xml.exists():
        for case in ET.parse(xml).iter("testcase"):
            test = f"{case.get('classname')}::{case.get('name')}"
            kinds = {child.tag: child for child in case if child.tag in ("failure", "error", "skipped")}
            if "skipped" in kinds:
                counts["skipped"] += 1
                reason = kinds["skipped"].get("message", "")
                skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
            elif "failure" in kinds or "error" in kinds:
                kind = "failure" if "failure" in kinds else "error"
                counts["failed" if kind == "failure" else "errors"] += 1
                failures.append({"test": test, "kind": kind,
                                 "message": (kinds[kind].get("message") or "")[:500]})
            else:
                counts["passed"] += 1
    listed = S / "logs" / f"{name}.deselected"
    deselected = [json.loads(line) for line in listed.read_text().splitlines()] if listed.exists() else []
    log = (S / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()
    reasons = [deselect_reason]
    if kexpr:
        reasons.append(f"-k '{kexpr}': too slow under this emulated CPU (see the script's header)")
    return {"cpu": cpu, "file": file, **counts, "deselected": len(deselected),
            "deselected_reasons": reasons if deselected else [],
            "deselected_tests": deselected, "skip_reasons": skip_reasons, "failures": failures,
            "exit_code": int(rc), "wall_s": int(wall), "summary_line": log[-1] if log else "",
            "log": str(S / "logs" / f"{name}.log")}


probes, files = {}, []
for run in runs:
    kind, cpu, wall, file, rc, kexpr = run.split("|")
    if kind == "probe":
        raw = (S / "logs" / f"probe-{cpu}.json").read_text().strip()
        probe = json.loads(raw.splitlines()[-1]) if raw else {
            "ok": False, "error": (S / "logs" / f"probe-{cpu}.err").read_text()[-2000:]}
        probe["wall_s"] = int(wall)
        probes[cpu] = probe
    else:
        files.append(pytest_result(cpu, file, wall, rc, kexpr))

totals = {k: sum(f[k] for f in files) for k in ("passed", "failed", "errors", "skipped", "deselected")}
out = {
    "what": "vlm_ros float32 + int4_weight_only on aarch64 under qemu user-mode emulation "
            "(correctness only; emulated timings mean nothing)",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "host": subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip(),
    "qemu": {"binary": qemu, "version": qemu_version},
    "sysroot": {"path": sysroot, "debian": "bookworm arm64 (debootstrap --foreign + dpkg -x)",
                "root_size": du(S / "root"), "site_size": du(S / "site"), "wheels": specs.split()},
    "probes": probes,
    "pytest": files,
    "totals": totals,
    "emulated_wall_s": sum(f["wall_s"] for f in files)
    + sum(p["wall_s"] for cpu, p in probes.items() if cpu != "host"),
    "script_wall_s": int(total_s),
    "ok": all(p.get("ok") for cpu, p in probes.items() if cpu != "host")
    and all(f["exit_code"] == 0 for f in files),
}
Path(result).write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps({"totals": totals, "ok": out["ok"]}))
PY
log "wrote $RESULT (exit $STATUS)"
exit "$STATUS"
