"""Where a decode token of the compiled regions goes, region by region, after a real prompt
(issue 17, item 2: "find where the other half goes ... show the profile").

    .venv/bin/python scripts/region_profile.py llava-phi-full --threads 2 \\
        --out bench/results/cpu-llava-phi-full-region-profile.json

The product's step (infer/regional_step.RegionalStep, the node's default uncompiled step on an
AMD CPU) on the bench's seeded float32 weights, after a prefill of ``--prompt`` positions (624:
a CLIP-336 image's 576 features and a short question), so attention reads a live KV cache of
the size a robot's question has. The three compiled regions are wrapped with timers (the
wrappers call the very same compiled functions); what is left of the step is the cache write,
the SDPA call over the live slots and the Python between them. Each part's bytes (its weights;
for attention the live keys and values) over its time, as a share of the host's streaming read
measured just before the round (measure.read_bandwidth over huge pages, where the decoder keeps
its weights), says which part falls short of the memory and by how much.

Beside it, right after each round's steps, every part's very same tensors are read by a plain
``sum`` per tensor, part by part and layer by layer (the weights where they lie, the live key
and value slices of every layer): ``share_of_same_bytes_sum`` is that read's time over the
part's. It splits a part's shortfall into what the host gives this access pattern (a 1 GiB
sum against a sum per tensor, per ~200 KB head slice) and what the part's kernels leave of it.

``--kernels both`` (the default) profiles the regions on each kernel set the product has, in
alternating rounds over the same weights and cache: ``native`` (engines/native.py's GEMV and
one-query attention, the default where they build) and ``inductor`` (inductor's GEMV loops and
SDPA); ``step_ms_inductor_over_native`` is the ratio of their median steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vlm_ros.bench import measure
from vlm_ros.engines import native
from vlm_ros.infer import regional_step
from vlm_ros.infer.fidelity import compiled_step_problem
from vlm_ros.infer.static_decode import StaticDecoder

PARTS = ("layer_in", "layer_out", "head")


def _timed(fn: Callable, seconds: list[float]) -> Callable:
    def call(*args):
        start = time.perf_counter()
        out = fn(*args)
        seconds.append(time.perf_counter() - start)
        return out

    return call


def _tensors(inputs) -> list[torch.Tensor]:
    """The tensors among a region's inputs (a Linear is a (weight, scales, bias) tuple)."""
    out = []
    for t in inputs:
        out.extend(t if isinstance(t, tuple) else (t,))
    return [t for t in out if isinstance(t, torch.Tensor)]


def _part_bytes(step: regional_step.RegionalStep, live: float) -> dict[str, float]:
    """Bytes each part reads a token: the regions' weights as stored (norms and biases too),
    attention the live keys and values of every layer."""

    def size(inputs) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(inputs))

    first_half, second_half, keys, _, _ = step.layers[0]
    layers = len(step.layers)
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    return {
        "layer_in": size(first_half) * layers,
        "layer_out": size(second_half) * layers,
        "head": size(step.head_weights),
        "attention": 2 * live * kv_heads * head_dim * keys.element_size() * layers,
    }


def _part_tensors(step: regional_step.RegionalStep, live: int) -> dict[str, list]:
    """Every tensor each part reads a token, in the step's order: the tensors _part_bytes
    counts, attention's as the live slices SDPA is given."""
    parts: dict[str, list] = {"layer_in": [], "layer_out": [], "attention": []}
    for first_half, second_half, keys, values, _ in step.layers:
        parts["layer_in"] += _tensors(first_half)
        parts["attention"] += [keys[:, :, :live], values[:, :, :live]]
        parts["layer_out"] += _tensors(second_half)
    return parts | {"head": _tensors(step.head_weights)}


def _sum_ms(parts: dict[str, list], repeats: int = 3) -> dict[str, float]:
    """ms to read each part's tensors with one plain sum per tensor, median of ``repeats``."""
    out = {}
    for part, tensors in parts.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for t in tensors:
                t.sum()
            times.append(time.perf_counter() - start)
        out[part] = statistics.median(times) * 1e3
    return out


def profile_round(
    decoder: StaticDecoder, step: regional_step.RegionalStep, prompt: int, steps: int, seed: int
) -> dict:
    seconds: dict[str, list[float]] = {part: [] for part in PARTS}
    compiled = {part: getattr(step, part) for part in PARTS}
    for part in PARTS:
        setattr(step, part, _timed(compiled[part], seconds[part]))
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.inference_mode():
            hidden = decoder.config.hidden_size
            decoder.prefill(torch.randn(1, prompt, hidden, generator=generator))
            tokens = torch.randint(decoder.config.vocab_size, (steps, 1, 1), generator=generator)
            read = measure.read_bandwidth(iters=3, huge_pages=True) or measure.read_bandwidth(
                iters=3
            )
            start = time.perf_counter()
            for position, token in enumerate(tokens, prompt):
                step(token, position)
            step_s = (time.perf_counter() - start) / steps
            sums = _sum_ms(_part_tensors(step, prompt + steps // 2))
    finally:
        for part in PARTS:
            setattr(step, part, compiled[part])
        decoder.reset()
    ms = {part: sum(seconds[part]) / steps * 1e3 for part in PARTS}
    ms["attention"] = step_s * 1e3 - sum(ms.values())  # cache write, SDPA, the Python between
    part_bytes = _part_bytes(step, prompt + (steps - 1) / 2)
    best = read["best"]
    return {
        "step_ms": step_s * 1e3,
        "read_gb_s": best,
        "ms_per_token": ms,
        "bytes_per_token": part_bytes,
        "share_of_read": {p: part_bytes[p] / (ms[p] / 1e3) / 1e9 / best for p in part_bytes},
        "same_bytes_sum_ms": sums,
        "same_bytes_sum_share_of_read": {
            p: part_bytes[p] / (sums[p] / 1e3) / 1e9 / best for p in part_bytes
        },
        "share_of_same_bytes_sum": {p: sums[p] / ms[p] for p in part_bytes},
        "step_share_of_read": sum(part_bytes.values()) / step_s / 1e9 / best,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="llava-phi-full")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=624, help="positions prefilled first")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed a round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per kernel set")
    parser.add_argument("--kernels", choices=("both", "native", "inductor"), default="both")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    work = measure.make_workload(measure.BenchOptions(args.preset, "cpu", torch.float32))
    decoder = StaticDecoder(
        work.model.language_model, args.prompt + args.steps + 8, cpu_linear="torch",
        regional=False,
    )  # fmt: skip  # the library step; the regions are made from it whatever a load would time
    lean = decoder._fast
    problem = regional_step.supports(lean) if lean is not None else "no lean step"
    if problem is not None:
        raise SystemExit(f"the regions do not cover this decoder: {problem}")
    kinds = ("native", "inductor") if args.kernels == "both" else (args.kernels,)
    if "native" in kinds and (why := native.load()) is not None:
        raise SystemExit(why)
    want, _ = decoder._trial(lean, 2)
    steps, errors = {}, {}
    for kind in kinds:
        step = steps[kind] = regional_step.RegionalStep(lean, native=kind == "native")
        got, _ = decoder._trial(step, 2)  # compiles the regions, then checks them as a load does
        problem = compiled_step_problem(got, want, torch.float32, what=f"the {kind} regions")
        if problem is not None:
            raise SystemExit(f"not profiled: {problem}")
        errors[kind] = float((got - want).abs().max() / (want.max() - want.min()))
    rounds = []
    for seed in range(args.rounds):
        for kind in kinds if seed % 2 == 0 else kinds[::-1]:  # alternate which goes first
            row = profile_round(decoder, steps[kind], args.prompt, args.steps, seed)
            rounds.append({"kernels": kind} | row)
    keys = (
        "ms_per_token", "share_of_read", "same_bytes_sum_ms", "same_bytes_sum_share_of_read",
        "share_of_same_bytes_sum",
    )  # fmt: skip
    medians = {}
    for kind in kinds:
        mine = [r for r in rounds if r["kernels"] == kind]
        medians[kind] = {
            key: {p: statistics.median(r[key][p] for r in mine) for p in mine[0][key]}
            for key in keys
        } | {
            "step_ms": statistics.median(r["step_ms"] for r in mine),
            "step_share_of_read": statistics.median(r["step_share_of_read"] for r in mine),
        }
    result = {
        "preset": args.preset,
        "started_utc": started,
        "threads": args.threads,
        "prompt_positions": args.prompt,
        "decode_steps": args.steps,
        "kernels": list(kinds),
        "regions_vs_library_step_logit_error_over_range": errors,
        "rounds": rounds,
        "median": medians,
        "machine": measure.machine_facts("cpu") | {"load_average_1min": os.getloadavg()[0]},
    }
    if len(kinds) == 2:
        result["step_ms_inductor_over_native"] = (
            medians["inductor"]["step_ms"] / medians["native"]["step_ms"]
        )
    measure.emit_result(result, args.out)


if __name__ == "__main__":
    main()
