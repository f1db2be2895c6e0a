"""A full-size decoder against llama.cpp at the same precisions, in one run, one model in
memory at a time (issue 17, item 5: "llava-phi-full on CPU at fp32, int8 and int4, against
llama.cpp at the same precisions, in one run ... Report peak RSS too").

``vlm-ros bench --llamacpp`` holds every path side by side and interleaves them, which a
3B-parameter decoder cannot do in 24 GB (11 GB in float32, and llama.cpp's f32 copy is 11 GB
more). So this run is a sequence of phases, each a fresh process:

1. ``prepare``: the bench's seeded workload (measure.make_workload); the decoder's input
   embeddings (image features spliced in, the torch vision stage) saved to a file; the decoder
   exported to GGUF f32 and quantized to q8_0 and q4_0 by llama.cpp's own quantizer
   (bench/llamacpp.py, as the bench does).
2. one phase per path, ours and llama.cpp's alternating (fp32, f32, int8, q8_0, ...): ours
   rebuilds the same seeded weights (quant_accuracy_full.py showed the rebuild is exact) and
   builds the decoder through the product's factory (make_decoder); llama.cpp loads its file
   into memory. Each times a prefill of the same embeddings and ``--steps`` greedy decode steps
   per iteration, keeps the first 16 greedy tokens and the first step's logits, and measures
   the host's streaming read bandwidth just before and after its timing, and quickly beside
   each iteration: bandwidth on these virtual machines moves between states, for seconds or
   minutes, so each phase is set against its own.
3. ``--rounds N`` runs every phase N times, every second round backwards, and reports each
   pair's decode ratio per round and their median: the comparison that does not hang on
   which host state each engine's phase happened to meet.

A process per phase gives each its own peak RSS (``ru_maxrss``; for ours it includes the
float32 weights that quantizing starts from) and its resident memory once loaded.
Accuracy is every path's first-step logits and greedy tokens against our float32 phase.

    .venv/bin/python scripts/full_size_llamacpp.py llava-phi-full --threads 2 \\
        --out bench/results/cpu-llava-phi-full-llamacpp.json

``--compile`` adds our compiled CPU step (``compile_decode: true``, compiled at load, which the
phase's build time includes): float32 after our fp32 phase, and int8 weights with float32
activations (``int8_weight_only``) after the bf16 one, each paired with llama.cpp's type of its
width.

Random weights: speed does not depend on their values, but their near-flat logits exaggerate
quantization noise in the accuracy figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from vlm_ros.bench import llamacpp, measure
from vlm_ros.config import GenerationConfig, RuntimeConfig
from vlm_ros.infer import decode
from vlm_ros.infer.decode import make_decoder
from vlm_ros.infer.fidelity import prefix_agreement
from vlm_ros.infer.static_decode import StaticDecoder
from vlm_ros.infer.vision import make_vision_encoder
from vlm_ros.timing import StageTimer
from vlm_ros.types import Request

OURS = {  # our path -> its settings (dtype None: float32), as the bench's variants name them
    "fp32": RuntimeConfig(),
    "int8": RuntimeConfig(quantize="int8"),
    "bf16_int8_weight_only": RuntimeConfig(dtype="bfloat16", quantize="int8_weight_only"),
    # float32 activations, int8 weights read in the uncompiled step's compiled regions
    "int8_weight_only": RuntimeConfig(quantize="int8_weight_only"),
    "int4_weight_only": RuntimeConfig(quantize="int4_weight_only"),
    # --compile: the compiled CPU step (on AMD CPUs its GEMVs are inductor's: cpu_kernels.py)
    "fp32_compiled": RuntimeConfig(compile_decode=True),
    "int8_weight_only_compiled": RuntimeConfig(quantize="int8_weight_only", compile_decode=True),
    # --huge-pages-ab: float32 on torch's own 4 KiB-page allocation (huge_pages: false)
    "fp32_4k_pages": RuntimeConfig(huge_pages=False),
    "fp32_compiled_4k_pages": RuntimeConfig(compile_decode=True, huge_pages=False),
    # --onednn-ab: float32 uncompiled on oneDNN for every call (cpu_linear: onednn), where auto
    # on an AMD CPU has the decode step's GEMVs compiled per shape (engines/eager_gemv.py)
    "fp32_onednn": RuntimeConfig(cpu_linear="onednn"),
    # and the step with each GEMV compiled alone (engines/eager_gemv.py), where auto has it run
    # as compiled regions (infer/regional_step.py): StaticDecoder(regional=False)
    "fp32_per_shape": RuntimeConfig(),
}
PER_SHAPE = ("fp32_per_shape",)  # built with regional=False
COMPILED = ("ours:fp32_compiled", "ours:int8_weight_only_compiled")  # with --compile only
# The order of the phases: each of ours next to llama.cpp's type of the same width
ORDER = (
    "ours:fp32",
    "llama:f32",
    "ours:int8",
    "ours:bf16_int8_weight_only",
    "ours:int8_weight_only",
    "llama:q8_0",
    "ours:int4_weight_only",
    "llama:q4_0",
)
PAIRS = {  # llama.cpp type -> our paths at the same weight width
    "f32": ("fp32", "fp32_compiled", "fp32_4k_pages", "fp32_compiled_4k_pages", "fp32_onednn",
            "fp32_per_shape"),
    "q8_0": ("int8", "bf16_int8_weight_only", "int8_weight_only", "int8_weight_only_compiled"),
    "q4_0": ("int4_weight_only",),
}  # fmt: skip


def phase_order(
    compiled: bool, huge_pages_ab: bool = False, widths=tuple(PAIRS), onednn_ab: bool = False
) -> tuple:
    """ORDER, with --compile each compiled path right after its uncompiled one, with
    --huge-pages-ab each float32 path's 4 KiB-page twin next to it, with --onednn-ab the
    float32 path on oneDNN's GEMVs and on per-shape compiled GEMVs right after ours, and only
    the llama.cpp types in ``widths`` with our paths of their width."""
    after: dict[str, list[str]] = {"ours:fp32": [], "ours:bf16_int8_weight_only": []}
    if onednn_ab:
        after["ours:fp32"] += ["ours:fp32_onednn", "ours:fp32_per_shape"]
    if compiled:
        after["ours:fp32"].append(COMPILED[0])
        after["ours:bf16_int8_weight_only"].append(COMPILED[1])
    if huge_pages_ab:
        after["ours:fp32"] += ["ours:fp32_compiled_4k_pages"] if compiled else []
    before = {"ours:fp32": ["ours:fp32_4k_pages"]} if huge_pages_ab else {}
    order = [p for phase in ORDER for p in (*before.get(phase, ()), phase, *after.get(phase, ()))]
    kept = {f"llama:{kind}" for kind in widths} | {f"ours:{n}" for k in widths for n in PAIRS[k]}
    return tuple(p for p in order if p in kept)


ACCURACY_TOKENS = 16
R = TypeVar("R")  # what one timed iteration returns besides its times


def resident_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- phases (each runs in its own process) --------------------------------------------------


def prepare(args, work_dir: Path) -> dict:
    """The workload's decoder input and the GGUF files; figures every phase needs."""
    work = measure.make_workload(measure.BenchOptions(args.preset, "cpu", "float32"))
    model = work.model
    image = make_vision_encoder(model, RuntimeConfig()).encode(work.pixels, StageTimer("cpu"))
    spliced = decode.splice_image(work.ids, image, model.embed_tokens, model.num_image_tokens)
    embeds = spliced[0].float().numpy()  # [S, hidden], as measure.peer_embeds gives the bench
    np.save(work_dir / "embeds.npy", embeds)
    lm = work.model.language_model
    source = llamacpp.export_gguf(lm, work_dir / "decoder-f32.gguf")
    positions = work.prompt_len + args.steps // 2  # the live KV at the middle of the answer
    out = {
        "prompt_positions": work.prompt_len,
        "decoder_parameters": measure.parameter_count(lm),
        "vision_parameters": measure.parameter_count(model.vision_tower),
        "live_kv_f32_bytes": measure.live_kv_bytes(model, positions, 4),
    }
    del work, model, lm, image, spliced  # the quantizer reads the file, not the model
    gc.collect()
    files = {"f32": source}
    for kind in [k for k in args.widths if k != "f32"]:
        target = work_dir / f"decoder-{kind}.gguf"
        files[kind] = llamacpp.quantize(source, target, kind, args.threads)
    out["gguf"] = {kind: llamacpp.gguf_bytes(path) for kind, path in files.items()}
    return out


def _times(prefill: list[float], decode_ms: list[float], reads: list[float]) -> dict:
    return {
        "prefill_ms": measure.percentiles(prefill),
        "decode_ms_per_token": measure.percentiles(decode_ms),
        "decode_ms_per_token_each": decode_ms,
        "adjacent_read_gb_s": reads,
    }


def adjacent_read() -> float:
    """The host's read GB/s now, quickly: the median of 3 sums of 1 GiB, over huge pages where
    the system has them (as the decoders' weights sit), else over 4 KiB pages. Measured beside
    every timed iteration, because this host's read moves between states (about 37 and about
    60 GB/s on the AMD host, for minutes at a time, whatever the buffer's size), and a phase's
    best read before or after its timing may be a state its decode never ran in."""
    huge = measure.read_bandwidth(iters=3, huge_pages=True)
    return (huge or measure.read_bandwidth(iters=3))["median"]


def timed_iterations(
    one: Callable[[], tuple[float, float, R]], iters: int
) -> tuple[list[float], list[float], R, list[float]]:
    """``one()`` -> (prefill ms, decode ms a token, result), run ``iters`` times with the
    host's read measured before each and after the last: prefill and decode ms per iteration,
    the first result, and the ``iters + 1`` reads around them."""
    reads, prefill, per_token = [adjacent_read()], [], []
    first: R | None = None
    for _ in range(iters):
        prefill_ms, token_ms, result = one()
        prefill.append(prefill_ms)
        per_token.append(token_ms)
        first = first if first is not None else result
        reads.append(adjacent_read())
    assert first is not None
    return prefill, per_token, first, reads


STEADY = 0.85  # an iteration counts where the reads around it agree to within this ratio


def adjacent_fraction(step_bytes: int, each_ms: list[float], reads: list[float]) -> dict:
    """Each iteration's decode GB/s over the mean of the reads just before and after it; only
    iterations whose two reads agree (the host stayed in one state) count: a share of the read
    the decode really ran beside, where a phase's best read before or after its timing may be
    a state it never ran in."""
    steady = [
        step_bytes / ms / 1e6 / ((a + b) / 2)
        for ms, a, b in zip(each_ms, reads[:-1], reads[1:], strict=True)
        if min(a, b) >= STEADY * max(a, b)
    ]
    return {
        "median": statistics.median(steady) if steady else None,
        "each": steady,
        "steady_iterations": len(steady),
        "iterations": len(each_ms),
    }


def run_ours(name: str, args, work_dir: Path) -> dict:
    """Our decoder for ``name``'s settings on the saved embeddings."""
    runtime = OURS[name]
    start = time.perf_counter()
    work = measure.make_workload(measure.BenchOptions(args.preset, "cpu", runtime.dtype))
    runtime = replace(runtime, max_seq_len=work.prompt_len + args.steps + 8)
    if name in PER_SHAPE:
        decoder = StaticDecoder(work.model.language_model, runtime.max_seq_len, regional=False)
    else:
        decoder = make_decoder(work.model.language_model, runtime)
    assert isinstance(decoder, StaticDecoder), type(decoder)  # the default decoder: static
    build_s = time.perf_counter() - start  # compiling included (at load, StaticDecoder)
    embeds = torch.from_numpy(np.load(work_dir / "embeds.npy"))[None].to(decoder.dtype)
    loaded = resident_mib()

    def answer(tokens: int, timer: StageTimer) -> decode.Generation:
        config = GenerationConfig()  # greedy
        request = Request(measure.NO_IMAGE, "", max_new_tokens=tokens, generation=config)
        gen = decode.generate(
            decoder, embeds, request, stop_token_id=measure.NEVER_STOP, timer=timer,
            keep_logits=True,
        )  # fmt: skip
        decoder.reset()
        return gen

    def one() -> tuple[float, float, decode.Generation]:
        timer = StageTimer("cpu")
        gen = answer(args.steps + 1, timer)
        ms = timer.milliseconds()
        return ms["prefill"], ms["decode"] / args.steps, gen

    answer(4, StageTimer("cpu"))  # warm-up
    before = measure.read_bandwidths()
    prefill, per_token, first, reads = timed_iterations(one, args.iters)
    after = measure.read_bandwidths()
    tokens = first.token_ids[:ACCURACY_TOKENS]
    stem = phase_file(f"ours:{name}", args.round)
    np.savez(work_dir / f"{stem}.npz", tokens=np.array(tokens),
             first_logits=first.step_logits[0].float().numpy().reshape(-1))  # fmt: skip
    return _times(prefill, per_token, reads) | {
        "build_and_quantize_s": build_s,
        "compiled": decoder.compiled,
        "compile_refused": decoder.compile_refused,
        "decode_bytes_per_token": {
            "weights": measure.stored_weight_bytes(decoder.lm),
            "live_kv": measure.live_kv_bytes(
                work.model, work.prompt_len + args.steps // 2, decoder.dtype.itemsize
            ),
        },
        "read_bandwidth_gb_s": bandwidth_entry(before, after),
        "huge_pages": decoder.huge_pages.summary() if decoder.huge_pages else "off",
        "decode_regions": decoder.regions.summary() if decoder.regions else "not asked",
        "decode_gemvs": decoder.gemvs.summary() if decoder.gemvs else "library",
        "resident_after_load_mib": loaded,
        "peak_host_rss_mib": measure.peak_memory("cpu")["peak_host_rss_mib"],
    }


def bandwidth_entry(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """{"before": .., "after": ..} over 4 KiB pages (as committed files before huge pages
    had), and the same over huge pages; the phase's bandwidth is the largest of them."""
    out = {"before": before["4k_pages"], "after": after["4k_pages"]}
    for key, value in (("before", before), ("after", after)):
        if "huge_pages" in value:
            out[f"{key}_huge_pages"] = value["huge_pages"]
    return out


def run_llama(kind: str, args, work_dir: Path, prompt_len: int) -> dict:
    """llama.cpp's ``kind`` file on the same embeddings."""
    start = time.perf_counter()
    peer = llamacpp.LlamaCppDecoder(
        work_dir / f"decoder-{kind}.gguf",
        n_ctx=prompt_len + args.steps + 8,
        threads=args.threads,
        max_prompt=prompt_len,
    )
    load_s = time.perf_counter() - start
    loaded = resident_mib()
    embeds = np.load(work_dir / "embeds.npy")

    def one() -> tuple[float, float, tuple]:
        tokens, steps = peer.greedy(embeds, args.steps + 1)
        return steps[0].ms, sum(s.ms for s in steps[1:]) / args.steps, (tokens, steps)

    try:
        peer.greedy(embeds, 4)  # warm-up
        before = measure.read_bandwidths()
        prefill, per_token, first, reads = timed_iterations(one, args.iters)
        after = measure.read_bandwidths()
        info = llamacpp.system_info()
    finally:
        peer.close()
    stem = phase_file(f"llama:{kind}", args.round)
    np.savez(work_dir / f"{stem}.npz", tokens=np.array(first[0][:ACCURACY_TOKENS]),
             first_logits=first[1][0].logits)  # fmt: skip
    return _times(prefill, per_token, reads) | {
        "load_s": load_s,
        "read_bandwidth_gb_s": bandwidth_entry(before, after),
        "resident_after_load_mib": loaded,
        "peak_host_rss_mib": measure.peak_memory("cpu")["peak_host_rss_mib"],
        "system_info": info,
        "extra_buffer_types": llamacpp.extra_buffer_types(llamacpp.require_llama_cpp()),
    }


def phase_file(phase: str, round_: int = 0) -> str:
    """A phase's file stem in the work directory: ``ours-fp32``, ``-r1`` after it from the
    second round on."""
    return phase.replace(":", "-") + (f"-r{round_}" if round_ else "")


def run_phase(args) -> None:
    torch.set_num_threads(args.threads)
    work_dir = Path(args.work_dir)
    load = os.getloadavg()[0]
    with torch.inference_mode():
        if args.phase == "prepare":
            out = prepare(args, work_dir)
        else:
            side, name = args.phase.split(":")
            if side == "ours":
                out = run_ours(name, args, work_dir)
            else:
                prompt_len = int(np.load(work_dir / "embeds.npy", mmap_mode="r").shape[0])
                out = run_llama(name, args, work_dir, prompt_len)
    out["load_average_1min"] = {"start": load, "end": os.getloadavg()[0]}
    (work_dir / f"{phase_file(args.phase, args.round)}.json").write_text(json.dumps(out))


# ---- the run ----------------------------------------------------------------------------------


def accuracy(work_dir: Path, stem: str) -> dict:
    """A phase's first-step logits and greedy tokens against our float32 phase (its first
    round)."""
    ref = np.load(work_dir / "ours-fp32.npz")
    got = np.load(work_dir / f"{stem}.npz")
    spread = float(ref["first_logits"].max() - ref["first_logits"].min()) or 1.0
    error = float(np.abs(got["first_logits"] - ref["first_logits"]).max())
    return {
        "first_logits_max_abs_error": error,
        "first_logits_error_over_range": error / spread,
        "greedy_prefix_agreement": prefix_agreement(ref["tokens"].tolist(), got["tokens"].tolist()),
    }


def add_bandwidth(entry: dict, step_bytes: dict) -> None:
    """The read GB/s a decode step implies, its share of the phase's best read (before or
    after its timing), and its share of the reads measured around each iteration."""
    total = step_bytes["weights"] + step_bytes["live_kv"]
    gb_s = total / entry["decode_ms_per_token"]["p50"] / 1e6
    read = max(entry["read_bandwidth_gb_s"].values())
    entry["decode_gb_s"] = gb_s
    entry["fraction_of_read"] = gb_s / read
    entry["fraction_of_adjacent_read"] = adjacent_fraction(
        total, entry["decode_ms_per_token_each"], entry["adjacent_read_gb_s"]
    )


def collect(work_dir: Path, prepared: dict, order: tuple[str, ...], round_: int = 0) -> dict:
    paths: dict[str, dict] = {}
    for phase in order:
        side, name = phase.split(":")
        stem = phase_file(phase, round_)
        entry = json.loads((work_dir / f"{stem}.json").read_text())
        if side == "llama":
            entry["decode_bytes_per_token"] = {
                "weights": prepared["gguf"][name]["weights"],
                "live_kv": prepared["live_kv_f32_bytes"],
            }
            entry["tensor_types"] = prepared["gguf"][name]["tensor_types"]
        add_bandwidth(entry, entry["decode_bytes_per_token"])
        entry["accuracy_vs_our_fp32"] = accuracy(work_dir, stem)
        paths[f"{'vlm_ros' if side == 'ours' else 'llama.cpp'} {name}"] = entry
    return paths


def versus(paths: dict) -> dict:
    """Ours over llama.cpp at the same width: how many times faster (>1: ours faster)."""
    out = {}
    for kind, ours in PAIRS.items():
        theirs = paths.get(f"llama.cpp {kind}")
        if theirs is None:  # a type left out by --widths
            continue
        for name in ours:
            mine = paths.get(f"vlm_ros {name}")
            if mine is None:  # a compiled or 4 KiB-page path not asked for
                continue
            out[f"{name} vs {kind}"] = {
                stage: theirs[stage]["p50"] / mine[stage]["p50"]
                for stage in ("prefill_ms", "decode_ms_per_token")
            }
    return out


def round_summary(paths: dict) -> dict:
    """One round's decode per path: ms a token, the reads beside it, its share of them."""
    return {
        name: {
            "decode_ms_per_token_p50": entry["decode_ms_per_token"]["p50"],
            "decode_ms_per_token_each": entry["decode_ms_per_token_each"],
            "adjacent_read_gb_s": entry["adjacent_read_gb_s"],
            "fraction_of_adjacent_read": entry["fraction_of_adjacent_read"],
        }
        for name, entry in paths.items()
    }


def over_rounds(rounds: list[dict]) -> dict:
    """Per pair of ours and llama.cpp's: each round's decode ratio (>1: ours faster) and their
    median, and each engine's share of the read beside its decode over every round's steady
    iterations. The phases of a pair run minutes apart, so one round's ratio may set one
    engine's slow host state against the other's fast one: the median over rounds that
    alternate the order is the comparison. The shares are each engine's own figure, not a
    ratio between them: at full size neither decode followed the read up when the host's
    read doubled (both ran 30-41 GB/s), so a share is only comparable with another from the
    same host state (the reads beside it say which)."""
    out = {}
    per_round = [versus(r) for r in rounds]
    for pair in per_round[0]:
        mine, kind = pair.split(" vs ")
        shares = {}
        for who, name in (("ours", f"vlm_ros {mine}"), ("llama.cpp", f"llama.cpp {kind}")):
            each = [x for r in rounds for x in r[name]["fraction_of_adjacent_read"]["each"]]
            shares[who] = statistics.median(each) if each else None
        ratios = [ratio[pair]["decode_ms_per_token"] for ratio in per_round]
        out[pair] = {
            "decode_ms_per_token_each_round": ratios,
            "decode_ms_per_token_median": statistics.median(ratios),
            "fraction_of_adjacent_read": shares,
        }
    return out


def run_all(args) -> dict:
    load = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    peak_child = 0.0
    order = phase_order(args.compile, args.huge_pages_ab, args.widths, args.onednn_ab)
    # the second round runs the phases backwards, so neither engine always goes first
    phases = [("prepare", 0)] + [
        (phase, r) for r in range(args.rounds) for phase in (order if r % 2 == 0 else order[::-1])
    ]
    with tempfile.TemporaryDirectory(prefix="vlm_ros_full_peer_", dir=args.tmp) as tmp:
        for phase, round_ in phases:
            command = [sys.executable, __file__, args.preset, "--phase", phase,
                       "--round", str(round_), "--work-dir", tmp,
                       "--threads", str(args.threads),
                       "--iters", str(args.iters), "--steps", str(args.steps),
                       "--widths", *args.widths]  # fmt: skip
            print(f"{time.strftime('%H:%M:%S')} {phase} (round {round_})", file=sys.stderr,
                  flush=True)  # fmt: skip
            subprocess.run(command, check=True)
            peak_child = max(peak_child, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        work_dir = Path(tmp)
        prepared = json.loads((work_dir / "prepare.json").read_text())
        rounds = [collect(work_dir, prepared, order, r) for r in range(args.rounds)]
    paths = rounds[0]
    several = (
        {"rounds": [round_summary(r) for r in rounds], "over_rounds": over_rounds(rounds)}
        if args.rounds > 1
        else {}
    )
    return several | {
        "preset": args.preset,
        "started_utc": started,
        "how": "one process per phase, one model in memory at a time, phases in this order: "
        + ", ".join(order)
        + (f"; {args.rounds} rounds, every second one backwards" if args.rounds > 1 else ""),
        "threads": args.threads,
        "widths": args.widths,
        "iterations": args.iters,
        "decode_steps": args.steps,
        "prepare": prepared,
        "paths": paths,
        "ours_faster_by": versus(paths),
        "largest_phase_peak_rss_mib": peak_child / 1024,
        "machine": measure.machine_facts("cpu")
        | {"load_average_1min": {"start": load, "end": os.getloadavg()[0]}},
        "llama_cpp_version": llamacpp.version(),
        "note": "random weights: speed does not depend on them; their near-flat logits "
        "exaggerate quantization noise in the accuracy figures",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", nargs="?", default="llava-phi-full")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per iteration")
    parser.add_argument("--out")
    parser.add_argument("--tmp", help="where the GGUF files go (23 GB for llava-phi-full)")
    parser.add_argument(
        "--compile", action="store_true",
        help="also our compiled CPU step: float32, and int8 weights with float32 activations",
    )  # fmt: skip
    parser.add_argument(
        "--huge-pages-ab", action="store_true",
        help="also float32 on torch's own 4 KiB pages (huge_pages: false) next to each fp32 path",
    )  # fmt: skip
    parser.add_argument(
        "--onednn-ab", action="store_true",
        help="also float32 uncompiled on oneDNN's GEMVs (cpu_linear: onednn) and with each GEMV "
        "compiled alone (per shape, not as regions) next to ours",
    )  # fmt: skip
    parser.add_argument(
        "--widths", nargs="+", default=list(PAIRS), choices=list(PAIRS),
        help="llama.cpp types to run, each with our paths of its width (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run every phase this many times (every second round backwards); the decode "
        "ratios per round and their median, and each engine's share of the read beside it",
    )  # fmt: skip
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: one phase, in a child
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "f32" not in args.widths:
        parser.error("--widths needs f32: our float32 phase is every path's accuracy reference")
    if args.phase:
        run_phase(args)
        return
    llamacpp.require_llama_cpp()  # one line naming the install, before any work
    torch.set_num_threads(args.threads)  # as the phases run (machine_facts reports it)
    result = run_all(args)
    text = json.dumps(result, indent=2) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
