"""Where a decode step's time goes: the whole step against its Linear layers alone and against
everything but them, interleaved in one process, each round set against the host's read
bandwidth measured just before it (issue 17, item 2: "find where the other half goes").

    .venv/bin/python scripts/decode_split.py small --threads 2 \\
        --out bench/results/cpu-small-decode-split.json

Per round (same seeded weights, the product's StaticDecoder and its lean step, float32):
- ``step``: decode steps after a prefill, as the bench times them;
- ``linears``: the decoder's Linear layers alone, each called on a [1, 1, in] input in the
  step's order (the 73 GEMVs of a `small` token and their parallel regions, nothing else);
- ``outside_linears``: the step with every Linear of the layers and the head replaced by a
  module that returns a preallocated output: attention, norms, rotary, cache writes, the
  activation and the Python around them;
- ``outside_linears_no_attention``: the same without the attention call (its input passed
  through), so attention's own share is the difference;
- with ``--compiled``, also ``compiled_step``: the product's ``compile_decode: true`` step
  (static_decode.compile_step: inductor, C++ wrapper; ``cpu_linear: auto``) on the same
  weights, timed like ``step``; it attends over its whole static cache under a mask, as
  transformers' step does. Its first-step logits are checked against the lean step's. Where
  its GEMVs are inductor's (an AMD CPU), also ``compiled_linears``: those GEMVs alone, the 73
  of a token compiled as one graph, as ``linears`` times the library's.

``--huge-pages-ab`` adds ``step_4k_pages`` (and ``compiled_step_4k_pages`` with
``--compiled``): the same step on a copy of the weights and cache left on torch's own 4 KiB-page
allocation (``huge_pages: false``), where the product's decoders place theirs on transparent
huge pages (engines/huge_pages.py).

Each round's ``read_gb_s`` is the host's read over 4 KiB pages (what the files committed before
huge pages measured) and ``read_huge_pages_gb_s`` over huge pages; the ``*_share_of_read``
figures are against the larger of the two, the best read this host gives.

``--cpu-linear`` picks the lean step's and ``linears``' kernels (default ``torch``: MKL on x86,
as the earlier committed files ran; ``auto``: what the product picks on this host, oneDNN on
an AMD CPU); ``--compiled-linear`` the compiled step's (default ``auto``; ``inductor``: its
GEMVs written by inductor on any CPU, as auto does on AMD). The lean step is always the
PhiDecodeStep (``regional=False``): its parts are what this splits; with ``auto`` on an AMD
CPU its GEMVs are then compiled per shape (engines/eager_gemv.py). The product's step there
runs as compiled regions (infer/regional_step.py), measured against this one by the bench's
``per_shape_gemvs`` variant.

Replacing modules is for this measurement only; the shapes, the cache and the step's code
are the product's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
import types
from pathlib import Path

import torch
from torch import nn

from vlm_ros.bench import measure
from vlm_ros.engines.cpu_kernels import InductorGemvLinear, OneDnnLinear, copy_structure
from vlm_ros.infer import phi_step
from vlm_ros.infer.fidelity import compiled_step_problem
from vlm_ros.infer.static_decode import StaticDecoder, compile_step


class _Preallocated(nn.Module):
    """Stands in for a Linear: returns its output buffer, computes nothing."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out = torch.randn(1, 1, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def _no_attention(q, k, v, enable_gqa=False):
    return q


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("preset", nargs="?", default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--compiled", action="store_true", help="also the compiled step")
    parser.add_argument("--cpu-linear", default="torch", choices=["torch", "auto", "onednn"])
    parser.add_argument(
        "--compiled-linear", default="auto", choices=["auto", "inductor", "torch", "onednn"]
    )
    parser.add_argument("--huge-pages-ab", action="store_true", help="also on 4 KiB pages")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = measure.build_model(args.preset, "cpu", torch.float32)
    lm = model.language_model
    prompt = 304 if args.preset == "small" else 32
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, prompt, lm.config.hidden_size, generator=generator)
    result: dict = {"preset": args.preset, "threads": args.threads, "tokens": args.tokens,
                    "prompt": prompt, "cpu_linear": args.cpu_linear,
                    "compiled_linear": args.compiled_linear, "huge_pages_ab": args.huge_pages_ab,
                    "load_average_start": os.getloadavg()[0]}  # fmt: skip
    with torch.inference_mode():
        decoder = StaticDecoder(
            lm, prompt + args.tokens + 8, cpu_linear=args.cpu_linear, regional=False
        )
        compiled = None
        if args.compiled:  # compiles here, at load (StaticDecoder.warm_up)
            compiled = StaticDecoder(
                lm, prompt + args.tokens + 8, compile=True, cpu_linear=args.compiled_linear
            )
            if not compiled.compiled:  # its load-time check failed: nothing compiled to time
                raise SystemExit(f"the compiled step was refused: {compiled.compile_refused}")
        plain_lm = copy_structure(lm, lambda t: t.clone()) if args.huge_pages_ab else None
        result["huge_pages"] = decoder.huge_pages.summary() if decoder.huge_pages else "off"
        step = decoder._fast
        assert step is not None, "the preset's decoder has no lean step"
        real_layers, real_head = step.layers, step.head
        stub = lambda m: _Preallocated(m.out_features)  # noqa: E731
        hollow = [dataclasses.replace(layer, q=stub(layer.q), k=stub(layer.k), v=stub(layer.v),
                                      dense=stub(layer.dense), fc1=stub(layer.fc1),
                                      fc2=stub(layer.fc2)) for layer in real_layers]  # fmt: skip
        kinds = (nn.Linear, OneDnnLinear)  # the lean step's own modules, in the step's order
        linears = [m for m in decoder.lm.modules() if isinstance(m, kinds)]
        inputs = [torch.randn(1, 1, m.in_features) for m in linears]
        weights = measure.stored_weight_bytes(lm)
        kv = measure.live_kv_bytes(model, prompt + args.tokens // 2, 4)
        linear_bytes = sum(p.numel() * 4 for m in linears for p in m.parameters())

        def decode(decoder: StaticDecoder = decoder) -> float:
            decoder.prefill(embeds)
            token = torch.tensor([[11]])
            start = time.perf_counter()
            for _ in range(args.tokens):
                decoder.decode_one_token(token)
            return (time.perf_counter() - start) * 1000 / args.tokens

        def linears_alone() -> float:
            start = time.perf_counter()
            for _ in range(args.tokens):
                for module, x in zip(linears, inputs, strict=True):
                    module(x)
            return (time.perf_counter() - start) * 1000 / args.tokens

        def hollowed(attention) -> float:
            step.layers, step.head = hollow, _Preallocated(real_head.out_features)
            phi_step.F = attention
            try:
                return decode()
            finally:
                step.layers, step.head, phi_step.F = real_layers, real_head, torch.nn.functional

        no_attention = types.SimpleNamespace(scaled_dot_product_attention=_no_attention)
        runs = {
            "step": decode,
            "linears": linears_alone,
            "outside_linears": lambda: hollowed(torch.nn.functional),
            "outside_linears_no_attention": lambda: hollowed(no_attention),
        }

        def first_logits(decoder: StaticDecoder = decoder) -> torch.Tensor:
            decoder.prefill(embeds)
            return decoder.decode_one_token(torch.tensor([[11]])).clone()

        before = first_logits()
        if plain_lm is not None:
            plain = StaticDecoder(plain_lm, prompt + args.tokens + 8, cpu_linear=args.cpu_linear,
                                  huge_pages=False, regional=False)  # fmt: skip
            assert torch.equal(first_logits(plain), before), "4 KiB pages changed the logits"
            runs["step_4k_pages"] = lambda: decode(plain)
            if compiled is not None:
                plain_compiled = StaticDecoder(
                    plain_lm, prompt + args.tokens + 8, compile=True,
                    cpu_linear=args.compiled_linear, huge_pages=False,
                )  # fmt: skip
                assert plain_compiled.compiled, plain_compiled.compile_refused
                runs["compiled_step_4k_pages"] = lambda: decode(plain_compiled)
        if compiled is not None:
            runs["compiled_step"] = lambda: decode(compiled)
            gemvs = [m for m in compiled.lm.modules() if isinstance(m, InductorGemvLinear)]
            if gemvs:  # the compiled step's GEMVs alone, one graph of the token's 73
                every = compile_step(
                    lambda xs: [m(x) for m, x in zip(gemvs, xs, strict=True)], compiled.device
                )

                def compiled_linears() -> float:
                    start = time.perf_counter()
                    for _ in range(args.tokens):
                        every(inputs)
                    return (time.perf_counter() - start) * 1000 / args.tokens

                runs["compiled_linears"] = compiled_linears
            logits = first_logits(compiled)
            result["compiled_max_abs_logit_diff"] = (logits - before).abs().max().item()
            problem = compiled_step_problem(logits, before, torch.float32)  # the load check's
            assert problem is None, problem
        for run in runs.values():
            run()  # warm-up
        rounds = []
        for _ in range(args.rounds):
            reads = measure.read_bandwidths(iters=5)
            row = {"read_gb_s": reads["4k_pages"]}
            row |= {"read_huge_pages_gb_s": reads["huge_pages"]} if "huge_pages" in reads else {}
            row.update({name: run() for name, run in runs.items()})
            best = max(row["read_gb_s"], row.get("read_huge_pages_gb_s", 0.0))
            for name, nbytes in (("step", weights + kv), ("linears", linear_bytes),
                                 ("compiled_step", weights + kv),
                                 ("compiled_linears", linear_bytes),
                                 ("step_4k_pages", weights + kv),
                                 ("compiled_step_4k_pages", weights + kv)):  # fmt: skip
                if name in row:
                    row[f"{name}_share_of_read"] = nbytes / row[name] / 1e6 / best
            rounds.append(row)
            print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
        # the product's modules are back: the step computes what it did before the hollowing
        assert torch.equal(first_logits(), before), "the decode step changed during the split"
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    median["attention"] = median["outside_linears"] - median["outside_linears_no_attention"]
    result.update(
        bytes_per_token={"weights": weights, "live_kv": kv, "linear_weights": linear_bytes},
        rounds=rounds, median=median, load_average_end=os.getloadavg()[0],
        machine=measure.machine_facts("cpu"),
    )  # fmt: skip
    print(json.dumps({k: round(v, 3) for k, v in median.items()}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
