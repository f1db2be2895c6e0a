"""Benchmark: the fast path against the baseline a user would otherwise pick, in one process, on
the same random weights.

Baseline: the PyTorch vision tower (``VlmModel.encode_images``: every layer, all hidden states)
then transformers' ``generate()`` with its default DynamicCache. Fast path: the vision stage
(only the layers needed; PyTorch, ONNX Runtime, or TensorRT with an engine built for the run)
then the static-KV-cache decoder and the small decode verbs (decode.generate). Optional lossy
variants, each reported with its measured greedy agreement and logit error against the fp32
fast path: dynamic int8 decoder (``quantize="int8"``), the whole model in bfloat16 on CPU
(fast on CPUs with AVX512-BF16/AMX, emulated and slow without; ``machine.bf16_native`` says
which) and that bf16 model with weight-only int8 Linear layers (``int8_weight_only``), the
latter two also against a bf16 baseline so their gain over a user who simply loads bf16 is
stated too. Where the fast path's decoder runs its float32 Linear layers through oneDNN
(x86 CPUs), the same path on torch's default kernels is measured too (variant ``mkl_linear``,
lossless), so the part of the speed-up that is the kernel library is stated, not guessed.

Presets are built from configs with random weights (nothing downloaded) and prompts are token
ids (no tokenizer): the work per request is what a real checkpoint does, the text is not. Answers
never stop early (no stop token), so every run decodes exactly the requested length.

Timings are ratios first: on a shared machine absolute milliseconds are noisy, ratios measured
in the same run on the same weights much less so.
"""

from __future__ import annotations

import copy
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import CLIPVisionConfig, PhiConfig, SiglipVisionConfig

from vlm_ros.config import GenerationConfig, RuntimeConfig
from vlm_ros.engines.cpu_kernels import OneDnnLinear
from vlm_ros.infer import decode, ranking
from vlm_ros.infer.static_decode import StaticDecoder
from vlm_ros.infer.vision import TorchVisionEncoder
from vlm_ros.model.compat import cpu_has_native
from vlm_ros.model.families import FAMILIES, IMAGE_TOKEN_INDEX
from vlm_ros.model.memory_plan import CLIP_L_336, PHI2, SIGLIP_SO400M_384
from vlm_ros.model.network import VlmModel
from vlm_ros.timing import StageTimer


@dataclass(frozen=True)
class Preset:
    """A model shape. ``family`` picks the FamilySpec (token dropping, select layer)."""

    family: str
    vision: dict
    text: dict
    text_tokens: int = 48  # prompt text around the image (the template + a short question)


PRESETS: dict[str, Preset] = {
    # CI: seconds on one core.
    "tiny": Preset(
        "llava_phi",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
        ),
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            partial_rotary_factor=0.4,
            max_position_embeddings=512,
        ),
        text_tokens=16,
    ),  # fmt: skip
    # ~260M parameters: a CLIP-B/14-224-like tower (86M, 256 image tokens) and a shrunken Phi
    # (hidden 800 = 10 heads of Phi-2's 80, 12 layers, Phi-2's vocabulary: 174M).
    # Compute-bound prefill, memory-bound decode on a CPU, like the full model on a board.
    "small": Preset(
        "llava_phi",
        dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=14,
            hidden_act="quick_gelu",
        ),
        dict(
            vocab_size=51200,
            hidden_size=800,
            intermediate_size=3200,
            num_hidden_layers=12,
            num_attention_heads=10,
            partial_rotary_factor=0.4,
            max_position_embeddings=2048,
        ),
    ),  # fmt: skip
    "llava-phi-full": Preset("llava_phi", CLIP_L_336, PHI2),
    "mipha-full": Preset("mipha_phi", SIGLIP_SO400M_384, PHI2),
    "tinyllava-full": Preset("tinyllava", SIGLIP_SO400M_384, PHI2),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ACTIONS = ("continue", "slow_down", "stop", "turn_left", "turn_right")
NEVER_STOP = -1  # no token id is -1: answers run to max_new_tokens


def build_model(name: str, device: str, dtype: torch.dtype, seed: int = 0) -> VlmModel:
    """The preset's VlmModel with seeded random weights, in eval mode on device/dtype."""
    preset = PRESETS[name]
    spec = FAMILIES[preset.family]
    vision_cls = CLIPVisionConfig if spec.vision_kind == "clip" else SiglipVisionConfig
    torch.manual_seed(seed)
    with torch.device(device):
        model = VlmModel(spec, vision_cls(**preset.vision), PhiConfig(**preset.text))
    return model.to(dtype).eval()


def prompt_ids(model: VlmModel, text_tokens: int, seed: int = 0) -> list[int]:
    """Seeded random text ids with one image placeholder after the first quarter (like the
    template: system text, image, question)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = min(int(model.text_config.vocab_size), 50000)
    ids = torch.randint(0, vocab, (text_tokens,), generator=generator).tolist()
    at = text_tokens // 4
    return ids[:at] + [IMAGE_TOKEN_INDEX] + ids[at:]


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_dtype(model: VlmModel) -> torch.dtype:
    """The dtype the model's weights are in (the pixels it wants)."""
    return next(model.parameters()).dtype


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    """(milliseconds, result) of one call, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1000.0, result


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99 (nearest-rank on the sorted samples) and the mean, in ms."""
    ordered = sorted(samples)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99),
            "mean": statistics.fmean(ordered), "n": len(ordered)}  # fmt: skip


# ---- the two paths ------------------------------------------------------------------------


class Baseline:
    """PyTorch vision tower + transformers generate() with its default DynamicCache."""

    def __init__(self, model: VlmModel, ids: list[int]):
        self.model, self.ids = model, ids

    def embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        image = self.model.encode_images(pixels.to(model_dtype(self.model)))
        return decode.splice_image(
            self.ids, image, self.model.embed_tokens, self.model.num_image_tokens
        )  # [1, S, hidden]

    def answer(self, pixels: torch.Tensor, new_tokens: int) -> list[int]:
        embeds = self.embeds(pixels)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        out = self.model.language_model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        return out[0, -new_tokens:].tolist()


class FastPath:
    """Vision stage (PyTorch, ONNX Runtime or TensorRT) + static-cache decoder + generate."""

    def __init__(self, model: VlmModel, ids: list[int], encoder, decoder: StaticDecoder,
                 vision_export: dict | None = None):  # fmt: skip
        self.model, self.ids, self.encoder, self.decoder = model, ids, encoder, decoder
        self.vision_export = vision_export  # the ONNX export's parity check, if one ran

    def embeds(self, pixels: torch.Tensor, timer: StageTimer) -> torch.Tensor:
        pixels = pixels.to(model_dtype(self.model))  # a bf16 variant's own dtype
        image = self.encoder.encode(pixels, timer)  # [1, N, hidden]
        return decode.splice_image(
            self.ids, image, self.model.embed_tokens, self.model.num_image_tokens
        )

    def answer(self, pixels: torch.Tensor, new_tokens: int, timer: StageTimer | None = None,
               keep_logits: bool = False) -> decode.Generation:  # fmt: skip
        timer = timer or StageTimer(pixels.device)
        gen = decode.generate(
            self.decoder, self.embeds(pixels, timer), config=GenerationConfig(),
            max_new_tokens=new_tokens, stop_token_id=NEVER_STOP, timer=timer,
            keep_logits=keep_logits,
        )  # fmt: skip
        self.decoder.reset()
        return gen

    def rank(self, pixels: torch.Tensor, timer: StageTimer) -> torch.Tensor:
        """Action hint over 5 candidates of 2-4 tokens each -> [5] log-likelihoods."""
        vocab = min(int(self.model.text_config.vocab_size), 50000)
        cands = [[(97 * i + 13 * j) % vocab for j in range(2 + i % 3)] for i in range(5)]
        totals = ranking.score_candidates(self.decoder, self.embeds(pixels, timer), cands, 0, timer)
        self.decoder.reset()
        return totals


# ---- measurement ----------------------------------------------------------------------------


@dataclass
class Samples:
    """Per-iteration milliseconds by metric name."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, ms: float) -> None:
        self.values.setdefault(name, []).append(ms)

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: percentiles(v) for name, v in self.values.items()}


def baseline_iteration(base: Baseline, pixels: torch.Tensor, device: str, s: Samples) -> None:
    pixels = pixels.to(model_dtype(base.model))
    s.add("vision", timed(lambda: base.model.encode_images(pixels), device)[0])
    s.add("ttft", timed(lambda: base.answer(pixels, 1), device)[0])
    s.add("answer_16", timed(lambda: base.answer(pixels, 16), device)[0])
    s.add("answer_64", timed(lambda: base.answer(pixels, 64), device)[0])


def fast_iteration(fast: FastPath, pixels: torch.Tensor, device: str, s: Samples) -> None:
    timer = StageTimer(device)
    s.add("ttft", timed(lambda: fast.answer(pixels, 1, timer), device)[0])
    ms = timer.milliseconds()
    s.add("vision", ms["vision"] + ms.get("projector", 0.0))  # as the baseline's encode_images
    s.add("prefill", ms["prefill"])
    s.add("answer_16", timed(lambda: fast.answer(pixels, 16), device)[0])
    timer = StageTimer(device)
    s.add("answer_64", timed(lambda: fast.answer(pixels, 64, timer), device)[0])
    s.add("decode_per_token", timer.milliseconds()["decode"] / 63)
    timer = StageTimer(device)
    s.add("action_hint_5", timed(lambda: fast.rank(pixels, timer), device)[0])
    s.add("action_hint_prefill", timer.milliseconds()["prefill"])
    s.add("action_hint_branches", timer.milliseconds()["decode"])


def measure(paths: dict[str, Baseline | FastPath], pixels: torch.Tensor, iters: int,
            device: str) -> dict[str, Samples]:  # fmt: skip
    """Samples per path, the paths interleaved within every iteration: on a shared machine the
    load changes over minutes, and interleaving gives every path the same conditions."""
    samples = {name: Samples() for name in paths}
    for _ in range(iters):
        for name, path in paths.items():
            if isinstance(path, Baseline):
                baseline_iteration(path, pixels, device, samples[name])
            else:
                fast_iteration(path, pixels, device, samples[name])
    return samples


def agreement(reference: list[int], other: list[int]) -> float:
    """Fraction of the greedy answer that matches until the first difference (prefix match)."""
    same = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


def logit_error(fast_a: FastPath, fast_b: FastPath, pixels: torch.Tensor, steps: int) -> dict:
    """Teacher-free comparison of two fast paths: prefix agreement of greedy tokens and the
    max |logit difference| / logit range on the first step (same prompt, same image)."""
    a = fast_a.answer(pixels, steps, keep_logits=True)
    b = fast_b.answer(pixels, steps, keep_logits=True)
    first_a, first_b = a.step_logits[0], b.step_logits[0]
    spread = float(first_a.max() - first_a.min()) or 1.0
    return {
        "greedy_prefix_agreement": agreement(a.token_ids, b.token_ids),
        "first_logits_max_abs_error": float((first_a - first_b).abs().max()),
        "first_logits_error_over_range": float((first_a - first_b).abs().max()) / spread,
        "first_token_equal": a.token_ids[:1] == b.token_ids[:1],
    }


def device_copy_bandwidth(device: str, megabytes: int = 1024, iters: int = 10) -> float:
    """GB/s of a device-to-device copy (read + write counted), the decode floor's yardstick."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms, _ = timed(lambda: [dst.copy_(src) for _ in range(iters)], device)
    return 2 * src.numel() * iters / (ms / 1000.0) / 1e9


def decode_bytes_per_token(model: VlmModel, max_seq: int) -> dict[str, int]:
    """Bytes one decode step must read from memory: every decoder weight but the embedding
    table (one row of it), and the static KV cache, whose attention reads all ``max_seq``
    slots (masked ones included). The floor decode_bandwidth_fraction is measured against."""
    lm = model.language_model
    embed = lm.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    weights += embed[0].numel() * embed.element_size() - embed.numel() * embed.element_size()
    cfg = model.text_config
    heads = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * heads * max_seq * head_dim * embed.element_size()
    return {"weights": int(weights), "kv_cache": int(kv)}


def reset_peak_gpu_memory(device: str) -> None:
    """Forget the GPU peak so far: the random-weight model is built in float32 and then cast,
    a peak no real load (straight into bf16) has."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def cudagraph_skips() -> int:
    """How often inductor declined a CUDA graph (it only logs a warning and runs slower)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def peak_memory(device: str) -> dict[str, float]:
    """Peak host RSS (MiB, whole process) and peak GPU memory allocated by torch (MiB, since
    the model was built: weights, caches and activations of every measured path)."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    return {"peak_host_rss_mib": rss_kib / 1024.0, "peak_gpu_mib": gpu}


# ---- the run ---------------------------------------------------------------------------------


def make_fast(model: VlmModel, ids, device: str, max_seq: int, vision_backend: str,
              quantize: str = "none", compile_decode: bool = False,
              cpu_linear: str = "auto") -> FastPath:  # fmt: skip
    """A fast path on ``model`` (int8 quantizes a private copy of the decoder)."""
    lm = copy.deepcopy(model.language_model) if quantize != "none" else model.language_model
    decoder = StaticDecoder(
        lm, max_seq, compile=compile_decode, quantize=quantize, cpu_linear=cpu_linear
    )
    export = None
    if vision_backend == "onnxruntime":
        import json
        import tempfile
        from pathlib import Path

        from vlm_ros.engines.ort_backend import make_encoder

        # The product's encoder (providers read back, fp16 under a GPU provider, the serving
        # session checked there). The session holds the graph in memory once created, so the
        # file (0.3-1.7 GB for the full-size towers) goes with the directory.
        with tempfile.TemporaryDirectory(prefix="vlm_ros_bench_") as tmp:
            encoder = make_encoder(model, RuntimeConfig(device=device, engine_dir=tmp))
            report = json.loads(Path(f"{encoder.path}.json").read_text())  # export's sidecar
        export = {"max_rel_error_vs_torch": report["max_rel_error"],
                  "precision": report["precision"],
                  "tolerance": report["tolerance"], "ops": list(report["ops"]),
                  "providers": encoder.providers}  # fmt: skip
    elif vision_backend == "tensorrt":
        encoder = tensorrt_encoder(model, device)
    else:  # the node's default backend, Linear kernels chosen as the decoder's
        encoder = TorchVisionEncoder(model, RuntimeConfig(cpu_linear=cpu_linear))
    return FastPath(model, ids, encoder, decoder, vision_export=export)


def tensorrt_encoder(model: VlmModel, device: str):
    """The product's TensorRT vision encoder, its fp16 engine built for this run with
    ``build-engines``' own code (TensorRTUnavailable, a one-line error, without TensorRT/CUDA).
    The engine is deserialized into memory, so its directory goes at once."""
    import tempfile

    from vlm_ros.engines.build import build_for_model
    from vlm_ros.engines.trt_engine import make_encoder, require_cuda, require_tensorrt

    require_tensorrt()
    require_cuda()
    with tempfile.TemporaryDirectory(prefix="vlm_ros_bench_trt_") as tmp:
        build_for_model(model, tmp, precision="fp16")
        return make_encoder(model, RuntimeConfig(device=device, engine_dir=tmp))


def _uses_onednn(fast: FastPath) -> bool:
    return any(isinstance(m, OneDnnLinear) for m in fast.decoder.lm.modules())


def ratio(baseline: dict, fast: dict, key: str) -> float:
    return baseline[key]["p50"] / fast[key]["p50"]


def run(preset: str, device: str = "cpu", dtype: str | None = None, iters: int = 3,
        vision_backend: str = "torch", int8: bool = False, compile_decode: bool = False,
        warmup: int = 1, bf16: bool = False) -> dict:  # fmt: skip
    """Measure baseline and fast path (and the int8 / bf16 variants when asked) and return the
    result dict."""
    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    if bf16 and (device != "cpu" or dtype != "float32"):
        raise ValueError("the bf16 variant is measured against a float32 run on CPU")
    with torch.inference_mode():
        model = build_model(preset, device, DTYPES[dtype])
        reset_peak_gpu_memory(device)
        ids = prompt_ids(model, PRESETS[preset].text_tokens)
        size = int(model.vision_config.image_size)
        pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        pixels = pixels.to(device, DTYPES[dtype])  # [1, 3, S, S]
        prompt_len = len(ids) - 1 + model.num_image_tokens
        max_seq = prompt_len + 64 + 8
        base = Baseline(model, ids)
        fast = make_fast(model, ids, device, max_seq, vision_backend, "none", compile_decode)
        paths: dict[str, Baseline | FastPath] = {"baseline": base, "fast": fast}
        if _uses_onednn(fast):  # the same fast path on torch's default kernels: the attribution
            plain = make_fast(model, ids, device, max_seq, "torch", cpu_linear="torch")
            encoder = plain.encoder if vision_backend == "torch" else fast.encoder  # ORT: shared
            paths["mkl_linear"] = FastPath(model, ids, encoder, plain.decoder)
        if int8:
            lm = copy.deepcopy(model.language_model)  # quantized in place: a private copy
            int8_decoder = StaticDecoder(lm, max_seq, quantize="int8")
            paths["int8"] = FastPath(model, ids, fast.encoder, int8_decoder)
        if bf16:  # a bf16 copy of the whole model: its fast path and its own generate()
            model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
            paths["baseline_bf16"] = Baseline(model_bf16, ids)
            paths["bf16"] = make_fast(model_bf16, ids, device, max_seq, "torch")
            # weight-only int8 needs half-precision activations: measured on the bf16 copy
            paths["bf16_int8_weight_only"] = make_fast(
                model_bf16, ids, device, max_seq, "torch", quantize="int8_weight_only"
            )
        for _ in range(warmup):
            for path in paths.values():
                path.answer(pixels, 4)
                if isinstance(path, FastPath):
                    path.rank(pixels, StageTimer(device))
        measured = {name: s.summary() for name, s in measure(paths, pixels, iters, device).items()}
        result_base, result_fast = measured["baseline"], measured["fast"]
        parity = {
            "greedy_prefix_agreement_fast_vs_generate": agreement(
                base.answer(pixels, 16), fast.answer(pixels, 16).token_ids
            )
        }
        variants = {}
        for name in ("mkl_linear", "int8", "bf16", "bf16_int8_weight_only"):
            variant = paths.get(name)
            if isinstance(variant, FastPath):
                variants[name] = {
                    "stages": measured[name],
                    "accuracy_vs_fp": logit_error(fast, variant, pixels, 16),
                }
        if bf16:
            for name in ("bf16", "bf16_int8_weight_only"):
                variants[name]["baseline_same_dtype"] = measured["baseline_bf16"]
                variants[name]["speedup_vs_same_dtype_baseline"] = _speedups(
                    measured["baseline_bf16"], measured[name]
                )
    out = {
        "preset": preset, "device": device, "dtype": dtype, "iters": iters,
        "vision_backend": vision_backend, "compile_decode": compile_decode,
        "machine": _machine(device),
        "model": {
            "parameters_total": parameter_count(model),
            "parameters_vision": parameter_count(model.vision_tower),
            "parameters_decoder": parameter_count(model.language_model),
            "image_tokens": model.num_image_tokens, "prompt_tokens": prompt_len,
        },
        "baseline": result_base, "fast": result_fast, "parity": parity, "variants": variants,
        "memory": peak_memory(device),
    }  # fmt: skip
    out["fast_path"] = {"cpu_linear": "onednn" if _uses_onednn(fast) else "torch"}
    if fast.vision_export is not None:
        out["fast_path"]["vision_onnx"] = fast.vision_export
    out["speedup"] = _speedups(result_base, result_fast)
    for variant in variants.values():
        variant["speedup"] = _speedups(result_base, variant["stages"])
    fast_decode = result_fast["decode_per_token"]["p50"]
    out["decode_tokens_per_s"] = 1000.0 / fast_decode
    out["action_hint_over_prefill"] = (
        result_fast["action_hint_5"]["p50"] / (result_fast["ttft"]["p50"])
    )
    out["action_hint_branches_over_prefill"] = (
        result_fast["action_hint_branches"]["p50"] / result_fast["prefill"]["p50"]
    )
    if compile_decode:
        out["fast_path"]["cudagraph_skips"] = cudagraph_skips()
    if device.startswith("cuda"):
        bandwidth = device_copy_bandwidth(device)
        step_bytes = decode_bytes_per_token(model, max_seq)
        bytes_per_token = sum(step_bytes.values())
        out["gpu"] = {
            "copy_bandwidth_gb_s": bandwidth,
            "decode_bytes_per_token": step_bytes,
            "decode_bandwidth_fraction": bytes_per_token / (fast_decode / 1000.0) / 1e9 / bandwidth,
        }
    return out


def _speedups(base: dict, fast: dict) -> dict[str, float]:
    return {
        "image_to_16_tokens": ratio(base, fast, "answer_16"),
        "image_to_64_tokens": ratio(base, fast, "answer_64"),
        "ttft": ratio(base, fast, "ttft"),
        "vision": ratio(base, fast, "vision"),
    }


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
             "amx_int8", "asimd", "bf16", "i8mm")  # fmt: skip


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    """/proc/cpuinfo's model name and the ISA flags that decide which CPU kernels are fast
    (the same bench differs 2-3x between an AVX2 and an AVX-512 host)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return model, [f for f in CPU_FLAGS if f in flags]


def _machine(device: str) -> dict:
    cpu_model, flags = _cpu_model_and_flags()
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_model, "cpu_flags": flags,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_native": cpu_has_native(torch.bfloat16),
            "threads": torch.get_num_threads()}  # fmt: skip
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---- report ----------------------------------------------------------------------------------

ROWS = (
    ("vision", "vision encoder + projector"), ("prefill", "prefill (image + prompt)"),
    ("ttft", "time to first token (image in)"), ("decode_per_token", "decode, per token"),
    ("answer_16", "image -> 16-token answer"), ("answer_64", "image -> 64-token answer"),
    ("action_hint_5", "image -> action hint (5 candidates)"),
)  # fmt: skip


def markdown(result: dict) -> str:
    """The result as a Markdown table (p50/p90/p99 ms; baseline p50 and speedup)."""
    base, fast = result["baseline"], result["fast"]
    m = result["model"]
    lines = [
        f"### `{result['preset']}` on {result['device']} ({result['dtype']}, "
        f"vision backend {result['vision_backend']}, decoder Linear kernels "
        f"{result.get('fast_path', {}).get('cpu_linear', 'torch')}, {result['iters']} "
        "iterations)",
        "",
        f"{m['parameters_total'] / 1e6:.2f}M parameters ({m['parameters_vision'] / 1e6:.2f}M "
        f"vision, {m['parameters_decoder'] / 1e6:.2f}M decoder); {m['image_tokens']} image "
        f"tokens, {m['prompt_tokens']} prompt positions.",
        "",
        "| stage | fast p50 ms | p90 | p99 | baseline p50 ms | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in ROWS:
        if key not in fast:
            continue
        f = fast[key]
        b = base.get(key)
        b50 = f"{b['p50']:.1f}" if b else "-"
        speed = f"{b['p50'] / f['p50']:.2f}x" if b else "-"
        lines.append(
            f"| {label} | {f['p50']:.1f} | {f['p90']:.1f} | {f['p99']:.1f} | {b50} | {speed} |"
        )
    lines += [
        "",
        f"- decode: {result['decode_tokens_per_s']:.1f} tok/s",
        f"- action hint / time to first token: {result['action_hint_over_prefill']:.2f} "
        f"(branch pass / prefill: {result['action_hint_branches_over_prefill']:.2f})",
        f"- greedy tokens fast vs generate(): "
        f"{result['parity']['greedy_prefix_agreement_fast_vs_generate']:.0%} identical",
        f"- machine: {result['machine']['cpu']}, {result['machine']['threads']} threads, "
        f"torch CPU kernels {result['machine']['torch_cpu_capability']}, native bf16: "
        f"{'yes' if result['machine']['bf16_native'] else 'no'}",
        f"- peak host RSS {result['memory']['peak_host_rss_mib']:.0f} MiB, peak GPU "
        f"{result['memory']['peak_gpu_mib']:.0f} MiB",
    ]
    export = result.get("fast_path", {}).get("vision_onnx")
    if export:
        lines.append(
            f"- vision ONNX export ({export.get('precision', 'fp32')}, served by "
            f"{', '.join(export.get('providers', ['CPUExecutionProvider']))}): ONNX Runtime vs "
            f"PyTorch max relative error {export['max_rel_error_vs_torch']:.1e} (tolerance "
            f"{export['tolerance']:.0e}); {len(export['ops'])} operator types, all in "
            f"TensorRT's ONNX parser list"
        )
    for name, variant in result["variants"].items():
        s, acc = variant["speedup"], variant["accuracy_vs_fp"]
        same = variant.get("speedup_vs_same_dtype_baseline")
        versus = (f" ({same['image_to_16_tokens']:.2f}x / {same['image_to_64_tokens']:.2f}x vs "
                  "generate() in bf16)" if same else "")  # fmt: skip
        lines.append(
            f"- {name}: image->16 {s['image_to_16_tokens']:.2f}x, image->64 "
            f"{s['image_to_64_tokens']:.2f}x vs baseline{versus}; greedy agreement with the fp "
            f"path {acc['greedy_prefix_agreement']:.0%}, first-step logit error "
            f"{acc['first_logits_error_over_range']:.2%} of the logit range"
        )
    if "gpu" in result:
        g = result["gpu"]
        step = g["decode_bytes_per_token"]
        lines.append(
            f"- GPU copy bandwidth {g['copy_bandwidth_gb_s']:.0f} GB/s; decode reads "
            f"{step['weights'] / 1e9:.2f} GB of weights + {step['kv_cache'] / 1e9:.2f} GB of "
            f"KV cache per token and reaches {g['decode_bandwidth_fraction']:.0%} of that floor"
        )
    skips = result.get("fast_path", {}).get("cudagraph_skips")
    if skips:
        lines.append(f"- **inductor declined a CUDA graph {skips} time(s)**: decode ran without")
    return "\n".join(lines) + "\n"
