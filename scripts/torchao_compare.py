"""Our low-bit decoders against torchao's on the same decoder (issue 17: "use torchao where it
serves better than the hand-written weight_int8.py"): the decode step's ms/token and the
first-step logit error against the float32 decoder, interleaved rounds, one process.

torchao is not a dependency of vlm_ros; install it beside the project for this script only
(it is pure Python for these configs, plus an optional C++ extension built per torch version):

    .venv/bin/python -m pip install --no-deps --target /tmp/tao torchao==0.18.0
    PYTHONPATH=/tmp/tao .venv/bin/python scripts/torchao_compare.py small \\
        --out bench/results/cpu-small-torchao.json

Paths (a bfloat16 model unless named; weight-only int8 needs a half-precision model):
- ours int8_weight_only (engines/weight_int8.py: ATen's ``_weight_int8pack_mm``),
- torchao ``Int8WeightOnlyConfig`` (per-row int8, eager: what its linear runs on CPU),
- ours int4_weight_only (engines/weight_int4.py: ``_weight_int4pack_mm_for_cpu``, groups of 32),
- torchao ``PrototypeInt4WeightOnlyConfig(group_size=32)`` (its CPU int4 path),
- torchao ``Int8DynamicActivationInt4WeightConfig(group_size=32)`` (8-bit activations with
  4-bit weights, llama.cpp q4_0's arithmetic) where its C++ kernel loads with this torch.
A path torchao cannot run here is written with its error, not dropped.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vlm_ros.bench.measure import build_model, machine_facts
from vlm_ros.infer.static_decode import StaticDecoder

PROMPT = {"small": 304, "tiny": 24}


def step_ms(decoder: StaticDecoder, embeds: torch.Tensor, tokens: int) -> float:
    """p50 ms of one decode step after a prefill of ``embeds``."""
    decoder.prefill(embeds.to(decoder.dtype))
    token, times = torch.tensor([[11]]), []
    for _ in range(tokens):
        start = time.perf_counter()
        logits = decoder.decode_one_token(token)
        times.append((time.perf_counter() - start) * 1000)
        token = logits.argmax(-1, keepdim=True)
    return statistics.median(times)


def first_logits(decoder: StaticDecoder, embeds: torch.Tensor) -> torch.Tensor:
    decoder.prefill(embeds.to(decoder.dtype))
    return decoder.decode_one_token(torch.tensor([[11]])).float()


def torchao_paths() -> dict[str, Callable[[nn.Module], None]]:
    """name -> in-place quantizer of a decoder, for each torchao config this script runs."""
    from torchao.prototype.quantization.int4 import (
        Int8DynamicActivationInt4WeightConfig,
        PrototypeInt4WeightOnlyConfig,
    )
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    return {
        "torchao_int8_weight_only": lambda lm: quantize_(lm, Int8WeightOnlyConfig()),
        "torchao_int4_weight_only": lambda lm: quantize_(
            lm, PrototypeInt4WeightOnlyConfig(group_size=32)
        ),
        "torchao_int8_dynamic_int4_weight": lambda lm: quantize_(
            lm, Int8DynamicActivationInt4WeightConfig(group_size=32)
        ),
    }


def decoders(lm: nn.Module, size: int) -> tuple[dict[str, StaticDecoder], dict[str, str]]:
    """Every path's decoder on a copy of ``lm`` (bfloat16), and the paths that failed."""
    built: dict[str, StaticDecoder] = {}
    failed: dict[str, str] = {}
    for mode in ("int8_weight_only", "int4_weight_only"):
        built[f"ours_{mode}"] = StaticDecoder(copy.deepcopy(lm), size, quantize=mode)
    for name, quantize in torchao_paths().items():
        try:
            copied = copy.deepcopy(lm)
            quantize(copied)
            decoder = StaticDecoder(copied, size)
            decoder.prefill(torch.zeros(1, 2, lm.config.hidden_size, dtype=decoder.dtype))
            decoder.decode_one_token(torch.tensor([[11]]))  # fails here if a kernel is missing
            built[name] = decoder
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON, the run goes on
            failed[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return built, failed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("preset", nargs="?", default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    fp32 = build_model(args.preset, "cpu", torch.float32).language_model
    prompt = PROMPT.get(args.preset, 24)
    size = prompt + args.tokens + 8
    embeds = torch.randn(1, prompt, fp32.config.hidden_size,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.inference_mode():
        reference = first_logits(StaticDecoder(fp32, size), embeds)
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        paths, failed = decoders(bf16, size)
        paths["bf16"] = StaticDecoder(bf16, size)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):  # interleaved: a load change hits every path alike
            for name, decoder in paths.items():
                times[name].append(step_ms(decoder, embeds, args.tokens))
        span = float(reference.max() - reference.min())
        results = {
            name: {
                "decode_ms_per_token_p50_of_rounds": statistics.median(times[name]),
                "rounds_ms": times[name],
                "first_step_logit_error_over_range_vs_fp32": float(
                    (first_logits(decoder, embeds) - reference).abs().max() / span
                ),
            }
            for name, decoder in paths.items()
        }
    out = {
        "preset": args.preset,
        "threads": args.threads,
        "prompt_positions": prompt,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "paths": results,
        "not_run": failed,
        "machine": machine_facts("cpu")
        | {
            "torchao": importlib.metadata.version("torchao"),
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        },
    }
    text = json.dumps(out, indent=2) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
