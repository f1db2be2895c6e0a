"""``vlm-ros bench --preset tiny`` runs quickly and writes the documented JSON: every field
present, every derived number consistent with the stages it is derived from, the fast path
greedy-identical to generate(), and each lossy variant within its fidelity threshold
(vlm_ros/infer/fidelity.py). No timing thresholds: CI machines are shared and noisy, and speed
claims live in the committed bench results, not in tests."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_ros.bench.measure import (
    PRESETS,
    VARIANT_RUNTIMES,
    build_model,
    parameter_count,
    percentiles,
)
from vlm_ros.cli import main
from vlm_ros.engines import cpu_kernels
from vlm_ros.engines.cpu_kernels import onednn_linear_available
from vlm_ros.infer import fidelity

STAGE_KEYS = {"p50", "p90", "p99", "mean", "n"}
FAST_METRICS = {"vision", "prefill", "ttft", "decode_per_token", "answer_16", "answer_64",
                "action_hint_5", "action_hint_prefill", "action_hint_branches"}  # fmt: skip
BASE_METRICS = {"vision", "ttft", "answer_16", "answer_64"}
F32 = torch.float32
SPEEDUPS = {"image_to_16_tokens", "image_to_64_tokens", "ttft", "vision"}


def _positive_stages(stages: dict, names: set[str]) -> None:
    assert names <= set(stages), names - set(stages)
    for name in names:
        assert STAGE_KEYS <= set(stages[name]), name
        assert all(stages[name][k] > 0 for k in STAGE_KEYS), (name, stages[name])


def _ratios_are_derived(speedup: dict, base: dict, fast: dict) -> None:
    """Each speed-up is the baseline's p50 over the path's p50 for its stage."""
    stages = {"image_to_16_tokens": "answer_16", "image_to_64_tokens": "answer_64",
              "ttft": "ttft", "vision": "vision"}  # fmt: skip
    assert set(speedup) == SPEEDUPS
    for key, stage in stages.items():
        assert speedup[key] == pytest.approx(base[stage]["p50"] / fast[stage]["p50"]), key


def test_bench_tiny_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    argv = ["bench", "--preset", "tiny", "--iters", "2", "--int8", "--bf16", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    _positive_stages(result["fast"], FAST_METRICS)
    _positive_stages(result["baseline"], BASE_METRICS)
    base, fast = result["baseline"], result["fast"]
    _ratios_are_derived(result["speedup"], base, fast)
    assert result["decode_tokens_per_s"] == pytest.approx(1000 / fast["decode_per_token"]["p50"])
    assert result["action_hint_over_prefill"] == pytest.approx(
        fast["action_hint_5"]["p50"] / fast["ttft"]["p50"]
    )
    assert result["memory"]["peak_host_rss_mib"] > 0
    assert result["model"]["parameters_total"] == parameter_count(build_model("tiny", "meta", F32))
    assert result["parity"]["greedy_prefix_agreement_fast_vs_generate"] == 1.0
    for name, variant in result["variants"].items():  # the tests' thresholds, in the JSON
        _ratios_are_derived(variant["speedup"], base, variant["stages"])
        verdict = variant["accuracy_vs_fp"]["fidelity"]
        expected = fidelity.threshold_for(VARIANT_RUNTIMES[name]).max_logit_error
        assert verdict["max_logit_error"] == expected and verdict["passed"], (name, verdict)
    int8 = result["variants"]["int8"]
    _positive_stages(int8["stages"], FAST_METRICS)
    assert int8["accuracy_vs_fp"]["fidelity"]["max_logit_error"] == 0.3
    weights8 = result["variants"]["int8_weight_only"]  # float32 int8 weights, uncompiled: regions
    _positive_stages(weights8["stages"], FAST_METRICS)
    assert 0 < weights8["accuracy_vs_fp"]["first_logits_error_over_range"] < 0.05
    assert weights8["decode_regions"].startswith(  # int8 weights: inductor's loops read them
        "decode step as compiled regions on inductor's GEMV loops, built in"
    )
    for name, variant in result["variants"].items():  # each says which step it timed
        assert {"decode_regions", "decode_gemvs"} <= set(variant), name
    step = result["variants"]["transformers_step"]  # the lean step's share, and it is lossless
    _positive_stages(step["stages"], FAST_METRICS)
    assert step["accuracy_vs_fp"]["greedy_prefix_agreement"] == 1.0
    assert step["accuracy_vs_fp"]["first_logits_error_over_range"] < 1e-4
    # x86: the fast path on the float32 kernels auto did not pick is measured too (lossless)
    kernels, onednn = result["fast_path"]["cpu_linear"], onednn_linear_available()
    regions = result["fast_path"]["decode_regions"]
    if " regions (uncompiled step)" in kernels:  # AMD: per shape, libraries, inductor's
        assert regions.startswith("decode step as compiled regions")
        native = kernels.startswith("native regions")  # and then the same on inductor's loops
        others = ["per_shape_gemvs"] + ["inductor_regions"] * native + ["onednn_linear"] * onednn
        others += ["mkl_linear"]
        assert cpu_kernels.wants_inductor_gemv("auto", "cpu", F32)  # an AMD CPU
    elif kernels.startswith("inductor GEMVs (uncompiled step)"):  # AMD: both libraries beside
        assert result["fast_path"]["decode_gemvs"].startswith("inductor GEMVs: ")
        others = ["onednn_linear"] * onednn + ["mkl_linear"]
        assert cpu_kernels.wants_inductor_gemv("auto", "cpu", F32)  # an AMD CPU
    else:  # Intel's, or the tiny preset's matrices, all under eager_gemv.MIN_WEIGHT_BYTES
        amd = cpu_kernels.wants_inductor_gemv("auto", "cpu", F32)
        want = "no compiled regions: every weight is under 1 MiB" if amd else "not asked"
        assert regions == want
        assert result["fast_path"]["decode_gemvs"].startswith("library")
        others = [{"onednn": "mkl_linear", "torch": "onednn_linear"}[kernels]] * onednn
        assert "mkl_linear" not in result["variants"] or "onednn_linear" not in result["variants"]
    for other in others:
        plain = result["variants"][other]
        _positive_stages(plain["stages"], FAST_METRICS)
        assert plain["accuracy_vs_fp"]["first_logits_error_over_range"] < 1e-4
    bf16 = result["variants"]["bf16"]
    _positive_stages(bf16["stages"], FAST_METRICS)
    _positive_stages(bf16["baseline_same_dtype"], BASE_METRICS)
    assert set(bf16["speedup_vs_same_dtype_baseline"]) == SPEEDUPS
    assert 0 < bf16["accuracy_vs_fp"]["first_logits_error_over_range"] < 0.1  # bf16, not fp32
    weight_only = result["variants"]["bf16_int8_weight_only"]
    _positive_stages(weight_only["stages"], FAST_METRICS)
    assert set(weight_only["speedup_vs_same_dtype_baseline"]) == SPEEDUPS
    assert 0 < weight_only["accuracy_vs_fp"]["first_logits_error_over_range"] < 0.2
    machine = result["machine"]
    assert machine["cpu"] and isinstance(machine["cpu_flags"], list)
    assert isinstance(machine["bf16_native"], bool) and machine["torch_cpu_capability"]
    table = out.with_suffix(".md").read_text()
    assert "| image -> 16-token answer |" in table and "speedup" in table
    assert "vs generate() in bf16" in table and "native bf16" in table
    assert "int8: " in table and "threshold 3e-01" in table and ": pass" in table
    assert "image -> 16-token answer" in capsys.readouterr().out
    from vlm_ros.bench.measure import markdown

    gpu = {
        "copy_bandwidth_gb_s": 4000.0,
        "decode_bandwidth_fraction": 0.5,
        "decode_bytes_per_token": {"weights": 5_300_000_000, "kv_cache": 230_000_000},
    }
    fast_path = {**result["fast_path"], "cudagraph_skips": 2}
    table = markdown({**result, "gpu": gpu, "fast_path": fast_path})
    assert "5.30 GB of weights + 0.23 GB of KV cache" in table and "50% of that floor" in table
    assert "declined a CUDA graph 2 time(s)" in table


def test_decode_bytes_count_the_cache_the_decoder_allocates():
    """The bandwidth floor counts what a decode step reads: weights without the embedding
    table (one row is looked up) plus the whole static cache (attention reads every slot)."""
    from vlm_ros.bench.measure import decode_bytes_per_token
    from vlm_ros.infer.static_decode import StaticDecoder

    model = build_model("tiny", "cpu", torch.float32)
    lm = model.language_model
    step = decode_bytes_per_token(model, max_seq=48)
    decoder = StaticDecoder(lm, max_seq_len=48, cpu_linear="torch")
    held = sum(t.numel() * t.element_size() for layer in decoder.cache.layers
               for t in (layer.keys, layer.values))  # fmt: skip
    assert step["kv_cache"] == held
    embed = lm.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in lm.parameters())
    assert step["weights"] == total - (embed.shape[0] - 1) * embed.shape[1] * 4


def test_fast_path_is_greedy_identical_to_generate_on_tiny():
    """The bench's own parity line: static decoder + vision stage vs generate()."""
    from vlm_ros.bench.measure import BenchOptions, run

    result = run(BenchOptions("tiny", iters=1, warmup=0))
    assert result["parity"]["greedy_prefix_agreement_fast_vs_generate"] == 1.0


def test_bf16_variant_needs_a_float32_cpu_run():
    from vlm_ros.bench.measure import BenchOptions, run

    with pytest.raises(ValueError, match="float32 run on CPU"):
        run(BenchOptions("tiny", dtype="bfloat16", iters=1, warmup=0, bf16=True))


def test_presets_have_the_published_shapes():
    small = build_model("small", "meta", __import__("torch").float32)
    assert 100e6 <= parameter_count(small) <= 300e6
    assert PRESETS["llava-phi-full"].text["hidden_size"] == 2560
    assert PRESETS["mipha-full"].vision["hidden_size"] == 1152
    assert PRESETS["tinyllava-full"].family == "tinyllava"


def test_percentiles():
    p = percentiles([5.0, 1.0, 3.0, 2.0, 4.0])
    # linear interpolation between order statistics: p90 = 4 + 0.6 * (5 - 4)
    assert (p["p50"], p["n"], p["mean"]) == (3.0, 5, 3.0)
    assert (p["p90"], p["p99"]) == (pytest.approx(4.6), pytest.approx(4.96))


def test_onnx_vision_run_records_its_parity_and_leaves_no_export_behind(tmp_path, monkeypatch):
    """With the ONNX Runtime vision stage the export's own parity check is in the result, and
    the export (GBs at full size) is deleted once the session holds it."""
    import tempfile

    from vlm_ros.bench.measure import BenchOptions, markdown, run

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run(BenchOptions("tiny", iters=1, warmup=0, vision_backend="onnxruntime"))
    export = result["fast_path"]["vision_onnx"]
    assert 0 <= export["max_rel_error_vs_torch"] <= export["tolerance"]
    assert "MatMul" in export["ops"]
    assert result["fast"]["vision"]["p50"] > 0
    assert list(tmp_path.iterdir()) == []
    assert export["providers"] == ["CPUExecutionProvider"] and export["precision"] == "fp32"
    assert "vision ONNX export (fp32, served by CPUExecutionProvider)" in markdown(result)


def test_tensorrt_vision_without_tensorrt_is_one_clear_line(capsys):
    """--vision-backend tensorrt builds the engine for the run where TensorRT and CUDA exist
    (scripts/gpu-check.sh); elsewhere it must say which is missing, not trace back."""
    from vlm_ros.engines.trt_engine import TensorRTUnavailable, require_cuda, require_tensorrt

    try:
        require_tensorrt()
        require_cuda()
    except TensorRTUnavailable as exc:
        missing = str(exc)
    else:
        pytest.skip("TensorRT and CUDA exist here: gpu-check.sh runs this backend for real")
    argv = ["bench", "--preset", "tiny", "--iters", "1", "--vision-backend", "tensorrt"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert missing in err and "Traceback" not in err


# ---- the llama.cpp peer (bench/llamacpp.py) ---------------------------------------------------


def _llama_cpp_or_skip():
    """llama-cpp-python and gguf, or a skip naming them; under CI (which installs both from
    scripts/requirements.txt) a missing one is a failure, not a skip."""
    import os

    from vlm_ros.bench.llamacpp import PeerUnavailable, require_llama_cpp

    try:
        require_llama_cpp()
    except PeerUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs llama-cpp-python and gguf: {exc}")
        pytest.skip(str(exc))


def test_llamacpp_peer_runs_the_same_model(tmp_path):
    """bench --llamacpp on tiny: the decoder exported to GGUF (llama.cpp's phi2 layout) and
    quantized by llama.cpp, run on our embeddings. Its f32 logits equal ours to float32
    rounding (the same model, not a look-alike) and its greedy tokens are ours; q8_0 and q4_0
    are timed and judged the same way; bytes per token come from the files."""
    _llama_cpp_or_skip()
    out = tmp_path / "peer.json"
    argv = ["bench", "--preset", "tiny", "--iters", "2", "--int4", "--llamacpp", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    peer = result["peers"]["llama.cpp"]
    assert set(peer["types"]) == {"f32", "q8_0", "q4_0"} and peer["kv_cache"] == "f32"
    amx = "AMX_INT8 = 1" in peer["system_info"]  # llama.cpp's AMX matmul segfaults: kept off
    assert peer["extra_buffer_types"] is not amx
    band = result["decode_bandwidth"]
    assert band["read_bandwidth_gb_s"] > 0 and band["fast"]["gb_s"] > 0
    # the host's best read: over 4 KiB pages or over huge pages, where the decoder's weights are
    reads = (band["read_bandwidth_4k_pages_gb_s"], band["read_bandwidth_huge_pages_gb_s"] or 0)
    assert min(reads[0], band["read_bandwidth_gb_s"]) > 0
    assert band["read_bandwidth_gb_s"] == max(reads)
    f32, q8, q4 = (peer["types"][k] for k in ("f32", "q8_0", "q4_0"))
    assert f32["accuracy_vs_fp32"]["first_logits_error_over_range"] < 1e-3
    assert f32["accuracy_vs_fp32"]["greedy_prefix_agreement"] == 1.0
    assert f32["tensor_types"] == {"F32": 33}  # 2 layers x 14 + embeddings, norm, head
    assert q4["decode_bytes_per_token"]["weights"] < q8["decode_bytes_per_token"]["weights"]
    assert q8["decode_bytes_per_token"]["weights"] < f32["decode_bytes_per_token"]["weights"]
    for entry in peer["types"].values():
        _positive_stages(entry["stages"], {"prefill", "decode_per_token"})
        ms = entry["stages"]["decode_per_token"]["p50"]
        step = entry["decode_bytes_per_token"]
        assert entry["gb_s"] == pytest.approx((step["weights"] + step["live_kv"]) / ms / 1e6)
        assert entry["accuracy_vs_fp32"]["first_logits_error_over_range"] < 0.5
    table = out.with_suffix(".md").read_text()
    assert "| llama.cpp q4_0 |" in table and "| vlm_ros int4_weight_only |" in table


def test_llamacpp_peer_missing_is_one_clear_line(capsys, monkeypatch):
    """Without llama-cpp-python the peer column is refused in one line naming the install."""
    import builtins

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'", name="llama_cpp")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    argv = ["bench", "--preset", "tiny", "--iters", "1", "--llamacpp"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pip install llama-cpp-python gguf" in err and "Traceback" not in err


def test_full_size_script_runs_every_phase_one_model_at_a_time(tmp_path):
    """scripts/full_size_llamacpp.py (the full-size run against llama.cpp, one model in memory
    at a time) on tiny: every phase of ours and llama.cpp's runs in its own process on the
    same embeddings; llama.cpp's f32 is our fp32 to float32 rounding, the rebuilt fp32 is
    exact, the bytes per token shrink with the width, and each phase reports its own memory
    and its own measured read bandwidth."""
    import subprocess
    import sys
    from pathlib import Path

    _llama_cpp_or_skip()
    script = Path(__file__).resolve().parents[1] / "scripts" / "full_size_llamacpp.py"
    out = tmp_path / "full.json"
    command = [sys.executable, str(script), "tiny", "--iters", "1", "--steps", "4",
               "--threads", "1", "--tmp", str(tmp_path), "--compile", "--huge-pages-ab",
               "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    paths = result["paths"]
    ours = ["fp32", "int8", "bf16_int8_weight_only", "int8_weight_only", "int4_weight_only",
            "fp32_compiled", "int8_weight_only_compiled", "fp32_4k_pages",
            "fp32_compiled_4k_pages"]  # fmt: skip
    names = [f"vlm_ros {n}" for n in ours] + [f"llama.cpp {k}" for k in ("f32", "q8_0", "q4_0")]
    assert sorted(paths) == sorted(names)
    assert paths["vlm_ros fp32"]["accuracy_vs_our_fp32"]["first_logits_max_abs_error"] == 0.0
    f32 = paths["llama.cpp f32"]["accuracy_vs_our_fp32"]
    assert f32["first_logits_error_over_range"] < 1e-3 and f32["greedy_prefix_agreement"] == 1.0
    for name, entry in paths.items():
        assert entry["decode_ms_per_token"]["p50"] > 0 and entry["prefill_ms"]["p50"] > 0, name
        assert 0 < entry["peak_host_rss_mib"] and entry["resident_after_load_mib"] > 0, name
        assert min(entry["read_bandwidth_gb_s"].values()) > 0, name
        assert entry["accuracy_vs_our_fp32"]["first_logits_error_over_range"] < 0.5, name
    weights = {name: entry["decode_bytes_per_token"]["weights"] for name, entry in paths.items()}
    assert weights["llama.cpp q4_0"] < weights["llama.cpp q8_0"] < weights["llama.cpp f32"]
    assert weights["vlm_ros int4_weight_only"] < weights["vlm_ros int8"] < weights["vlm_ros fp32"]
    assert set(result["ours_faster_by"]) == {
        "fp32 vs f32", "int8 vs q8_0", "bf16_int8_weight_only vs q8_0", "int4_weight_only vs q4_0",
        "fp32_compiled vs f32", "int8_weight_only_compiled vs q8_0", "fp32_4k_pages vs f32",
        "fp32_compiled_4k_pages vs f32", "int8_weight_only vs q8_0",
    }  # fmt: skip
    # --huge-pages-ab: the same float32 decoder with huge pages off, the same tokens
    for name in ("fp32_4k_pages", "fp32_compiled_4k_pages"):
        entry = paths[f"vlm_ros {name}"]
        assert entry["huge_pages"] == "off", name
        assert entry["accuracy_vs_our_fp32"]["greedy_prefix_agreement"] == 1, name
    assert paths["vlm_ros fp32"]["huge_pages"].startswith("0 tensors")  # tiny: all below 2 MiB
    for name in ("fp32_compiled", "int8_weight_only_compiled"):  # compiled at load, checked
        entry = paths[f"vlm_ros {name}"]
        assert entry["compiled"] and entry["compile_refused"] is None, entry
    assert paths["vlm_ros fp32_compiled"]["accuracy_vs_our_fp32"]["greedy_prefix_agreement"] == 1
    assert weights["vlm_ros int8_weight_only_compiled"] < weights["vlm_ros fp32"] / 2
    assert not list(tmp_path.glob("vlm_ros_full_peer_*")), "the GGUF files are removed"


def test_compiled_bench_on_cpu_measures_the_uncompiled_step_beside_it(tmp_path):
    """``bench --compile`` on CPU: the compiled step (inductor, C++ wrapper) is the fast path
    and the lean uncompiled step on the same weights is variant ``uncompiled_step``, measured
    in the same run with its own read-bandwidth share; compiling loses nothing (same greedy
    tokens, logits within float32 rounding)."""
    out = tmp_path / "compiled.json"
    command = ["bench", "--preset", "tiny", "--iters", "1", "--compile", "--int8"]
    assert main([*command, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # with --int8: int8 weights, float32 activations, read in the compiled step's own loops
    weight_only = result["variants"]["int8_weight_only"]
    assert weight_only["compiled"] and weight_only["compile_refused"] is None
    assert weight_only["accuracy_vs_fp"]["fidelity"]["passed"]
    shares = result["decode_bandwidth"]
    assert shares["int8_weight_only"]["weights"] < shares["fast"]["weights"] / 2
    assert result["compile_decode"] is True
    assert result["fast_path"]["compiled"] and result["fast_path"]["compile_refused"] is None
    assert "placed on huge-page mappings" in result["fast_path"]["huge_pages"]  # tiny: 0 moved
    assert "transformers_step" not in result["variants"]
    # on an AMD CPU the compiled step's GEMVs are inductor's, and MKL's compiled step beside it
    amd = cpu_kernels.cpu_vendor() in cpu_kernels.AMD_VENDORS
    assert result["fast_path"]["cpu_linear"].startswith("inductor GEMVs") == amd
    assert ("compiled_mkl_linear" in result["variants"]) == amd
    if amd:
        mkl = result["variants"]["compiled_mkl_linear"]["accuracy_vs_fp"]
        assert mkl["greedy_prefix_agreement"] == 1.0 and mkl["first_logits_error_over_range"] < 1e-4
    lean = result["variants"]["uncompiled_step"]
    _positive_stages(lean["stages"], FAST_METRICS)
    assert lean["accuracy_vs_fp"]["greedy_prefix_agreement"] == 1.0
    assert lean["accuracy_vs_fp"]["first_logits_error_over_range"] < 1e-4
    shares = result["decode_bandwidth"]
    assert shares["fast"]["fraction_of_read"] > 0 and shares["uncompiled_step"]["gb_s"] > 0
    assert result["parity"]["greedy_prefix_agreement_fast_vs_generate"] == 1.0
    from vlm_ros.bench.measure import markdown

    assert "refused at load" not in markdown(result)
    refused = {**result["fast_path"], "compiled": False, "compile_refused": "logits off"}
    assert "refused at load** (logits off)" in markdown({**result, "fast_path": refused})


def test_decode_split_script_times_each_part_and_restores_the_step(tmp_path):
    """scripts/decode_split.py (where a decode step's time goes: the step, its Linear layers
    alone, the step without them, without attention too, and the compiled step) on tiny: every
    part is timed in every round against a measured bandwidth, the bytes it divides by are the
    step's, the step computes the same logits after the hollowing as before it, and the
    compiled step's logits are the lean step's (the script asserts both)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "decode_split.py"
    out = tmp_path / "split.json"
    command = [sys.executable, str(script), "tiny", "--threads", "1", "--rounds", "2",
               "--tokens", "4", "--compiled", "--compiled-linear", "inductor",
               "--huge-pages-ab", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    parts = ("step", "linears", "outside_linears", "outside_linears_no_attention",
             "compiled_step", "compiled_linears", "step_4k_pages",
             "compiled_step_4k_pages")  # fmt: skip
    assert len(result["rounds"]) == 2
    for row in result["rounds"]:
        assert row["read_gb_s"] > 0 and all(row[p] > 0 for p in parts), row
        assert row["read_huge_pages_gb_s"] > 0
        for part in ("step", "linears", "compiled_step", "compiled_linears", "step_4k_pages"):
            assert row[f"{part}_share_of_read"] > 0, part
    assert 0 <= result["compiled_max_abs_logit_diff"] < 1e-3
    sizes = result["bytes_per_token"]
    assert 0 < sizes["linear_weights"] <= sizes["weights"] and sizes["live_kv"] > 0
    assert set(parts) | {"attention"} <= set(result["median"])


def test_region_profile_script_times_every_region_after_a_prompt(tmp_path):
    """scripts/region_profile.py (where a token of the compiled regions goes, after a real
    prompt) on tiny: both kernel sets (native and inductor's), every part timed in every round
    against a measured read, the regions' bytes are exactly the decoder's weights but the
    embedding table, attention's the live keys and values, and the regions agree with the
    library step they were made from."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "region_profile.py"
    out = tmp_path / "profile.json"
    command = [sys.executable, str(script), "tiny", "--threads", "1", "--prompt", "12",
               "--steps", "3", "--rounds", "2", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    errors = result["regions_vs_library_step_logit_error_over_range"]
    assert set(errors) == {"native", "inductor"} and max(errors.values()) < 1e-4
    lm = build_model("tiny", "cpu", F32).language_model
    weights = sum(p.numel() * 4 for n, p in lm.named_parameters() if "embed_tokens" not in n)
    config = lm.config
    head_dim = config.hidden_size // config.num_attention_heads
    live = 12 + (3 - 1) / 2  # the middle of the timed steps
    kv = 2 * live * config.num_key_value_heads * head_dim * 4 * config.num_hidden_layers
    assert [row["kernels"] for row in result["rounds"]] == [
        "native",
        "inductor",
        "inductor",
        "native",
    ]  # each round both, the first alternating
    for row in result["rounds"]:
        assert row["read_gb_s"] > 0 and row["step_ms"] > 0
        assert all(row["ms_per_token"][p] > 0 for p in ("layer_in", "layer_out", "head"))
        assert row["ms_per_token"]["attention"] > 0  # the step's rest: cache write and SDPA
        sizes = row["bytes_per_token"]
        assert sizes["layer_in"] + sizes["layer_out"] + sizes["head"] == weights
        assert sizes["attention"] == pytest.approx(kv)
        assert all(share > 0 for share in row["share_of_read"].values())
        # the same tensors read by plain sums, timed beside the parts: every part, positive
        parts = set(sizes)
        for key in ("same_bytes_sum_ms", "same_bytes_sum_share_of_read", "share_of_same_bytes_sum"):
            assert set(row[key]) == parts and all(value > 0 for value in row[key].values()), key
        for part in parts:
            assert row["share_of_same_bytes_sum"][part] == pytest.approx(
                row["same_bytes_sum_ms"][part] / row["ms_per_token"][part]
            )
    for kind in ("native", "inductor"):
        assert set(result["median"][kind]["share_of_same_bytes_sum"]) == parts
    assert result["step_ms_inductor_over_native"] == pytest.approx(
        result["median"]["inductor"]["step_ms"] / result["median"]["native"]["step_ms"]
    )


def test_native_kernels_script_sets_each_kernel_against_a_sum_of_its_bytes(tmp_path):
    """scripts/native_kernels.py (the native GEMV and attention against inductor's loop, SDPA
    and a plain sum of the same bytes, out of cache) at a small scale: every form timed in
    every round, each ratio its GB/s over the same round's sum, the kernels checked against
    their references, the build named."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "native_kernels.py"
    out = tmp_path / "native.json"
    command = [sys.executable, str(script), "--threads", "1", "--layers", "1", "--rounds", "3",
               "--live", "16", "--scale", "20", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["checks"]["gemv_max_abs_error"] < 1e-3
    assert result["checks"]["attention_max_abs_error"] < 1e-5
    assert result["build"]["name"].startswith("vlm_ros_decode_kernels_")
    # one layer at 1/20: 4 x 128x128 + 512x128 + 128x512 floats; 32 heads x 80 x 16 slots x 2
    assert result["gemv"]["bytes_a_round"] == (4 * 128 * 128 + 2 * 512 * 128) * 4
    assert result["attention"]["bytes_a_round"] == 2 * 32 * 80 * 16 * 4
    for part, forms in (
        ("gemv", {"sum", "inductor", "native"}),
        ("attention", {"sum", "sdpa", "native"}),
    ):
        rounds = result[part]["rounds"]
        assert len(rounds) == 3
        for row in rounds:
            assert set(row["gb_s"]) == forms and all(v > 0 for v in row["gb_s"].values())
            for form in forms - {"sum"}:
                assert row[f"{form}_over_sum"] == pytest.approx(
                    row["gb_s"][form] / row["gb_s"]["sum"]
                )
        assert set(result[part]["median"]["gb_s"]) == forms


def test_int8_prefill_blocks_script_times_and_weighs_every_form(tmp_path):
    """scripts/int8_prefill_blocks.py (a float32 model's int8 weights in a CPU prefill: the
    product's blocks into one buffer against a whole float copy per call) on tiny: every form
    timed in every round, the same logits as the whole copies, a memory peak per form, and
    the product's own form put back after."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "int8_prefill_blocks.py"
    out = tmp_path / "blocks.json"
    command = [sys.executable, str(script), "tiny", "--threads", "1", "--prompt", "12",
               "--rounds", "3", "--blocks-mb", "1", "4", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    forms = {"whole_copies", "blocks_1mb", "blocks_4mb"}
    assert len(result["rounds"]) == 3
    for row in result["rounds"]:
        assert set(row["seconds"]) == forms and all(t > 0 for t in row["seconds"].values())
        assert set(row["peak_mb"]) == forms
        assert row["max_logit_difference"] < 1e-4, row  # the same maths, other blocks
    assert sorted(f for r in result["rounds"] for f in r.get("first_use", ())) == sorted(forms)
    assert set(result["median_whole_over_form"]) == forms - {"whole_copies"}
    assert all(v > 0 for v in result["median_whole_over_form"].values())
    assert set(result["peak_mb"]) == forms


def test_gemv_layouts_script_measures_every_kernel_and_checks_them(tmp_path):
    """scripts/gemv_layouts.py (page size and weight layout under a GEMV, against a plain read
    of the same bytes) on one layer of Phi-2's shapes: every kernel's GB/s per round, the
    ratios the docs quote, and (asserted by the script) each kernel's output against F.linear."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gemv_layouts.py"
    out = tmp_path / "layouts.json"
    command = [sys.executable, str(script), "--layers", "1", "--rounds", "1", "--threads", "1",
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    kernels = {"sum_4k", "sum_huge", "onednn_4k", "onednn_huge", "inductor_4k", "inductor_huge",
               "inductor_blocked_huge"}  # fmt: skip
    assert set(result["rounds"][0]) == kernels and all(v > 0 for v in result["median"].values())
    assert result["weight_bytes_per_set"] == 4 * (2 * 10240 * 2560 + 4 * 2560 * 2560)
    assert set(result["median_ratios"]["huge_over_4k"]) == {"sum", "onednn", "inductor"}


def test_int8_gemv_words_script_checks_both_layouts_on_both_kernel_sets(tmp_path):
    """scripts/int8_gemv_words.py on two tiny shapes, with its AVX2 child: every kernel's time
    and GB/s and the ratios the docs quote, each output checked against the float64 product
    (the script exits non-zero on a wrong one), the child on AVX2 kernels in its own CPU
    kind's inductor directory although the parent's is in its environment (the child once
    loaded the parent's AVX-512 code and computed a wrong float32 GEMV)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from vlm_ros.engines import cpuinfo

    if "avx2" not in cpuinfo.flags():
        pytest.skip("needs an x86-64 CPU with AVX2 for the child's kernels")
    script = Path(__file__).resolve().parents[1] / "scripts" / "int8_gemv_words.py"
    out = tmp_path / "words.json"
    command = [sys.executable, str(script), "--shapes", "64x32", "48x96", "--rounds", "2",
               "--calls", "2", "--threads", "1", "--also-avx2", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    native, avx2 = result["native"], result["avx2"]
    assert avx2["capability"] == "AVX2" and result["machine"]
    assert (native["inductor_cache"] != avx2["inductor_cache"]) == (native["capability"] != "AVX2")
    for side in (native, avx2):
        assert [(r["out"], r["in"]) for r in side["shapes"]] == [(64, 32), (48, 96)]
        for row in side["shapes"]:
            assert max(row["relative_error"].values()) < 1e-5
            assert all(row[k]["ms"] > 0 for k in ("float32", "int8_bytes", "int8_words"))
            assert row["words_over_bytes"] > 0 and row["words_over_float32"] > 0


def test_full_size_phase_order_pairs_each_path_with_its_width():
    """full_size_llamacpp.py's phases: --compile and --huge-pages-ab put each extra float32
    path next to the one it is compared with; --widths keeps llama.cpp's types asked for and
    our paths of their width only."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "full_size_llamacpp.py"
    spec = importlib.util.spec_from_file_location("full_size_llamacpp", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.phase_order(False) == module.ORDER
    assert module.phase_order(True, True, ["f32"]) == (
        "ours:fp32_4k_pages", "ours:fp32", "ours:fp32_compiled", "ours:fp32_compiled_4k_pages",
        "llama:f32",
    )  # fmt: skip
    assert module.phase_order(False, True, ["f32", "q4_0"]) == (
        "ours:fp32_4k_pages", "ours:fp32", "llama:f32", "ours:int4_weight_only", "llama:q4_0",
    )  # fmt: skip
    assert module.phase_order(False, widths=["f32"], onednn_ab=True) == (
        "ours:fp32", "ours:fp32_onednn", "ours:fp32_per_shape", "llama:f32",
    )  # fmt: skip
    assert module.OURS["fp32_onednn"].cpu_linear == "onednn"
    assert module.PER_SHAPE == ("fp32_per_shape",)
    assert module.OURS["fp32_per_shape"].cpu_linear == "auto"


def test_full_size_script_rounds_repeat_every_phase(tmp_path):
    """full_size_llamacpp.py --rounds 2 on tiny, float32 only: every phase twice (the second
    round backwards, each its own files), the read measured beside each iteration, each
    pair's ratio per round and both engines' shares of the read beside their decode."""
    import subprocess
    import sys
    from pathlib import Path

    _llama_cpp_or_skip()
    script = Path(__file__).resolve().parents[1] / "scripts" / "full_size_llamacpp.py"
    out = tmp_path / "rounds.json"
    command = [sys.executable, str(script), "tiny", "--iters", "1", "--steps", "4",
               "--threads", "1", "--tmp", str(tmp_path), "--widths", "f32", "--rounds", "2",
               "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    names = ["vlm_ros fp32", "llama.cpp f32"]
    assert "2 rounds" in result["how"] and len(result["rounds"]) == 2
    for summary in result["rounds"]:
        assert sorted(summary) == sorted(names)
        for name, entry in summary.items():
            assert entry["decode_ms_per_token_p50"] > 0, name
            assert entry["decode_ms_per_token_each"] == [entry["decode_ms_per_token_p50"]]
            assert len(entry["adjacent_read_gb_s"]) == 2 and min(entry["adjacent_read_gb_s"]) > 0
            assert entry["fraction_of_adjacent_read"]["iterations"] == 1, name
    assert (
        result["paths"]["vlm_ros fp32"]["adjacent_read_gb_s"]
        == (result["rounds"][0]["vlm_ros fp32"]["adjacent_read_gb_s"])
    )
    assert result["rounds"][0] != result["rounds"][1]  # two measurements, not one copied
    pair = result["over_rounds"]["fp32 vs f32"]
    assert set(result["over_rounds"]) == {"fp32 vs f32"}
    assert len(pair["decode_ms_per_token_each_round"]) == 2
    first = result["ours_faster_by"]["fp32 vs f32"]["decode_ms_per_token"]
    assert pair["decode_ms_per_token_each_round"][0] == first
    assert set(pair["fraction_of_adjacent_read"]) == {"ours", "llama.cpp"}


def test_full_size_share_of_the_adjacent_read_counts_steady_iterations_only():
    """full_size_llamacpp.py sets each timed iteration's decode against the mean of the reads
    just before and after it, and leaves out an iteration during which the host's read moved
    (the AMD host flips between about 37 and 66 GB/s). over_rounds takes the median of the
    per-round ratios."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "full_size_llamacpp.py"
    spec = importlib.util.spec_from_file_location("full_size_llamacpp", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    step = 36_000_000_000 // 1000  # 36 GB/s at 1 ms a token
    share = module.adjacent_fraction(step, [1.0, 1.0, 0.6], [40.0, 40.0, 60.0, 60.0])
    assert share["iterations"] == 3 and share["steady_iterations"] == 2
    assert share["each"] == pytest.approx([0.9, 1.0])  # 36/40, then 60/60; 40->60 left out
    assert share["median"] == pytest.approx(0.95)
    assert module.adjacent_fraction(step, [1.0], [30.0, 60.0])["median"] is None
    assert module.phase_file("ours:fp32") == "ours-fp32"
    assert module.phase_file("llama:f32", 2) == "llama-f32-r2"

    def entry(ms, each):
        times = {"p50": ms}
        return {
            "decode_ms_per_token": times,
            "prefill_ms": times,
            "fraction_of_adjacent_read": {"each": each},
        }

    rounds = [
        {"vlm_ros fp32": entry(300.0, [0.9]), "llama.cpp f32": entry(330.0, [0.8])},
        {"vlm_ros fp32": entry(200.0, [1.0]), "llama.cpp f32": entry(180.0, [])},
        {"vlm_ros fp32": entry(250.0, [0.95]), "llama.cpp f32": entry(250.0, [0.9])},
    ]
    pair = module.over_rounds(rounds)["fp32 vs f32"]
    assert pair["decode_ms_per_token_each_round"] == pytest.approx([1.1, 0.9, 1.0])
    assert pair["decode_ms_per_token_median"] == pytest.approx(1.0)
    assert pair["fraction_of_adjacent_read"] == pytest.approx({"ours": 0.95, "llama.cpp": 0.85})


def test_stored_weight_bytes_count_quantized_weights_once():
    """The bytes a decode step reads, per path: fp32 4 bytes a Linear weight, dynamic int8 1
    (torch.ao's packed params, counted once), int4 half a byte plus a bf16 scale and zero per
    32; the embedding table as its one looked-up row."""
    import copy

    from vlm_ros.bench.measure import stored_weight_bytes
    from vlm_ros.engines import weight_int4
    from vlm_ros.infer.static_decode import quantize_int8

    lm = build_model("tiny", "cpu", F32).language_model
    linear = sum(m.weight.numel() for m in lm.modules() if type(m) is torch.nn.Linear)
    fp32 = stored_weight_bytes(lm)
    assert fp32 - stored_weight_bytes(quantize_int8(copy.deepcopy(lm))) == 3 * linear
    int4 = copy.deepcopy(lm)
    weight_int4.quantize_weights(int4)
    packed = sum(m.weight.numel() + m.scales_and_zeros.numel() * 2 for m in int4.modules()
                 if isinstance(m, weight_int4.WeightOnlyInt4Linear))  # fmt: skip
    assert linear / 2 <= packed <= linear / 2 * 1.3  # 4 bits + 32 bits per 32 (+ row padding)
    assert fp32 - stored_weight_bytes(int4) == 4 * linear - packed


def test_llamacpp_weights_are_read_into_memory_through_a_real_field():
    """ctypes takes any attribute silently (``use_mmap`` was a no-op on this llama.cpp): the
    setting must land in a field the struct has."""
    _llama_cpp_or_skip()
    from vlm_ros.bench import llamacpp

    lib = llamacpp.require_llama_cpp()
    params = lib.llama_model_default_params()
    llamacpp.read_into_memory(lib, params)
    fields = {name for name, *_ in type(params)._fields_}
    if "load_mode" in fields:
        assert params.load_mode == lib.LLAMA_LOAD_MODE_NONE
    else:
        assert "use_mmap" in fields and params.use_mmap is False
