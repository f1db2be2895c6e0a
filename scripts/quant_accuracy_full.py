"""The lossy decoders' accuracy against float32 on a full-size preset (issue 17: "greedy
agreement and logit error against fp32 ... on the full-size presets"), within 24 GB.

The bench holds every variant beside the float32 model, which a 3B-parameter preset cannot do
here (11 GB of float32 decoder, and quantizing works on a copy). This script keeps one model at
a time instead: the float32 answer (16 greedy tokens with their logits) is made first, then
each variant rebuilds the same seeded random weights (float32 rebuilt is the control: it must
match exactly), quantizes them in place through the
product's own factory (make_decoder) and answers the same request; the figures are the bench's
(measure.compare_generations), with the tests' fidelity threshold for the setting.

Random weights give near-flat logits, which exaggerate quantization noise: a flipped near-tie
changes the greedy tokens without meaning much. No speed is claimed here (one request each).

    .venv/bin/python scripts/quant_accuracy_full.py llava-phi-full \\
        --out bench/results/cpu-llava-phi-full-quant-accuracy.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch

from vlm_ros.bench import measure
from vlm_ros.config import RuntimeConfig
from vlm_ros.infer import fidelity
from vlm_ros.infer.decode import make_decoder
from vlm_ros.infer.static_decode import StaticDecoder
from vlm_ros.infer.vision import make_vision_encoder

STEPS = 16
VARIANTS = {  # name -> the setting, as the bench names them (dtype None: float32)
    "fp32": RuntimeConfig(),
    "int8": RuntimeConfig(quantize="int8"),
    "int4_weight_only": RuntimeConfig(quantize="int4_weight_only"),
    "bf16": RuntimeConfig(dtype="bfloat16"),
    "bf16_int8_weight_only": RuntimeConfig(dtype="bfloat16", quantize="int8_weight_only"),
}


def answer(preset: str, runtime: RuntimeConfig):
    """The bench's workload (measure.make_workload: seeded model, prompt, pixels) in
    ``runtime``'s dtype, with its decoder quantized in place (no second copy), answering the
    bench's request; the model is dropped after."""
    work = measure.make_workload(measure.BenchOptions(preset, "cpu", runtime.dtype or "float32"))
    runtime = replace(runtime, max_seq_len=work.prompt_len + STEPS + 8)
    decoder = make_decoder(work.model.language_model, runtime)
    assert isinstance(decoder, StaticDecoder), type(decoder)  # the default decoder: static
    fast = measure.FastPath(work.model, work.ids, make_vision_encoder(work.model, runtime), decoder)
    start = time.perf_counter()
    gen = fast.answer(work.pixels, STEPS, keep_logits=True)
    seconds = time.perf_counter() - start
    prompt_len = work.prompt_len
    del fast, decoder, work
    gc.collect()
    return gen, seconds, prompt_len


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("preset", nargs="?", default="llava-phi-full")
    parser.add_argument("--threads", type=int, default=2)
    # fp32 again first: the control (rebuilt from the same seed, it must match exactly)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    results: dict = {}
    with torch.inference_mode():
        reference, seconds, prompt_len = answer(args.preset, VARIANTS["fp32"])
        results["fp32"] = {"seconds_for_the_answer": seconds}
        print(f"fp32: {seconds:.0f} s", flush=True)
        for name in args.variants.split(","):
            runtime = VARIANTS[name]
            gen, seconds, _ = answer(args.preset, runtime)
            figures = measure.compare_generations(reference, gen, fidelity.threshold_for(runtime))
            results[name] = figures | {"seconds_for_the_answer": seconds}
            print(f"{name}: {json.dumps(figures)}", flush=True)
    out = {
        "preset": args.preset,
        "prompt_positions": prompt_len,
        "greedy_steps": STEPS,
        "variants": results,
        "peak_host_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": measure.machine_facts("cpu")
        | {"load_average_1min": {"start": load_start, "end": os.getloadavg()[0]}},
        "note": "random weights: near-flat logits exaggerate quantization noise",
    }
    text = json.dumps(out, indent=2) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
