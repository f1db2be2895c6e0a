"""fp32 decode of a bench preset's decoder, ours (static decoder, oneDNN Linear) against
llama.cpp f32 (the bench's GGUF export), at 1 and 2 threads, interleaved rounds on the same
embeddings: where the 2-thread gap of issue 17 comes from (docs/performance.md).

    .venv/bin/python scripts/decode_threads.py small --rounds 3 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlm_ros.bench import llamacpp
from vlm_ros.bench.measure import build_model
from vlm_ros.infer.static_decode import StaticDecoder


def ours(decoder: StaticDecoder, embeds: torch.Tensor, tokens: int) -> float:
    """ms per decode step after a prefill of ``embeds``."""
    decoder.prefill(embeds)
    token = torch.tensor([[11]])
    start = time.perf_counter()
    for _ in range(tokens):
        token = decoder.decode_one_token(token).argmax(-1, keepdim=True)
    return (time.perf_counter() - start) * 1000 / tokens


def peer(decoder: llamacpp.LlamaCppDecoder, embeds, tokens: int) -> float:
    _, steps = decoder.greedy(embeds, tokens + 1)
    return statistics.fmean(s.ms for s in steps[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("preset", nargs="?", default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    model = build_model(args.preset, "cpu", torch.float32)
    lm = model.language_model
    prompt = 304 if args.preset == "small" else 24
    embeds = torch.randn(
        1, prompt, lm.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    results: dict = {"load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = llamacpp.export_gguf(lm, Path(tmp) / "f32.gguf")
        size = prompt + args.tokens + 8
        for threads in (1, 2):
            torch.set_num_threads(threads)
            mine = StaticDecoder(lm, size)
            theirs = llamacpp.LlamaCppDecoder(path, n_ctx=size, threads=threads, max_prompt=prompt)
            samples: dict[str, list[float]] = {"vlm_ros": [], "llama.cpp": []}
            for _ in range(args.rounds):
                samples["vlm_ros"].append(ours(mine, embeds, args.tokens))
                samples["llama.cpp"].append(peer(theirs, embeds[0].numpy(), args.tokens))
            theirs.close()
            results[f"threads_{threads}"] = {k: statistics.median(v) for k, v in samples.items()}
            print(threads, results[f"threads_{threads}"], flush=True)
    results["load_average_end"] = os.getloadavg()[0]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
