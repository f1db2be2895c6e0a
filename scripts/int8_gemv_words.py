"""A float32 model's int8 GEMV as inductor compiles it, two weight layouts, on torch's own CPU
kernels and on its AVX2 ones: why weight_int8.py stores those weights as int32 words.

    .venv/bin/python scripts/int8_gemv_words.py --threads 2 --also-avx2 \\
        --out bench/results/cpu-int8-gemv-words-amd.json

Per Linear shape of the `small` decoder (800 hidden, 3200 MLP, 51200 vocabulary) and of Phi-2
(2560, 10240), each compiled for its shape with ``fullgraph`` and timed interleaved in rounds
(median of the rounds, each the mean of ``--calls`` calls):
- ``float32``: the reduction over float32 weights (cpu_kernels.gemv_by_reduction), the
  uncompiled float32 step's regions;
- ``int8_bytes``: the same reduction over int8 weights [out, in], converted as read (the
  layout before 2026-12-05);
- ``int8_words``: weight_int8.gemv_planes over the int32 words of four column planes (the
  layout now).
Each output is checked against the float64 product first (the check fails the run). With
``--also-avx2`` the same runs again in a child process with ``ATEN_CPU_CAPABILITY=avx2``
(inductor's code then uses 8-lane vectors), its result under ``avx2``. Each process compiles
into its own CPU kind's inductor cache (engines/compile_cache.py). Not the decoder: no
attention, no LayerNorm, no per-call overhead of a step (the benches have those).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vlm_ros.bench import measure
from vlm_ros.engines import compile_cache, weight_int8
from vlm_ros.engines.cpu_kernels import gemv_by_reduction
from vlm_ros.engines.eager_gemv import own_function

SHAPES = {
    "small": ((800, 800), (3200, 800), (800, 3200), (51200, 800)),
    "phi-2": ((2560, 2560), (10240, 2560), (2560, 10240), (51200, 2560)),
}


def _kernels(out: int, columns: int) -> dict:
    """The three GEMVs compiled for one shape, each a code object of its own (dynamo keeps
    at most 8 compiled entries per code object)."""
    kinds = (("float32", gemv_by_reduction), ("int8_bytes", gemv_by_reduction),
             ("int8_words", weight_int8.gemv_planes))  # fmt: skip
    return {
        name: torch.compile(own_function(fn, f"{name}_{out}x{columns}"), fullgraph=True,
                            dynamic=False)
        for name, fn in kinds
    }  # fmt: skip


def _weights(out: int, columns: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    int8 = torch.randint(-127, 128, (out, columns), generator=generator, dtype=torch.int8)
    return {"float32": int8.float(), "int8_bytes": int8, "int8_words": weight_int8.to_planes(int8)}


def _timed(fn, x, w, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(x, w)
    return (time.perf_counter() - start) / calls * 1e3


def measure_here(shapes: list[tuple[int, int]], rounds: int, calls: int) -> dict:
    results = []
    with torch.inference_mode():
        for index, (out, columns) in enumerate(shapes):
            kernels = _kernels(out, columns)
            weights = _weights(out, columns, index)
            x = torch.randn(1, columns, generator=torch.Generator().manual_seed(100 + index))
            want = (x.double() @ weights["float32"].double().T).float()
            errors = {}
            for name, fn in kernels.items():
                got = fn(x, weights[name])
                errors[name] = ((got - want).abs().max() / want.abs().max()).item()
                if not errors[name] < 1e-5:
                    raise SystemExit(f"int8_gemv_words: {name} {out}x{columns} off: {errors}")
                _timed(fn, x, weights[name], 3)
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for round_ in range(rounds):
                order = list(kernels) if round_ % 2 == 0 else list(reversed(kernels))
                for name in order:
                    times[name].append(_timed(kernels[name], x, weights[name], calls))
            ms = {name: statistics.median(values) for name, values in times.items()}
            row = {"out": out, "in": columns, "relative_error": errors}
            for name, value in ms.items():
                size = weights[name].numel() * weights[name].element_size()
                row[name] = {"ms": round(value, 4), "weight_gb_s": round(size / value / 1e6, 2)}
            row["words_over_bytes"] = round(ms["int8_bytes"] / ms["int8_words"], 2)
            row["words_over_float32"] = round(ms["float32"] / ms["int8_words"], 2)
            results.append(row)
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "inductor_cache": os.environ.get(compile_cache.ENV),
        "shapes": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--shapes", nargs="+", default=["small", "phi-2"],
                        help="small, phi-2, or OUTxIN")  # fmt: skip
    parser.add_argument("--also-avx2", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compile_cache.use_persistent_cache()
    shapes = [s for name in args.shapes for s in SHAPES.get(name, ())]
    shapes += [tuple(map(int, n.split("x"))) for n in args.shapes if n not in SHAPES]
    result = {"how": " ".join(sys.argv), "machine": measure.machine_facts("cpu")}
    result["native"] = measure_here(shapes, args.rounds, args.calls)
    if args.also_avx2:
        child = [a for a in sys.argv[1:] if a != "--also-avx2"]
        if "--out" in child:
            del child[child.index("--out") : child.index("--out") + 2]
        env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
        done = subprocess.run([sys.executable, __file__, *child], env=env, text=True,
                              capture_output=True, timeout=3600)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"int8_gemv_words: the AVX2 child failed: {done.stderr[-2000:]}")
        result["avx2"] = json.loads(done.stdout)["native"]
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
