"""The native decode kernels (engines/native.py) against what they replace and against a plain
sum of the same bytes, out of cache, in alternating rounds of one process (CPU).

    .venv/bin/python scripts/native_kernels.py --threads 2 \\
        --out bench/results/cpu-native-kernels.json

- GEMV: ``--layers`` float32 weights of each full-size Phi-2 shape (q/k/v/dense 2560x2560,
  fc1 10240x2560, fc2 2560x10240; ~3.4 GB at 8 layers, far past any cache), each read once a
  round in turn by ``torch.sum``, by inductor's one-row reduction (cpu_kernels.
  gemv_by_reduction compiled, the regions' form before) and by ``native.gemv``.
- Attention: ``--layers`` static caches of Phi-2's 32 heads x 80 with ``--live`` slots live
  (631: a CLIP-336 image and a short question), each layer's token written and attended
  once a round by the regions' former form (two slice assignments and SDPA) and by
  ``native.attend_one``, beside a ``sum`` of the same live slices.

Each form's GB/s is the bytes it must read over its time; ``*_over_sum`` is that over the
sum's GB/s in the same round, so a host whose read moves between states (these virtual
machines do, for seconds or minutes) compares each form with the sum it met. The JSON keeps
every round, the medians and the machine's facts.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vlm_ros.bench import measure
from vlm_ros.engines import cpu_kernels, native

SHAPES = {"qkv_dense": (2560, 2560), "fc1": (10240, 2560), "fc2": (2560, 10240)}


def _gemv_forms(layers: int, scale: int) -> tuple[dict[str, Callable], int]:
    """The GEMV forms over ``layers`` x (4 square weights, fc1, fc2) at 1/``scale`` size."""
    weights = []
    for _ in range(layers):
        for name, (rows, cols) in SHAPES.items():
            for _ in range(4 if name == "qkv_dense" else 1):
                weights.append(torch.randn(rows // scale, cols // scale))
    rows = {cols: torch.randn(1, cols) for cols in {w.shape[1] for w in weights}}
    inductor = torch.compile(cpu_kernels.gemv_by_reduction, dynamic=False)
    forms = {
        "sum": lambda: [w.sum() for w in weights],
        "inductor": lambda: [inductor(rows[w.shape[1]], w) for w in weights],
        "native": lambda: [native.gemv(rows[w.shape[1]], w, None) for w in weights],
    }
    return forms, sum(w.numel() * 4 for w in weights)


def _attention_forms(
    layers: int, heads: int, dim: int, live: int
) -> tuple[dict[str, Callable], int]:
    """The attention forms over ``layers`` caches of ``live + 8`` slots."""
    slots, position = live + 8, live - 1
    caches = [
        (torch.randn(1, heads, slots, dim), torch.randn(1, heads, slots, dim))
        for _ in range(layers)
    ]
    q, k, v = (torch.randn(1, heads, 1, dim) for _ in range(3))

    def sdpa() -> None:
        for keys, values in caches:
            keys[:, :, position] = k[:, :, 0]
            values[:, :, position] = v[:, :, 0]
            F.scaled_dot_product_attention(q, keys[:, :, :live], values[:, :, :live])

    forms = {
        "sum": lambda: [
            (key[:, :, :live].sum(), value[:, :, :live].sum()) for key, value in caches
        ],
        "sdpa": sdpa,
        "native": lambda: [native.attend_one(q, k, v, *cache, position) for cache in caches],
    }
    return forms, 2 * layers * heads * live * dim * 4


def _check(gemv_scale: int) -> dict[str, float]:
    """Each native kernel against its reference on one input of the measured shapes."""
    weight, x = (
        torch.randn(10240 // gemv_scale, 2560 // gemv_scale),
        torch.randn(1, 2560 // gemv_scale),
    )
    gemv = (native.gemv(x, weight, None) - cpu_kernels.gemv_by_reduction(x, weight)).abs().max()
    q, k, v = (torch.randn(1, 4, 1, 80) for _ in range(3))
    keys, values = torch.randn(1, 4, 40, 80), torch.randn(1, 4, 40, 80)
    got = native.attend_one(q, k, v, keys, values, 30)
    want = F.scaled_dot_product_attention(q, keys[:, :, :31], values[:, :, :31])
    return {
        "gemv_max_abs_error": gemv.item(),
        "attention_max_abs_error": (got - want).abs().max().item(),
    }


def _rounds(forms: dict[str, Callable], nbytes: int, rounds: int) -> dict:
    """Every form once a round, the order rotated each round; GB/s and the share of the sum."""
    names, rows = list(forms), []
    for form in forms.values():
        form()  # compile, fault the pages in
    for index in range(rounds):
        shift = index % len(names)
        gb_s = {}
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            forms[name]()
            gb_s[name] = nbytes / (time.perf_counter() - start) / 1e9
        rows.append(
            {"gb_s": gb_s} | {f"{n}_over_sum": gb_s[n] / gb_s["sum"] for n in names if n != "sum"}
        )
    keys = [key for key in rows[0] if key != "gb_s"]
    median = {key: statistics.median(row[key] for row in rows) for key in keys}
    median["gb_s"] = {n: statistics.median(row["gb_s"][n] for row in rows) for n in names}
    return {"bytes_a_round": nbytes, "rounds": rows, "median": median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--live", type=int, default=631, help="live cache slots (attention)")
    parser.add_argument("--scale", type=int, default=1, help="divide the GEMV shapes (tests)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if (why := native.load()) is not None:
        raise SystemExit(why)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with torch.inference_mode():
        gemv = _rounds(*_gemv_forms(args.layers, args.scale), args.rounds)
        attention = _rounds(*_attention_forms(args.layers, 32, 80, args.live), args.rounds)
        checks = _check(args.scale)
    result = {
        "started_utc": started,
        "threads": args.threads,
        "layers": args.layers,
        "gemv_scale": args.scale,
        "live_slots": args.live,
        "build": dict(zip(("name", "flags"), native.build_flags(), strict=True)),
        "checks": checks,
        "gemv": gemv,
        "attention": attention,
        "machine": measure.machine_facts("cpu"),
    }
    measure.emit_result(result, args.out)


if __name__ == "__main__":
    main()
