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
stated too. On x86 CPUs in float32 the fast path is also measured on the Linear kernels
``cpu_linear: auto`` did not pick (oneDNN on AMD CPUs: variant ``mkl_linear``, torch's default;
MKL on Intel's: variant ``onednn_linear``; both lossless), so the part of the speed that is
the kernel library, and the choice itself, are measured, not guessed; where the uncompiled
step runs as compiled regions (infer/regional_step.py, AMD CPUs), that step with each GEMV
compiled alone instead (variant ``per_shape_gemvs``, engines/eager_gemv.py) and, where the
regions run on the native kernels (engines/native.py), the same regions on inductor's loops
and SDPA (variant ``inductor_regions``); and
uncompiled, the same decoder and kernels with transformers' forward for each decode step
(variant ``transformers_step``), the part that is infer/phi_step.py's lean step; compiled
(``--compile``) on CPU, that lean uncompiled step beside the compiled one (variant
``uncompiled_step``), so what compiling gains is measured in the same run, and where the
compiled step's GEMVs are inductor's (AMD CPUs), the compiled step on MKL's (variant
``compiled_mkl_linear``). With ``--int8`` on a CPU also a float32 model with int8 weights
(variant ``int8_weight_only``): read in the compiled step's loops with ``--compile``, else
in the uncompiled step's compiled regions (infer/regional_step.py).

Presets are built from configs with random weights (nothing downloaded) and prompts are token
ids (no tokenizer): the work per request is what a real checkpoint does, the text is not. Answers
never stop early (no stop token), so every run decodes exactly the requested length.

Timings are ratios first: on a shared machine absolute milliseconds are noisy, ratios measured
in the same run on the same weights much less so.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPVisionConfig, PhiConfig, SiglipVisionConfig

from vlm_ros.bench import llamacpp
from vlm_ros.config import (
    CpuLinearMode,
    DTypeName,
    GenerationConfig,
    RuntimeConfig,
    VisionBackend,
)
from vlm_ros.engines import cpuinfo
from vlm_ros.engines import huge_pages as thp
from vlm_ros.engines.build import build_for_model
from vlm_ros.engines.cpu_kernels import (
    InductorGemvLinear,
    OneDnnLinear,
    onednn_linear_available,
)
from vlm_ros.infer import decode, fidelity, ranking
from vlm_ros.infer.decode import make_decoder
from vlm_ros.infer.static_decode import StaticDecoder
from vlm_ros.infer.vision import make_vision_encoder
from vlm_ros.model.checkpoint import to_dtype
from vlm_ros.model.compat import cpu_has_native
from vlm_ros.model.families import FAMILIES, IMAGE_TOKEN_INDEX
from vlm_ros.model.memory_plan import CLIP_L_336, PHI2, SIGLIP_SO400M_384
from vlm_ros.model.network import VlmModel
from vlm_ros.serving.latency import percentiles as latency_percentiles
from vlm_ros.timing import StageTimer
from vlm_ros.types import Request


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
    ),
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
    ),
    "llava-phi-full": Preset("llava_phi", CLIP_L_336, PHI2),
    "mipha-full": Preset("mipha_phi", SIGLIP_SO400M_384, PHI2),
    "tinyllava-full": Preset("tinyllava", SIGLIP_SO400M_384, PHI2),
}

ACTIONS = ("continue", "slow_down", "stop", "turn_left", "turn_right")
NEVER_STOP = -1  # no token id is -1: answers run to max_new_tokens
NO_IMAGE = np.zeros((0, 0, 3), np.uint8)  # the decode loop's Request: pixels come ready-made


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
    """p50/p90/p99 (serving.latency's, as /diagnostics and the bag report) and the mean, in ms."""
    return {**latency_percentiles(samples), "mean": statistics.fmean(samples), "n": len(samples)}


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
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[0, -new_tokens:].tolist()


class FastPath:
    """Vision stage (PyTorch, ONNX Runtime or TensorRT) + static-cache decoder + generate."""

    def __init__(
        self,
        model: VlmModel,
        ids: list[int],
        encoder,
        decoder: StaticDecoder,
        vision_export: dict | None = None,
    ):
        self.model, self.ids, self.encoder, self.decoder = model, ids, encoder, decoder
        self.vision_export = vision_export  # the ONNX export's parity check, if one ran

    def embeds(self, pixels: torch.Tensor, timer: StageTimer) -> torch.Tensor:
        pixels = pixels.to(model_dtype(self.model))  # a bf16 variant's own dtype
        image = self.encoder.encode(pixels, timer)  # [1, N, hidden]
        return decode.splice_image(
            self.ids, image, self.model.embed_tokens, self.model.num_image_tokens
        )

    def answer(
        self,
        pixels: torch.Tensor,
        new_tokens: int,
        timer: StageTimer | None = None,
        keep_logits: bool = False,
    ) -> decode.Generation:
        timer = timer or StageTimer(pixels.device)
        request = Request(NO_IMAGE, "", max_new_tokens=new_tokens, generation=GenerationConfig())
        gen = decode.generate(
            self.decoder,
            self.embeds(pixels, timer),
            request,
            stop_token_id=NEVER_STOP,
            timer=timer,
            keep_logits=keep_logits,
        )
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


def measure(
    paths: dict[str, Baseline | FastPath],
    pixels: torch.Tensor,
    iters: int,
    device: str,
    peer: llamacpp.LlamaCppPeer | None = None,
) -> dict[str, Samples]:
    """Samples per path, the paths (and the llama.cpp peer) interleaved within every
    iteration: on a shared machine the load changes over minutes, and interleaving gives every
    path the same conditions."""
    samples = {name: Samples() for name in paths}
    for _ in range(iters):
        for name, path in paths.items():
            if isinstance(path, Baseline):
                baseline_iteration(path, pixels, device, samples[name])
            else:
                fast_iteration(path, pixels, device, samples[name])
        if peer:
            peer.iteration(peer_embeds(paths, pixels))
    return samples


# ---- the llama.cpp peer and the bandwidth yardstick ----------------------------------------


def peer_embeds(paths: dict[str, Baseline | FastPath], pixels: torch.Tensor) -> np.ndarray:
    """The fast path's decoder input [S, hidden] (image features spliced in), for llama.cpp."""
    fast = paths["fast"]
    assert isinstance(fast, FastPath)
    return fast.embeds(pixels, StageTimer(pixels.device))[0].float().cpu().numpy()


def make_peer(
    work: Workload, paths: dict, options: BenchOptions, workdir: Path
) -> llamacpp.LlamaCppPeer | None:
    """The llama.cpp peer on this run's decoder (a one-line PeerUnavailable without it)."""
    if not options.llamacpp:
        return None
    context = dict(n_ctx=work.max_seq, threads=torch.get_num_threads(), max_prompt=work.prompt_len)
    return llamacpp.LlamaCppPeer(work.model.language_model, options.llamacpp, workdir, **context)


def peer_results(
    peer: llamacpp.LlamaCppPeer, work: Workload, answer: decode.Generation, paths: dict
) -> dict:
    """Per GGUF type: its stages, the bytes a decode step reads, and its accuracy against our
    float32 path (same embeddings; ``answer``: our greedy 16 tokens with their logits)."""
    first = answer.step_logits[0].float().cpu().numpy().reshape(-1)  # [V]
    embeds = peer_embeds(paths, work.pixels)
    accuracy = peer.accuracy(embeds, answer.token_ids, first)
    live_kv = live_kv_bytes(work.model, work.prompt_len + llamacpp.DECODE_STEPS // 2, 4)
    types = {}
    for kind, samples in peer.samples.items():
        types[kind] = {
            "stages": {name: percentiles(values) for name, values in samples.items()},
            "decode_bytes_per_token": {"weights": peer.bytes[kind]["weights"], "live_kv": live_kv},
            "tensor_types": peer.bytes[kind]["tensor_types"],
            "accuracy_vs_fp32": accuracy[kind],
        }
    return {
        "version": llamacpp.version(),
        "system_info": llamacpp.system_info(),
        "library": llamacpp.library_dir(),
        "kv_cache": "f32",
        "extra_buffer_types": llamacpp.extra_buffer_types(llamacpp.require_llama_cpp()),
        "threads": torch.get_num_threads(),
        "types": types,
    }


def live_kv_bytes(model: VlmModel, positions: int, element_size: int) -> int:
    """Keys and values of ``positions`` tokens over all layers: what attention must read
    (the static cache's unused slots are not counted here; decode_bytes_per_token does)."""
    cfg = model.text_config
    heads = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * positions * element_size


def stored_weight_bytes(lm: torch.nn.Module) -> int:
    """Bytes of the decoder's weights as stored (quantized ones at their packed size), the
    embedding table counted as the one row a decode step looks up."""
    embed = lm.get_input_embeddings().weight
    total = 0
    for module in lm.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if type(module).__name__ == "LinearPackedParams":  # torch.ao's packed int8 weights
            weight, bias = module._weight_bias()  # (its Linear's _weight_bias reads the same)
            tensors += [weight.int_repr(), *([bias] if bias is not None else [])]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not embed)
    return total + embed[0].numel() * embed.element_size()


def read_bandwidth(
    megabytes: int = 1024, iters: int = 10, huge_pages: bool = False
) -> dict[str, float]:
    """Streaming read bandwidth of this host, GB/s: a sum over a float32 buffer far larger
    than the caches, on torch's threads (the decode step's), best and median of ``iters``.
    ``huge_pages``: the buffer on transparent huge pages, as the static decoder places its
    weights (engines/huge_pages.py; {} where this system has none). On the AMD host measured,
    that read beat torch's own 4 KiB-page allocation by up to 28%, often by a few percent."""
    count = megabytes * 2**20 // 4
    if huge_pages and thp.unavailable() is not None:
        return {}
    buffer = thp.huge_page_empty((count,), torch.float32) if huge_pages else torch.empty(count)
    buffer.fill_(1.0)
    buffer.sum()
    times = [timed(buffer.sum, "cpu")[0] for _ in range(iters)]
    gigabytes = buffer.numel() * 4 / 1e9
    return {
        "best": gigabytes / (min(times) / 1000.0),
        "median": gigabytes / (statistics.median(times) / 1000.0),
        "megabytes": megabytes,
    }


def read_bandwidths(iters: int = 10) -> dict[str, float]:
    """The host's best read GB/s now, over 4 KiB pages and, where this system has them, over
    huge pages: {"4k_pages": .., "huge_pages": ..}."""
    out = {"4k_pages": read_bandwidth(iters=iters)["best"]}
    huge = read_bandwidth(iters=iters, huge_pages=True)
    return out | ({"huge_pages": huge["best"]} if huge else {})


def decode_bandwidth(paths: dict, measured: dict, work: Workload, options: BenchOptions) -> dict:
    """For the fast path and each variant: bytes one decode step reads (weights as stored +
    the live KV cache at the middle of a 64-token answer) over its decode time: the read
    bandwidth it reaches, and that as a share of the host's measured streaming read."""
    out: dict = {}
    if options.device == "cpu":
        bandwidth, huge = read_bandwidth(), read_bandwidth(huge_pages=True)
        # the host's best: the decoder's weights sit on huge pages where the system has them
        out["read_bandwidth_gb_s"] = max(bandwidth["best"], huge.get("best", 0.0))
        out["read_bandwidth_4k_pages_gb_s"] = bandwidth["best"]
        out["read_bandwidth_huge_pages_gb_s"] = huge.get("best")
        out["read_bandwidth_median_gb_s"] = bandwidth["median"]
        out["copy_bandwidth_gb_s"] = device_copy_bandwidth("cpu", 512, 5)
    positions = work.prompt_len + llamacpp.DECODE_STEPS // 2
    for name, path in paths.items():
        if not isinstance(path, FastPath):
            continue
        lm = path.decoder.lm
        weights = stored_weight_bytes(lm)
        kv = live_kv_bytes(work.model, positions, path.decoder.dtype.itemsize)
        ms = measured[name]["decode_per_token"]["p50"]
        entry = {"weights": weights, "live_kv": kv, "gb_s": (weights + kv) / ms / 1e6}
        if "read_bandwidth_gb_s" in out:
            entry["fraction_of_read"] = entry["gb_s"] / out["read_bandwidth_gb_s"]
        out[name] = entry
    return out


def _pages(band: dict) -> str:
    """The best read's parts where both were measured (" of 4 KiB pages 29.8 and huge pages
    34.4"), else nothing."""
    small = band.get("read_bandwidth_4k_pages_gb_s")
    huge = band.get("read_bandwidth_huge_pages_gb_s")
    if small is None:  # a result from before huge pages
        return ""
    return f" of 4 KiB pages {small:.1f}" + (f" and huge pages {huge:.1f}" if huge else "")


def _peer_bandwidth(peers: dict, read_gb_s: float) -> None:
    """Each peer type's implied read GB/s and share of the host's read bandwidth, in place."""
    for entry in peers["types"].values():
        step = entry["decode_bytes_per_token"]
        ms = entry["stages"]["decode_per_token"]["p50"]
        entry["gb_s"] = (step["weights"] + step["live_kv"]) / ms / 1e6
        entry["fraction_of_read"] = entry["gb_s"] / read_gb_s


agreement = fidelity.prefix_agreement  # share of the greedy answer matched before a difference


def logit_error(
    fast_a: FastPath,
    fast_b: FastPath,
    pixels: torch.Tensor,
    steps: int,
    threshold: fidelity.Threshold | None = None,
) -> dict:
    """Teacher-free comparison of two fast paths: prefix agreement of greedy tokens and the
    max |logit difference| / logit range on the first step (same prompt, same image). With a
    threshold, also the verdict the tests apply (infer/fidelity.py: logit error over every step
    with the same inputs), under "fidelity"."""
    a = fast_a.answer(pixels, steps, keep_logits=True)
    b = fast_b.answer(pixels, steps, keep_logits=True)
    return compare_generations(a, b, threshold)


def compare_generations(
    a: decode.Generation, b: decode.Generation, threshold: fidelity.Threshold | None = None
) -> dict:
    """logit_error's figures for two answers already made (``keep_logits``), so a caller that
    cannot hold both models at once (a full-size preset) compares one after the other."""
    first_a, first_b = a.step_logits[0], b.step_logits[0]
    spread = float(first_a.max() - first_a.min()) or 1.0
    out = {
        "greedy_prefix_agreement": agreement(a.token_ids, b.token_ids),
        "first_logits_max_abs_error": float((first_a - first_b).abs().max()),
        "first_logits_error_over_range": float((first_a - first_b).abs().max()) / spread,
        "first_token_equal": a.token_ids[:1] == b.token_ids[:1],
    }
    if threshold is not None:
        logits_a, logits_b = torch.stack(a.step_logits), torch.stack(b.step_logits)
        verdict = fidelity.compare(a.token_ids, logits_a, b.token_ids, logits_b, threshold)
        out["fidelity"] = verdict.as_dict()
    return out


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
    from torch._dynamo.utils import counters  # dynamo loads only for compiled runs

    return int(counters["inductor"]["cudagraph_skips"])


def peak_memory(device: str) -> dict[str, float]:
    """Peak host RSS (MiB, whole process) and peak GPU memory allocated by torch (MiB, since
    the model was built: weights, caches and activations of every measured path)."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    return {"peak_host_rss_mib": rss_kib / 1024.0, "peak_gpu_mib": gpu}


# ---- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    """What one bench run measures (``vlm-ros bench`` builds it from its arguments).

    dtype None: float32 on CPU, bfloat16 on CUDA. int8: also the lossy dynamic-int8 decoder
    (CPU). bf16: also the whole model in bfloat16 and with weight-only int8 Linear layers,
    against a float32 CPU run. compile_decode: torch.compile the decode step (CUDA graph on
    GPU). warmup: untimed rounds of every path first."""

    preset: str = "tiny"
    device: str = "cpu"
    dtype: DTypeName | None = None
    iters: int = 3
    vision_backend: VisionBackend = "torch"
    int8: bool = False
    compile_decode: bool = False
    warmup: int = 1
    bf16: bool = False
    int4: bool = False  # also the decoder with int4 weights (quantize="int4_weight_only")
    llamacpp: tuple[str, ...] = ()  # GGUF types of the llama.cpp peer (bench/llamacpp.py)

    def __post_init__(self) -> None:
        if self.bf16 and (self.device != "cpu" or self.dtype_name != "float32"):
            raise ValueError("the bf16 variant is measured against a float32 run on CPU")
        if self.llamacpp and (self.device != "cpu" or self.dtype_name != "float32"):
            raise ValueError("the llama.cpp peer is measured against a float32 run on CPU")
        unknown = set(self.llamacpp) - set(llamacpp.GGUF_TYPES)
        if unknown:
            raise ValueError(f"llama.cpp types {sorted(unknown)}: known {llamacpp.GGUF_TYPES}")

    @property
    def dtype_name(self) -> DTypeName:
        return self.dtype or ("float32" if self.device == "cpu" else "bfloat16")


@dataclass(frozen=True)
class Workload:
    """The model and the one request every path serves: prompt ids (with the image
    placeholder), pixels [1, 3, S, S] and the static cache's length."""

    model: VlmModel
    ids: list[int]
    pixels: torch.Tensor
    prompt_len: int
    max_seq: int


def make_workload(options: BenchOptions) -> Workload:
    dtype = to_dtype(options.dtype_name)
    model = build_model(options.preset, options.device, dtype)
    reset_peak_gpu_memory(options.device)
    ids = prompt_ids(model, PRESETS[options.preset].text_tokens)
    size = int(model.vision_config.image_size)
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    prompt_len = len(ids) - 1 + model.num_image_tokens
    return Workload(model, ids, pixels.to(options.device, dtype), prompt_len, prompt_len + 72)


def make_fast(
    model: VlmModel, ids: list[int], runtime: RuntimeConfig, export: dict | None = None
) -> FastPath:
    """A fast path on ``model``, built by the product's own factories from ``runtime`` (a
    quantized decoder works on a private copy of the decoder: quantization is in place)."""
    quantized = runtime.quantize != "none"
    lm = copy.deepcopy(model.language_model) if quantized else model.language_model
    decoder = _static(make_decoder(lm, runtime))
    if runtime.vision_backend == "torch":
        return FastPath(model, ids, make_vision_encoder(model, runtime), decoder)
    # A compiled stage is built into a temporary directory: the session/engine holds it in
    # memory once loaded, and the files (0.3-1.7 GB for the full-size towers) go at once.
    with tempfile.TemporaryDirectory(prefix="vlm_ros_bench_") as tmp:
        runtime = replace(runtime, engine_dir=tmp)
        if runtime.vision_backend == "tensorrt":  # built ahead, as build-engines does
            build_for_model(model, tmp, precision="fp16")  # one-line error without TensorRT
        encoder = make_vision_encoder(model, runtime)
        if runtime.vision_backend == "onnxruntime":
            export = _onnx_export_report(encoder)
    return FastPath(model, ids, encoder, decoder, vision_export=export)


def _onnx_export_report(encoder) -> dict:
    """The export check's sidecar (next to the ONNX file) and the providers serving it."""
    report = json.loads(Path(f"{encoder.path}.json").read_text())
    return {
        "max_rel_error_vs_torch": report["max_rel_error"],
        "precision": report["precision"],
        "tolerance": report["tolerance"],
        "ops": list(report["ops"]),
        "providers": encoder.providers,
    }


def _static(decoder: decode.Decoder) -> StaticDecoder:
    """The bench measures the static decoder (RuntimeConfig's default)."""
    assert isinstance(decoder, StaticDecoder), type(decoder)
    return decoder


def _uses_onednn(fast: FastPath) -> bool:
    return any(isinstance(m, OneDnnLinear) for m in fast.decoder.lm.modules())


def _uses_inductor_gemv(fast: FastPath) -> bool:
    return any(isinstance(m, InductorGemvLinear) for m in fast.decoder.lm.modules())


def _linear_kernels(fast: FastPath) -> str:
    """The decoder's float32 Linear kernels, as the JSON and the Markdown name them."""
    gemv = [m for m in fast.decoder.lm.modules() if isinstance(m, InductorGemvLinear)]
    if gemv:  # the compiled step's GEMVs; its other calls (prefill) on the eager kernels
        return "inductor GEMVs, prefill " + ("onednn" if gemv[0].onednn else "torch")
    library = "onednn" if _uses_onednn(fast) else "torch"
    if _uses_regions(fast):  # the uncompiled step as compiled regions
        kind = "native" if fast.decoder.regions.native else "inductor"
        return f"{kind} regions (uncompiled step), prefill {library}"
    if _uses_eager_gemvs(fast):  # the uncompiled step's GEMVs compiled per shape
        return f"inductor GEMVs (uncompiled step), prefill {library}"
    return library


def _uses_eager_gemvs(fast: FastPath) -> bool:
    plan = fast.decoder.gemvs
    return plan is not None and bool(plan.kernels)


def _uses_regions(fast: FastPath) -> bool:
    plan = fast.decoder.regions
    return plan is not None and plan.step is not None


def _other_kernels(fast: FastPath, options: BenchOptions) -> list[tuple[str, CpuLinearMode]]:
    """The variants on the float32 Linear kernels ``cpu_linear: auto`` did not pick (x86 CPU,
    float32 model, oneDNN's op present, not compiled: compiled, ``compiled_mkl_linear`` is it):
    (variant name, cpu_linear) each. Where auto took inductor's GEMVs for the uncompiled step
    (AMD), both libraries' (oneDNN's was auto's choice before)."""
    if _uses_eager_gemvs(fast) or _uses_regions(fast):
        return [("onednn_linear", "onednn")] * onednn_linear_available() + [("mkl_linear", "torch")]
    if _uses_onednn(fast):
        return [("mkl_linear", "torch")]
    if options.compile_decode or torch.device(options.device).type != "cpu":
        return []
    if model_dtype(fast.model) != torch.float32:
        return []
    return [("onednn_linear", "onednn")] if onednn_linear_available() else []


def ratio(baseline: dict, fast: dict, key: str) -> float:
    return baseline[key]["p50"] / fast[key]["p50"]


def make_paths(work: Workload, options: BenchOptions) -> dict[str, Baseline | FastPath]:
    """The baseline, the fast path, and the variants the options ask for."""
    model, ids, device = work.model, work.ids, options.device
    runtime = RuntimeConfig(
        device=device,
        vision_backend=options.vision_backend,
        max_seq_len=work.max_seq,
        compile_decode=options.compile_decode,
    )
    fast = make_fast(model, ids, runtime)
    paths: dict[str, Baseline | FastPath] = {"baseline": Baseline(model, ids), "fast": fast}
    for other in _other_kernels(fast, options):  # on other float32 kernels: the choice, measured
        kernels = RuntimeConfig(device, max_seq_len=work.max_seq, cpu_linear=other[1])
        plain = make_fast(model, ids, kernels)
        encoder = plain.encoder if options.vision_backend == "torch" else fast.encoder
        paths[other[0]] = FastPath(model, ids, encoder, plain.decoder)  # ORT: shared
    if _uses_regions(fast):  # what the regions gain over each GEMV compiled alone
        per_shape = StaticDecoder(model.language_model, work.max_seq, regional=False)
        paths["per_shape_gemvs"] = FastPath(model, ids, fast.encoder, per_shape)
        if fast.decoder.regions.native:  # and what the native kernels gain over inductor's
            inductor = StaticDecoder(
                model.language_model, work.max_seq, cpu_linear="inductor", native_kernels=False
            )  # the same regions, untimed, on inductor's loops and SDPA
            paths["inductor_regions"] = FastPath(model, ids, fast.encoder, inductor)
    if not options.compile_decode:  # the same kernels through transformers' forward per token
        reference = StaticDecoder(
            fast.decoder.lm, work.max_seq, cpu_linear="torch", fast_step=False
        )
        paths["transformers_step"] = FastPath(model, ids, fast.encoder, reference)
    elif torch.device(device).type == "cpu":  # what compiling gains over the lean step
        lean = StaticDecoder(model.language_model, work.max_seq)  # on auto's eager kernels
        paths["uncompiled_step"] = FastPath(model, ids, fast.encoder, lean)
        if _uses_inductor_gemv(fast):  # and over a compiled step on MKL's GEMVs
            mkl = StaticDecoder(model.language_model, work.max_seq, True, cpu_linear="torch")
            paths["compiled_mkl_linear"] = FastPath(model, ids, fast.encoder, mkl)
    if options.int8:  # the same encoder, a dynamic-int8 copy of the decoder
        runtime = RuntimeConfig(device, max_seq_len=work.max_seq, quantize="int8")
        int8 = _static(make_decoder(copy.deepcopy(model.language_model), runtime))
        paths["int8"] = FastPath(model, ids, fast.encoder, int8)
    if options.int8 and torch.device(device).type == "cpu" and model_dtype(model) == torch.float32:
        # float32 activations, int8 weights read in inductor's own GEMV loops: the compiled
        # step's with --compile, else the uncompiled step's compiled regions
        runtime = RuntimeConfig(
            device, max_seq_len=work.max_seq, quantize="int8_weight_only",
            compile_decode=options.compile_decode,
        )  # fmt: skip
        weight_only = _static(make_decoder(copy.deepcopy(model.language_model), runtime))
        paths["int8_weight_only"] = FastPath(model, ids, fast.encoder, weight_only)
    if options.int4:  # the same encoder, int4 weights in the model's own dtype
        runtime = RuntimeConfig(device, max_seq_len=work.max_seq, quantize="int4_weight_only")
        int4 = _static(make_decoder(copy.deepcopy(model.language_model), runtime))
        paths["int4_weight_only"] = FastPath(model, ids, fast.encoder, int4)
    if options.bf16:
        paths.update(_bf16_paths(work))
    return paths


def _bf16_paths(work: Workload) -> dict[str, Baseline | FastPath]:
    """A bf16 copy of the whole model: its own generate(), its fast path, and that path with
    weight-only int8 Linear layers (which needs half-precision activations)."""
    model_bf16 = copy.deepcopy(work.model).to(torch.bfloat16)
    runtime = RuntimeConfig("cpu", "bfloat16", max_seq_len=work.max_seq)
    weight_only = replace(runtime, quantize="int8_weight_only")
    return {
        "baseline_bf16": Baseline(model_bf16, work.ids),
        "bf16": make_fast(model_bf16, work.ids, runtime),
        "bf16_int8_weight_only": make_fast(model_bf16, work.ids, weight_only),
    }


def warm_up(
    paths: dict[str, Baseline | FastPath],
    pixels: torch.Tensor,
    rounds: int,
    peer: llamacpp.LlamaCppPeer | None = None,
) -> None:
    for _ in range(rounds):
        for path in paths.values():
            path.answer(pixels, 4)
            if isinstance(path, FastPath):
                path.rank(pixels, StageTimer(pixels.device))
        if peer:
            peer.warm_up(peer_embeds(paths, pixels))


def measure_variants(
    paths: dict[str, Baseline | FastPath], measured: dict, pixels: torch.Tensor
) -> dict[str, dict]:
    """Each variant's stages and its accuracy against the float fast path; the bf16 ones also
    against generate() in bf16."""
    fast = paths["fast"]
    assert isinstance(fast, FastPath)
    variants = {}
    for name in VARIANTS:
        variant = paths.get(name)
        if isinstance(variant, FastPath):
            variants[name] = {
                "stages": measured[name],
                "accuracy_vs_fp": logit_error(
                    fast, variant, pixels, 16, fidelity.threshold_for(VARIANT_RUNTIMES[name])
                ),
            }
            decoder = variant.decoder
            variants[name].update(decode_step_facts(decoder))
            if isinstance(decoder, StaticDecoder) and VARIANT_RUNTIMES[name].compile_decode:
                # a compiled variant's load check may refuse it too: say what was timed
                variants[name]["compiled"] = decoder.compiled
                variants[name]["compile_refused"] = decoder.compile_refused
            if name.startswith("bf16"):
                variants[name]["baseline_same_dtype"] = measured["baseline_bf16"]
                variants[name]["speedup_vs_same_dtype_baseline"] = _speedups(
                    measured["baseline_bf16"], measured[name]
                )
    return variants


VARIANTS = (
    "per_shape_gemvs",
    "inductor_regions",
    "transformers_step",
    "uncompiled_step",
    "compiled_mkl_linear",
    "mkl_linear",
    "onednn_linear",
    "int8",
    "int8_weight_only",
    "int4_weight_only",
    "bf16",
    "bf16_int8_weight_only",
)
# What each variant sets, for its fidelity threshold (infer/fidelity.py, as the tests use)
VARIANT_RUNTIMES = {
    "per_shape_gemvs": RuntimeConfig(),
    "inductor_regions": RuntimeConfig(cpu_linear="inductor", native_kernels=False),
    "transformers_step": RuntimeConfig(),
    "uncompiled_step": RuntimeConfig(),
    "compiled_mkl_linear": RuntimeConfig(cpu_linear="torch", compile_decode=True),
    "mkl_linear": RuntimeConfig(cpu_linear="torch"),
    "onednn_linear": RuntimeConfig(cpu_linear="onednn"),
    "int8": RuntimeConfig(quantize="int8"),
    "int8_weight_only": RuntimeConfig(quantize="int8_weight_only", compile_decode=True),
    "int4_weight_only": RuntimeConfig(quantize="int4_weight_only"),
    "bf16": RuntimeConfig(dtype="bfloat16"),
    "bf16_int8_weight_only": RuntimeConfig(dtype="bfloat16", quantize="int8_weight_only"),
}


def run(options: BenchOptions) -> dict:
    """Measure baseline and fast path (and the int8 / bf16 variants and the llama.cpp peer when
    asked) and return the result dict."""
    load_before = os.getloadavg()  # a shared host's load decides how much the ms mean
    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="vlm_ros_peer_") as tmp:
        work = make_workload(options)
        paths = make_paths(work, options)
        peer = make_peer(work, paths, options, Path(tmp))
        try:
            warm_up(paths, work.pixels, options.warmup, peer)
            samples = measure(paths, work.pixels, options.iters, options.device, peer)
            measured = {name: s.summary() for name, s in samples.items()}
            base, fast = paths["baseline"], paths["fast"]
            assert isinstance(base, Baseline) and isinstance(fast, FastPath)
            answer = fast.answer(work.pixels, 16, keep_logits=True)
            agreeing = agreement(base.answer(work.pixels, 16), answer.token_ids)
            variants = measure_variants(paths, measured, work.pixels)
            peers = peer_results(peer, work, answer, paths) if peer else None
        finally:
            if peer:
                peer.close()
    out = _result_header(options, work, measured, variants)
    out["decode_bandwidth"] = decode_bandwidth(paths, measured, work, options)
    out["machine"]["load_average_1min"] = {"start": load_before[0], "end": os.getloadavg()[0]}
    if peers:
        out["peers"] = {"llama.cpp": peers}
        _peer_bandwidth(peers, out["decode_bandwidth"]["read_bandwidth_gb_s"])
    out["parity"] = {"greedy_prefix_agreement_fast_vs_generate": agreeing}
    out["fast_path"] = _fast_path_facts(fast, options)
    out.update(_derived(measured["baseline"], measured["fast"], variants))
    if options.device.startswith("cuda"):
        out["gpu"] = _gpu_facts(work, measured["fast"]["decode_per_token"]["p50"], options.device)
    return out


def _result_header(options: BenchOptions, work: Workload, measured: dict, variants: dict) -> dict:
    model = work.model
    return {
        "preset": options.preset,
        "device": options.device,
        "dtype": options.dtype_name,
        "iters": options.iters,
        "vision_backend": options.vision_backend,
        "compile_decode": options.compile_decode,
        "machine": machine_facts(options.device),
        "model": {
            "parameters_total": parameter_count(model),
            "parameters_vision": parameter_count(model.vision_tower),
            "parameters_decoder": parameter_count(model.language_model),
            "image_tokens": model.num_image_tokens,
            "prompt_tokens": work.prompt_len,
        },
        "baseline": measured["baseline"],
        "fast": measured["fast"],
        "variants": variants,
        "memory": peak_memory(options.device),
    }


def decode_step_facts(decoder: object) -> dict:
    """Which uncompiled decode step a static decoder serves, and why: its compiled regions
    (regional_step.py) or the library's step, its GEMVs per shape (eager_gemv.py) or the
    library's. Every variant records it: whether a load-time timing kept the regions is what
    a variant's speed depends on most on an AMD CPU."""
    if not isinstance(decoder, StaticDecoder):
        return {}
    regions, plan = decoder.regions, decoder.gemvs
    return {
        "decode_regions": regions.summary() if regions is not None else "not asked",
        "decode_gemvs": plan.summary() if plan is not None else "library",
    }


def _fast_path_facts(fast: FastPath, options: BenchOptions) -> dict:
    facts: dict = {"cpu_linear": _linear_kernels(fast)}
    placement = fast.decoder.huge_pages  # None: not a CPU decoder
    facts["huge_pages"] = placement.summary() if placement is not None else "off"
    facts.update(decode_step_facts(fast.decoder))
    if fast.vision_export is not None:
        facts["vision_onnx"] = fast.vision_export
    if options.compile_decode:
        facts["cudagraph_skips"] = cudagraph_skips()
        facts["compiled"] = fast.decoder.compiled  # False: the load-time check refused it
        facts["compile_refused"] = fast.decoder.compile_refused
    return facts


def _derived(base: dict, fast: dict, variants: dict) -> dict:
    """Speed-ups (baseline p50 / fast p50) and the ratios the docs quote."""
    for variant in variants.values():
        variant["speedup"] = _speedups(base, variant["stages"])
    return {
        "speedup": _speedups(base, fast),
        "decode_tokens_per_s": 1000.0 / fast["decode_per_token"]["p50"],
        "action_hint_over_prefill": fast["action_hint_5"]["p50"] / fast["ttft"]["p50"],
        "action_hint_branches_over_prefill": (
            fast["action_hint_branches"]["p50"] / fast["prefill"]["p50"]
        ),
    }


def _gpu_facts(work: Workload, decode_ms: float, device: str) -> dict:
    """How close decode comes to the memory-bandwidth floor of its bytes per token."""
    bandwidth = device_copy_bandwidth(device)
    step_bytes = decode_bytes_per_token(work.model, work.max_seq)
    per_second = sum(step_bytes.values()) / (decode_ms / 1000.0) / 1e9
    return {
        "copy_bandwidth_gb_s": bandwidth,
        "decode_bytes_per_token": step_bytes,
        "decode_bandwidth_fraction": per_second / bandwidth,
    }


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
    flags = cpuinfo.flags()
    return cpuinfo.model_name(), [f for f in CPU_FLAGS if f in flags]


# Environment variables that make the CPU libraries use fewer instructions than the CPU has:
# torch's own kernels, MKL, oneDNN, FBGEMM (dynamic int8). Set together, they run an AVX-512
# host's kernels as an AVX2-only host runs them (scripts/avx2-limited-bench.sh), and a result
# must say so: its cpu_flags still name the host's.
ISA_LIMIT_VARS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                  "DNNL_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")  # fmt: skip


def isa_limits() -> dict[str, str]:
    """The ISA-limiting variables set in this process's environment, by name."""
    return {name: os.environ[name] for name in ISA_LIMIT_VARS if os.environ.get(name)}


def emit_result(result: dict, out: Path | None) -> None:
    """Print ``result`` as JSON and, with ``out``, write it there too (its folder made): the
    last step of the measuring scripts (scripts/region_profile.py, native_kernels.py,
    int8_prefill_blocks.py)."""
    text = json.dumps(result, indent=1)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


def machine_facts(device: str) -> dict:
    cpu_model, flags = _cpu_model_and_flags()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model,
        "cpu_flags": flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": cpu_has_native(torch.bfloat16),
        "threads": torch.get_num_threads(),
    }
    if limits := isa_limits():
        info["isa_limits"] = limits
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---- report ----------------------------------------------------------------------------------

ROWS = (
    ("vision", "vision encoder + projector"),
    ("prefill", "prefill (image + prompt)"),
    ("ttft", "time to first token (image in)"),
    ("decode_per_token", "decode, per token"),
    ("answer_16", "image -> 16-token answer"),
    ("answer_64", "image -> 64-token answer"),
    ("action_hint_5", "image -> action hint (5 candidates)"),
)


def _isa_limit_note(machine: dict) -> str:
    limits = machine.get("isa_limits")
    if not limits:
        return ""
    named = ", ".join(f"{k}={v}" for k, v in limits.items())
    return f"; **instructions limited by the environment** ({named}): not the host's own ISA"


def markdown(result: dict) -> str:
    """The result as a Markdown table (p50/p90/p99 ms; baseline p50 and speedup) and notes."""
    lines = [*_markdown_header(result), *_stage_rows(result), "", *_notes(result)]
    lines += _variant_lines(result)
    lines += _gpu_lines(result)
    lines += _bandwidth_lines(result)
    return "\n".join(lines) + "\n"


def _bandwidth_lines(result: dict) -> list[str]:
    """Decode of ours and of the llama.cpp peer side by side: prefill, ms/token, the read
    bandwidth each reaches (weights as stored + live KV) and, for the peer, its logits."""
    band = result.get("decode_bandwidth")
    if not band or "read_bandwidth_gb_s" not in band:
        return []
    read = band["read_bandwidth_gb_s"]
    lines = [
        "",
        f"Decode against the host's streaming read bandwidth ({read:.1f} GB/s best{_pages(band)}, "
        f"{band['read_bandwidth_median_gb_s']:.1f} median; copy {band['copy_bandwidth_gb_s']:.1f}"
        " GB/s read + write), bytes per token = weights as stored + live KV cache:",
        "",
        "| engine / precision | prefill ms | decode ms/token | MB read per token | GB/s | "
        "share of read bandwidth | vs our fp32: first-step logit error / greedy prefix |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in band.items():
        if not isinstance(entry, dict):
            continue
        stages = result["fast"] if name == "fast" else result["variants"][name]["stages"]
        accuracy = (
            "-" if name == "fast" else _accuracy_cell(result["variants"][name]["accuracy_vs_fp"])
        )
        lines.append(_bandwidth_row(f"vlm_ros {name}", stages, entry, accuracy))
    peers = result.get("peers", {}).get("llama.cpp")
    if peers:
        for kind, entry in peers["types"].items():
            step = entry["decode_bytes_per_token"]
            row = {**entry, "weights": step["weights"], "live_kv": step["live_kv"]}
            accuracy = _accuracy_cell(entry["accuracy_vs_fp32"])
            lines.append(_bandwidth_row(f"llama.cpp {kind}", entry["stages"], row, accuracy))
        layouts = ""
        if not peers.get("extra_buffer_types", True):
            layouts = "; repacked/AMX weight layouts off (llama.cpp's AMX matmul crashes here)"
        lines.append(
            f"- llama.cpp: llama-cpp-python {peers['version']}, {peers['threads']} threads, "
            f"KV cache {peers['kv_cache']}; {peers['system_info']}{layouts}"
        )
    return lines


def _accuracy_cell(accuracy: dict) -> str:
    return (
        f"{accuracy['first_logits_error_over_range']:.2%} of range "
        f"({accuracy['first_logits_max_abs_error']:.1e}) / "
        f"{accuracy['greedy_prefix_agreement']:.0%}"
    )


def _bandwidth_row(label: str, stages: dict, entry: dict, accuracy: str) -> str:
    megabytes = (entry["weights"] + entry["live_kv"]) / 1e6
    return (
        f"| {label} | {stages['prefill']['p50']:.1f} | {stages['decode_per_token']['p50']:.2f} | "
        f"{megabytes:.1f} | {entry['gb_s']:.1f} | {entry.get('fraction_of_read', 0):.0%} | "
        f"{accuracy} |"
    )


def _markdown_header(result: dict) -> list[str]:
    m = result["model"]
    kernels = result.get("fast_path", {}).get("cpu_linear", "torch")
    return [
        f"### `{result['preset']}` on {result['device']} ({result['dtype']}, "
        f"vision backend {result['vision_backend']}, decoder Linear kernels {kernels}, "
        f"{result['iters']} iterations)",
        "",
        f"{m['parameters_total'] / 1e6:.2f}M parameters ({m['parameters_vision'] / 1e6:.2f}M "
        f"vision, {m['parameters_decoder'] / 1e6:.2f}M decoder); {m['image_tokens']} image "
        f"tokens, {m['prompt_tokens']} prompt positions.",
        "",
    ]


def _stage_rows(result: dict) -> list[str]:
    base, fast = result["baseline"], result["fast"]
    lines = [
        "| stage | fast p50 ms | p90 | p99 | baseline p50 ms | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in ROWS:
        if key not in fast:
            continue
        f, b = fast[key], base.get(key)
        b50 = f"{b['p50']:.1f}" if b else "-"
        speed = f"{b['p50'] / f['p50']:.2f}x" if b else "-"
        lines.append(
            f"| {label} | {f['p50']:.1f} | {f['p90']:.1f} | {f['p99']:.1f} | {b50} | {speed} |"
        )
    return lines


def _notes(result: dict) -> list[str]:
    machine, memory = result["machine"], result["memory"]
    lines = [
        f"- decode: {result['decode_tokens_per_s']:.1f} tok/s",
        f"- action hint / time to first token: {result['action_hint_over_prefill']:.2f} "
        f"(branch pass / prefill: {result['action_hint_branches_over_prefill']:.2f})",
        f"- greedy tokens fast vs generate(): "
        f"{result['parity']['greedy_prefix_agreement_fast_vs_generate']:.0%} identical",
        f"- machine: {machine['cpu']}, {machine['threads']} threads, "
        f"torch CPU kernels {machine['torch_cpu_capability']}, native bf16: "
        f"{'yes' if machine['bf16_native'] else 'no'}" + _isa_limit_note(machine),
        f"- peak host RSS {memory['peak_host_rss_mib']:.0f} MiB, peak GPU "
        f"{memory['peak_gpu_mib']:.0f} MiB",
    ]
    load = machine.get("load_average_1min")
    if load:
        lines.append(
            f"- host load average (1 min): {load['start']:.1f} at start, {load['end']:.1f} at end"
        )
    export = result.get("fast_path", {}).get("vision_onnx")
    if export:
        lines.append(
            f"- vision ONNX export ({export.get('precision', 'fp32')}, served by "
            f"{', '.join(export.get('providers', ['CPUExecutionProvider']))}): ONNX Runtime vs "
            f"PyTorch max relative error {export['max_rel_error_vs_torch']:.1e} (tolerance "
            f"{export['tolerance']:.0e}); {len(export['ops'])} operator types, all in "
            f"TensorRT's ONNX parser list"
        )
    return lines


def _variant_lines(result: dict) -> list[str]:
    lines = []
    for name, variant in result["variants"].items():
        s, acc = variant["speedup"], variant["accuracy_vs_fp"]
        same = variant.get("speedup_vs_same_dtype_baseline")
        versus = ""
        if same:
            versus = (
                f" ({same['image_to_16_tokens']:.2f}x / {same['image_to_64_tokens']:.2f}x vs "
                "generate() in bf16)"
            )
        if variant.get("compile_refused"):
            versus += " (**its compiled step was refused at load**: it ran uncompiled)"
        lines.append(
            f"- {name}: image->16 {s['image_to_16_tokens']:.2f}x, image->64 "
            f"{s['image_to_64_tokens']:.2f}x vs baseline{versus}; greedy agreement with the fp "
            f"path {acc['greedy_prefix_agreement']:.0%}, first-step logit error "
            f"{acc['first_logits_error_over_range']:.2%} of the logit range"
            + _verdict(acc.get("fidelity"))
        )
    return lines


def _verdict(verdict: dict | None) -> str:
    if verdict is None:  # a result written before the thresholds existed
        return ""
    word = "pass" if verdict["passed"] else "FAIL"
    return (
        f"; threshold {verdict['max_logit_error']:.0e} (logit error over the agreeing steps "
        f"{verdict['logit_error_over_range']:.2%}): {word}"
    )


def _gpu_lines(result: dict) -> list[str]:
    lines = []
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
    refused = result.get("fast_path", {}).get("compile_refused")
    if refused:
        lines.append(f"- **the compiled decode step was refused at load** ({refused}): "
                     "the fast path decoded uncompiled")  # fmt: skip
    return lines
