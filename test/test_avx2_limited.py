"""scripts/avx2-limited-bench.sh: the llama.cpp bench with every CPU library held to AVX2 on an
AVX-512 host (minutes plus a one-time llama.cpp build: a command whose JSON is committed,
bench/results/cpu-small-avx2-limited.json, not a CI step). Here: the script is valid bash, the
environment it sets really moves torch to its AVX2 kernels, the int4 and dynamic int8 layers
are still right on them, the native decode kernels build for AVX2 and are right, a bench result
records the limits it ran under, and a compiled decode step is served on them only where it
computes what the uncompiled one does."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from test_arm64_check import probe_source

from vlm_ros.engines import cpuinfo

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "avx2-limited-bench.sh"
LIMITS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
}

# Run in a child: the libraries read the variables once, when they load.
CHILD = """
import json, torch
from vlm_ros.bench import measure
facts = measure.machine_facts("cpu")
torch.manual_seed(0)
layer = torch.nn.Linear(256, 96)
x = torch.randn(4, 256)
int8 = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear},
                                              dtype=torch.qint8)
want = layer(x)
error = (int8(x) - want).abs().max().item() / want.abs().max().item()
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "facts": facts,
                  "note": measure._isa_limit_note(facts), "int8_error": error}))
"""


def _child(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env=dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
    )  # fmt: skip


def _host_has_avx2() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and "avx2" in cpuinfo.flags()


def test_the_script_parses_and_refuses_a_result_it_cannot_vouch_for():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    # every limit the bench records is one the script sets, and the script checks them took
    for name, value in LIMITS.items():
        assert f"{name}={value}" in text
    assert 'cap == "AVX2"' in text and '"AVX512 = 1" not in info' in text
    # EXTRA (e.g. --compile) reaches the bench command, after its own options
    assert '--out "$OUT" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}' in text


def test_the_limits_move_torch_to_avx2_and_the_result_says_so():
    if not _host_has_avx2():
        pytest.skip(f"needs an x86-64 CPU with AVX2 (this is {platform.machine()})")
    clean = {k: v for k, v in os.environ.items() if k not in LIMITS}
    plain = _child(CHILD, clean)
    assert plain.returncode == 0, plain.stderr[-2000:]
    plain_out = json.loads(plain.stdout.strip().splitlines()[-1])
    assert "isa_limits" not in plain_out["facts"] and plain_out["note"] == ""

    limited = _child(CHILD, dict(clean, **LIMITS))
    assert limited.returncode == 0, limited.stderr[-2000:]
    out = json.loads(limited.stdout.strip().splitlines()[-1])
    assert out["capability"] == "AVX2"  # the int4 kernel and the elementwise ops: AVX2 code
    assert out["facts"]["torch_cpu_capability"] == "AVX2"
    assert out["facts"]["isa_limits"] == LIMITS
    assert "limited by the environment" in out["note"] and "ATEN_CPU_CAPABILITY=avx2" in out["note"]
    # FBGEMM's AVX2 int8 kernels (7-bit activations, reduce_range) still within the int8 bound
    assert out["int8_error"] < 0.05, out["int8_error"]


def test_int4_layers_are_right_on_torchs_avx2_kernels(tmp_path):
    """The same probe the ARM check runs in its emulator (test_arm64_check.py), here on the
    AVX2 variant of torch's int4 kernel: what an AVX2-only host would run."""
    if not _host_has_avx2():
        pytest.skip(f"needs an x86-64 CPU with AVX2 (this is {platform.machine()})")
    done = _child(probe_source(), dict(os.environ, **LIMITS))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cpu_capability"] == "AVX2"
    assert result["ok"] and len(result["int4_checks"]) == 4
    assert all(check["max_abs_error"] <= check["bound"] for check in result["int4_checks"])


# On AVX2 kernels the `small` decoder's compiled step at two threads once returned logits off by
# ~3, or NaN, at the cache lengths AVX-512 runs had compiled before (336, 352, 376): torch
# 2.13's inductor cache loaded their entries, which do not key on the instruction set. The
# cache is now kept per CPU kind (engines/compile_cache.py, test_compile_cache.py), and with
# it the AVX2 step is compiled afresh and right. StaticDecoder still checks a compiled step
# against the uncompiled one at load.
COMPILED_CHILD = """
import json, torch
from vlm_ros.bench import measure
from vlm_ros.infer.static_decode import StaticDecoder
torch.set_num_threads(2)  # at one thread inductor's code for it is right
lm = measure.build_model("small", "cpu", torch.float32).language_model
embeds = torch.randn(1, 4, lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
with torch.inference_mode():
    served = StaticDecoder(lm, 336, compile=True)
    plain = StaticDecoder(lm, 336, cpu_linear="torch")
    logits = []
    for decoder in (served, plain):
        decoder.prefill(embeds)
        logits.append(decoder.decode_one_token(torch.tensor([[11]])).clone())
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "compiled": served.compiled, "refused": served.compile_refused,
                  "finite": bool(logits[0].isfinite().all()),
                  "gap": (logits[0] - logits[1]).abs().max().item()}))
"""


def test_a_compiled_step_is_served_only_where_it_matches_the_uncompiled_one():
    """compile_decode on AVX2 kernels at a cache length whose step was once served wrong (from
    an AVX-512 cache entry): compiled into this CPU kind's own cache it is served and right;
    where it is wrong anyway (a user's shared TORCHINDUCTOR_CACHE_DIR, a miscompile) the
    decoder refuses it at load (compile_refused says why) and serves the uncompiled one.
    Either way the served logits are the uncompiled decoder's."""
    if not _host_has_avx2():
        pytest.skip(f"needs an x86-64 CPU with AVX2 (this is {platform.machine()})")
    done = _child(COMPILED_CHILD, dict(os.environ, **LIMITS))
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["capability"] == "AVX2"
    assert out["finite"] and out["gap"] < 1e-4, out
    assert out["compiled"] != bool(out["refused"]), out  # served compiled, or refused with why
    if out["refused"]:
        assert "compiled decode step" in out["refused"], out


# A float32 model's int8 weights as regions on AVX2 kernels: inductor's AVX2 code once read
# their bytes 8 at a time through a buffer copy (93.5 ms a `small` token against llama.cpp
# q8_0's 20.0); the weights are now int32 words of four column planes (weight_int8.py).
INT8_CHILD = f"""
import copy, json, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from decode_helpers import greedy, tiny_phi
from vlm_ros.infer import regional_step
from vlm_ros.infer.static_decode import StaticDecoder
lm = tiny_phi()
embeds = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
with torch.inference_mode():
    regions = StaticDecoder(copy.deepcopy(lm), 40, quantize="int8_weight_only", huge_pages=False)
    library = StaticDecoder(copy.deepcopy(lm), 40, quantize="int8_weight_only", huge_pages=False,
                            regional=False)
    runs = [greedy(decoder, embeds, 8) for decoder in (regions, library)]
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(),
                  "regions": isinstance(regions._fast, regional_step.RegionalStep),
                  "words": str(regions.lm.model.layers[0].mlp.fc1.weight.dtype),
                  "same_tokens": runs[0][0] == runs[1][0],
                  "gap": (runs[0][1] - runs[1][1]).abs().max().item()}}))
"""


def test_int8_weights_as_words_are_right_as_regions_on_avx2_kernels():
    """A float32 model's int8 weights (int32 words) decoding as compiled regions on torch's AVX2
    kernels: the regions pass their load check and are served, with the same greedy tokens
    and logits within float32 rounding of the uncompiled library step. Their speed there is
    the bench's (cpu-small-avx2-limited-amd-words.json), not a test's."""
    if not _host_has_avx2():
        pytest.skip(f"needs an x86-64 CPU with AVX2 (this is {platform.machine()})")
    done = _child(INT8_CHILD, dict(os.environ, **LIMITS))
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["capability"] == "AVX2" and out["words"] == "torch.int32", out
    assert out["regions"] and out["same_tokens"] and out["gap"] < 1e-4, out


# engines/native.py's kernels built for AVX2 (8-lane vectors: Phi-2's head of 80 is 10 of
# them, the unrolled attention; 72 is 9, the runtime form) and the float32 regions on them.
NATIVE_CHILD = f"""
import json, sys, torch
import torch.nn.functional as F
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from decode_helpers import greedy, tiny_phi
from vlm_ros.engines import native
from vlm_ros.infer.static_decode import StaticDecoder
refused = native.load()
name, flags = native.build_flags()
g = torch.Generator().manual_seed(0)
w, x, b = (torch.randn(*s, generator=g) for s in ((300, 1000), (1, 1000), (300,)))
gemv = (native.gemv(x, w, b).double() - F.linear(x.double(), w.double(), b.double())).abs().max()
attention = []
for dim in (80, 72):
    q, k, v = (torch.randn(1, 8, 1, dim, generator=g) for _ in range(3))
    keys, values = (torch.randn(1, 8, 64, dim, generator=g) for _ in range(2))
    got = native.attend_one(q, k, v, keys, values, 40)
    want = F.scaled_dot_product_attention(q, keys[:, :, :41], values[:, :, :41])
    attention.append((got - want).abs().max().item())
lm = tiny_phi()
embeds = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
with torch.inference_mode():
    ours = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False)
    library = StaticDecoder(lm, 40, cpu_linear="torch", huge_pages=False)
    runs = [greedy(decoder, embeds, 8) for decoder in (ours, library)]
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(), "refused": refused,
                  "name": name, "flags": flags, "gemv": gemv.item(), "attention": attention,
                  "native_regions": ours.regions.native, "same_tokens": runs[0][0] == runs[1][0],
                  "gap": (runs[0][1] - runs[1][1]).abs().max().item()}}))
"""


def test_the_native_kernels_build_and_are_right_on_avx2():
    """The native kernels built for AVX2 under the limits (their own build, named for it, no
    AVX-512 flag), right against F.linear and SDPA in both attention forms, and the float32
    regions served on them with the library step's tokens. AVX2 code on this AVX-512 host:
    an AVX2-only host's memory system is not measured here."""
    if not _host_has_avx2():
        pytest.skip(f"needs an x86-64 CPU with AVX2 (this is {platform.machine()})")
    done = _child(NATIVE_CHILD, dict(os.environ, **LIMITS))
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["capability"] == "AVX2" and out["refused"] is None, out
    assert out["name"].endswith("vecavx2") and "-mavx2" in out["flags"], out
    assert not any("avx512" in flag for flag in out["flags"]), out
    assert out["gemv"] < 1e-3 and max(out["attention"]) < 1e-5, out
    assert out["native_regions"] and out["same_tokens"] and out["gap"] < 1e-4, out
