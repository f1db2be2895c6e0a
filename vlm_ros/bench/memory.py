"""Measure the serving peak of a bench preset on the CPU and set it beside the memory plan.

Why: the plan (model/memory_plan.py) is arithmetic; this is the check that the arithmetic
bounds what really happens. In one process: build the preset's model, reset the kernel's
peak-RSS mark (/proc/self/clear_refs, Linux), then do what serving does at its largest: the
decoder set up as configured (quantized, static cache of max_seq_len allocated once), the
vision tower on one image, a prefill filling the whole cache, a few decode steps. The peak RSS
over that, minus the RSS before the model was built, is set beside the plan's ``steady``
(weights + KV cache + workspace). Run each measurement in a fresh process (``vlm-ros plan
--measure``): RSS is per process.

Not measured: the checkpoint loader's own peak (the presets are built in memory, not read from
a checkpoint) and anything on a GPU.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from vlm_ros.config import RuntimeConfig
from vlm_ros.infer.static_decode import StaticDecoder
from vlm_ros.model import boards, memory_plan
from vlm_ros.model.checkpoint import to_dtype

MiB = 1024**2


def rss_bytes() -> int:
    """Resident set size now (/proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * _page_size()


def peak_rss_bytes() -> int:
    """VmHWM: the peak RSS since the process started or since reset_peak()."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class AnonPeak:
    """The peak of RssAnon (anonymous memory: what the kernel cannot drop, unlike the
    checkpoint's memory-mapped file pages, which count in RSS too) while the block runs,
    sampled every ``period_s`` by a thread."""

    def __init__(self, period_s: float = 0.002):
        import threading

        self.period_s, self.peak = period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> AnonPeak:
        self.peak = _status_bytes("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("RssAnon"))

    def _sample(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, _status_bytes("RssAnon"))


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


def measure(preset: str, dtype: str = "float32", quantize: str = "none", max_seq_len: int = 512):
    """The measured serving peak of ``preset`` against its plan, as a dict (bytes and MiB)."""
    from vlm_ros.bench.measure import build_model

    torch.manual_seed(0)
    gc.collect()
    before = rss_bytes()
    model = build_model(preset, "cpu", to_dtype(dtype))
    arch = memory_plan.Architecture.of(model.spec, model.vision_config, model.text_config)
    runtime = RuntimeConfig(max_seq_len=max_seq_len, quantize=quantize, cpu_linear="torch")
    host = boards.Board("cpu", "this host", 1024.0, False, 0.0, 0.0)
    plan = memory_plan.make_plan(arch, runtime, dtype, host)
    with torch.inference_mode():
        decoder = StaticDecoder(
            model.language_model, max_seq_len, quantize=quantize, cpu_linear="torch"
        )  # quantized in place, the cache allocated
        gc.collect()
        ready = rss_bytes()
        reset_peak()
        size = model.vision_config.image_size
        pixels = torch.randn(1, 3, size, size, dtype=to_dtype(dtype))
        model.encode_images(pixels)
        embeds = torch.randn(1, max_seq_len - 4, model.text_config.hidden_size)
        logits = decoder.prefill(embeds.to(to_dtype(dtype)))
        for _ in range(3):
            logits = decoder.decode_one_token(logits.argmax(-1).view(1, 1))
    peak = peak_rss_bytes()
    return {
        "preset": preset, "dtype": dtype, "quantize": quantize, "max_seq_len": max_seq_len,
        # the model ready to serve: weights + cache (+ what building it left in the allocator)
        "measured_ready_mib": (ready - before) / MiB,
        "plan_weights_and_cache_mib": (plan.weights + plan.kv_cache) / MiB,
        # one request at the full context, beyond the ready model
        "measured_request_mib": (peak - ready) / MiB, "plan_workspace_mib": plan.workspace / MiB,
        # all of it
        "measured_peak_mib": (peak - before) / MiB, "plan_steady_mib": plan.steady / MiB,
        "plan_over_measured": plan.steady / (peak - before),
    }  # fmt: skip


# ---- the loader's peak, on a preset written as a LLaVA-Phi checkpoint ----------------------

# VlmModel names -> LLaVA-Phi's published names (model/layouts.py reads them back)
_LLAVA_PHI_NAMES = (("projector.", "model.mm_projector."), ("language_model.model.", "model."),
                    ("language_model.lm_head.", "lm_head."))  # fmt: skip


def write_preset_checkpoint(out: Path, preset: str, dtype: str = "bfloat16") -> Path:
    """``preset``'s random weights as a LLaVA-Phi checkpoint in ``out``: the tiny checkpoint's
    tokenizer and config, resized to the preset (its preprocessor config removed, so the
    family default at the preset's image size applies)."""
    import json

    from safetensors.torch import save_file

    from vlm_ros.bench.measure import build_model
    from vlm_ros.model.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(out, "llava_phi")
    (out / "preprocessor_config.json").unlink()
    model = build_model(preset, "cpu", to_dtype(dtype))
    tower = model.tower_prefix
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(tower):
            key = "model.vision_tower.vision_model." + key[len(tower) :]
        for ours, theirs in _LLAVA_PHI_NAMES:
            if key.startswith(ours):
                key = theirs + key[len(ours) :]
        if "rotary_emb" not in key and not key.endswith("position_ids"):
            state[key] = tensor.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    text, vision = model.text_config, model.vision_config
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    config.update({k: getattr(text, k) for k in (*shape, "vocab_size")})
    tower_fields = config["vision_config"]["vision_tower"]
    tower_fields.update({k: getattr(vision, k) for k in (*shape, "image_size", "patch_size")})
    config["vision_config"]["mm_projector"].update(
        mm_hidden_size=vision.hidden_size, hidden_size=text.hidden_size
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def measure_load(checkpoint: Path, dtype: str, quantize: str, max_seq_len: int = 512) -> dict:
    """Assistant.load of ``checkpoint`` (the product's loader: meta model, tensor-by-tensor
    fill, int8 quantized block by block): its peak RSS against the plan's load peak."""
    import numpy as np

    from vlm_ros.infer.pipeline import Assistant

    runtime = RuntimeConfig(dtype=dtype, quantize=quantize, max_seq_len=max_seq_len,
                            cpu_linear="torch", board="none")  # fmt: skip
    gc.collect()
    before, anon_before = rss_bytes(), _status_bytes("RssAnon")
    reset_peak()
    with AnonPeak() as anon:
        assistant = Assistant.load(str(checkpoint), runtime=runtime)
    loaded = peak_rss_bytes()
    model = assistant.model
    arch = memory_plan.Architecture.of(model.spec, model.vision_config, model.text_config)
    host = boards.Board("cpu", "this host", 1024.0, False, 0.0, 0.0)
    plan = memory_plan.make_plan(arch, runtime, dtype, host)
    image = np.zeros((240, 320, 3), np.uint8)
    assistant.answer(image, "Is the path ahead clear?", max_new_tokens=4)
    return {
        "checkpoint_preset": checkpoint.name, "dtype": dtype, "quantize": quantize,
        "max_seq_len": max_seq_len,
        # RSS counts the checkpoint's mapped file pages (page cache, reclaimable); the plan
        # is about anonymous memory, which is what runs a board out of memory
        "measured_load_peak_rss_mib": (loaded - before) / MiB,
        "measured_load_peak_anon_mib": (anon.peak - anon_before) / MiB,
        "plan_load_peak_mib": (plan.weights + plan.load_transient) / MiB,
        "plan_weights_and_cache_mib": (plan.weights + plan.kv_cache) / MiB,
        "measured_after_answer_mib": (peak_rss_bytes() - before) / MiB,
        "plan_steady_mib": plan.steady / MiB,
    }  # fmt: skip


MEASUREMENTS = (
    ("serving", "measure('small', 'float32', 'none', 1024)"),
    ("serving", "measure('small', 'bfloat16', 'int8_weight_only', 1024)"),
    ("load", "measure_load(CKPT, 'bfloat16', 'none')"),
    ("load", "measure_load(CKPT, 'bfloat16', 'int8_weight_only')"),
)


def measure_all(scratch: Path) -> list[dict]:
    """Every measurement of MEASUREMENTS, each in a fresh process (RSS is per process), the
    loader's on the small preset written once as a checkpoint under ``scratch``."""
    import json
    import subprocess
    import sys

    def fresh(code: str) -> dict:
        program = "\n".join([
            "import json", "from pathlib import Path", "from vlm_ros.bench.memory import *",
            f"CKPT = Path({str(scratch / 'small')!r})", f"print(json.dumps({code}))",
        ])  # fmt: skip
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                              check=True)  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])

    fresh("str(write_preset_checkpoint(CKPT, 'small'))")
    return [{"kind": kind, **fresh(code)} for kind, code in MEASUREMENTS]
