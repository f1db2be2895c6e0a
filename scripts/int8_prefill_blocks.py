"""A float32 model's int8 weights (``quantize: int8_weight_only``) in a CPU prefill: the weights
dequantized a block of rows at a time into one buffer (engines/weight_int8.py,
DEQUANT_BLOCK_BYTES, the product's form) against a float copy of each whole weight per call
(the form before): the prefill's time and its memory peak over the resident set.

    .venv/bin/python scripts/int8_prefill_blocks.py llava-phi-full --rounds 8 \\
        --out bench/results/cpu-llava-phi-full-int8-prefill-blocks.json

One process, one decoder; every round prefills ``--prompt`` random positions once per form,
the forms' order rotated each round (the host's speed drifts: compare within a round). The
memory peak is the kernel's VmHWM, reset before each prefill (/proc/self/clear_refs), minus
the resident set just before: Linux only. Each block size gets a fresh buffer before its first
round, so its peak counts the buffer once.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from vlm_ros.bench import measure
from vlm_ros.engines import cpu_kernels, weight_int8
from vlm_ros.infer.static_decode import StaticDecoder

BLOCKS = weight_int8.WeightOnlyInt8Linear._dequantized_blocks


def whole_copies(self, x: torch.Tensor) -> torch.Tensor:
    """The form before: the whole weight dequantized per call (weight_int8's traced/GPU one)."""
    x, weight = self._dequantized(x)
    onednn = self.onednn and x.dtype == torch.float32
    out = cpu_kernels.linear_onednn(x, weight, None) if onednn else F.linear(x, weight)
    out = out * self.scales
    return out if self.bias is None else out + self.bias


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def prefill(decoder: StaticDecoder, positions: int, seed: int) -> tuple[float, float, torch.Tensor]:
    """(seconds, the peak MB over the resident set before it, the last position's logits)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_mb("VmRSS")
    hidden = torch.randn(1, positions, decoder.config.hidden_size,
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    with torch.inference_mode():
        start = time.perf_counter()
        logits = decoder.prefill(hidden)
        seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM") - before
    decoder.reset()
    return seconds, peak, logits.float().reshape(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", nargs="?", default="llava-phi-full")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=624, help="positions a prefill")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--blocks-mb", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    work = measure.make_workload(measure.BenchOptions(args.preset, "cpu", torch.float32))
    decoder = StaticDecoder(work.model.language_model, args.prompt + 8,
                            quantize="int8_weight_only", regional=False)  # fmt: skip
    del work
    forms = {"whole_copies": (whole_copies, 0)}
    forms |= {f"blocks_{mb}mb": (BLOCKS, mb << 20) for mb in args.blocks_mb}
    names = list(forms)
    rounds, fresh = [], set(names)
    for index in range(args.rounds):
        row: dict = {"seconds": {}, "peak_mb": {}}
        logits = {}
        for name in names[index % len(names) :] + names[: index % len(names)]:
            kernel, block_bytes = forms[name]
            weight_int8.WeightOnlyInt8Linear._dequantized_blocks = kernel
            weight_int8.DEQUANT_BLOCK_BYTES = block_bytes or weight_int8.DEQUANT_BLOCK_BYTES
            if name in fresh:  # this size's buffer made in its own first round
                weight_int8._scratch.__dict__.clear()
            seconds, peak, logits[name] = prefill(decoder, args.prompt, index)
            row["seconds"][name], row["peak_mb"][name] = seconds, peak
            if name in fresh:
                row.setdefault("first_use", []).append(name)
                fresh.discard(name)
        row["max_logit_difference"] = max(
            float((logits[name] - logits["whole_copies"]).abs().max()) for name in names[1:]
        )
        rounds.append(row)
        print(json.dumps(row), flush=True)
    weight_int8.WeightOnlyInt8Linear._dequantized_blocks = BLOCKS
    result = {
        "preset": args.preset, "started_utc": started, "threads": args.threads,
        "prompt_positions": args.prompt, "rounds": rounds,
        "median_seconds": {n: statistics.median(r["seconds"][n] for r in rounds) for n in names},
        "median_whole_over_form": {
            n: statistics.median(r["seconds"]["whole_copies"] / r["seconds"][n] for r in rounds)
            for n in names[1:]
        },
        "peak_mb": {n: {"first_use": next(r["peak_mb"][n] for r in rounds
                                          if n in r.get("first_use", ())),
                        "max_after": max([r["peak_mb"][n] for r in rounds
                                          if n not in r.get("first_use", ())], default=None)}
                    for n in names},
        "machine": measure.machine_facts("cpu"),
    }  # fmt: skip
    measure.emit_result(result, args.out)


if __name__ == "__main__":
    main()
