"""One float32 GEMV per weight, over Phi-2's Linear shapes, interleaved in rounds in one
process: how the page size under the weights and the weights' layout move a CPU GEMV against
a plain read of the same bytes (docs/performance.md, "Huge pages for the decoder's weights").

    .venv/bin/python scripts/gemv_layouts.py --layers 12 --rounds 6 --threads 2 \\
        --out bench/results/cpu-gemv-layouts-amd.json

Per round, each over every weight of ``--layers`` layers (fc1 10240x2560, fc2 2560x10240 and
four 2560x2560: q, k, v, dense), one pass per weight, GB/s (weight bytes over the median of
three passes):
- ``sum_4k`` / ``sum_huge``: a plain sum of each weight, on torch's own 4 KiB-page
  allocation / on huge pages (engines/huge_pages.py): the read bandwidth the GEMVs aim at;
- ``onednn_4k`` / ``onednn_huge``: oneDNN's Linear (the uncompiled step's on AMD CPUs);
- ``inductor_4k`` / ``inductor_huge``: inductor's reduction ``(x * W).sum(-1)`` compiled for
  the shape (the compiled step's on AMD CPUs, cpu_kernels.InductorGemvLinear);
- ``inductor_blocked_huge``: the same reduction over the weight laid out in blocks of 16
  rows, ``[out/16, in, 16]`` (not used by the product: its uncompiled calls need the row
  layout; the layout is measured to show what the row layout leaves).
The first round's outputs are checked against F.linear. Two weight sets of ``--layers``
layers each are held (4 KiB pages and huge pages), plus the blocked copy: 3x the bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlm_ros.bench import measure
from vlm_ros.engines import cpu_kernels
from vlm_ros.engines import huge_pages as thp

SHAPES = ((10240, 2560), (2560, 10240), (2560, 2560), (2560, 2560), (2560, 2560), (2560, 2560))
BLOCK = 16


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    copy = thp.huge_page_empty(tensor.shape, tensor.dtype)
    return copy.copy_(tensor)


def blocked(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [out/16, in, 16]: 16 rows interleaved, one contiguous run per block."""
    out, cols = weight.shape
    return weight.view(out // BLOCK, BLOCK, cols).transpose(1, 2).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    reason = thp.unavailable()
    if reason is not None:
        raise SystemExit(f"gemv_layouts: {reason}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = [torch.randn(o, i) for _ in range(args.layers) for o, i in SHAPES]
    huge = [on_huge_pages(w) for w in plain]
    huge_blocked = [on_huge_pages(blocked(w)) for w in plain]
    total = sum(w.numel() * 4 for w in plain)
    inputs = {cols: torch.randn(1, cols) for cols in {i for _, i in SHAPES}}
    row = torch.compile(lambda x, w: (x.unsqueeze(-2) * w).sum(-1), dynamic=False)
    block = torch.compile(lambda x, w: (x.view(1, -1, 1) * w).sum(-2).reshape(1, -1), dynamic=False)

    def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.onednn_linear(x, w, None)

    def plain_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w.sum()

    runs = {
        "sum_4k": (plain_sum, plain), "sum_huge": (plain_sum, huge),
        "onednn_4k": (onednn, plain), "onednn_huge": (onednn, huge),
        "inductor_4k": (row, plain), "inductor_huge": (row, huge),
        "inductor_blocked_huge": (block, huge_blocked),
    }  # fmt: skip

    def gb_s(kernel, weights) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for w in weights:
                kernel(inputs[w.shape[1]], w)
            times.append(time.perf_counter() - start)
        return total / statistics.median(times) / 1e9

    with torch.inference_mode():
        x, w = inputs[2560], plain[0]
        want = F.linear(x, w)
        for name, got in (("onednn", onednn(x, huge[0])), ("inductor", row(x, huge[0])),
                          ("blocked", block(x, huge_blocked[0]))):  # fmt: skip
            error = (got - want).abs().max().item()
            assert error <= 1e-4 * want.abs().max().item(), (name, error)
        rounds = []
        for _ in range(args.rounds):
            rounds.append({name: gb_s(*run) for name, run in runs.items()})
            print(json.dumps({k: round(v, 1) for k, v in rounds[-1].items()}), flush=True)
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ratios = {
        "huge_over_4k": {k: statistics.median(r[f"{k}_huge"] / r[f"{k}_4k"] for r in rounds)
                         for k in ("sum", "onednn", "inductor")},
        "share_of_sum_huge": {k: statistics.median(r[k] / r["sum_huge"] for r in rounds)
                              for k in ("onednn_huge", "inductor_huge", "inductor_blocked_huge")},
    }  # fmt: skip
    result = {
        "layers": args.layers, "weight_bytes_per_set": total, "shapes": SHAPES,
        "rounds": rounds, "median": median, "median_ratios": ratios,
        "machine": measure.machine_facts("cpu"),
    }  # fmt: skip
    print(json.dumps(ratios, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
