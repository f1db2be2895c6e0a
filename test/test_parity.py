"""Parity of the core with an independent reference (test/reference_vlm.py), for every layout.

The reference shares nothing with vlm_ros: its own tensor reading and key table, transformers'
image processors + expand2square, the `tokenizers` library, torch.cat splicing and
``PhiForCausalLM.generate``. The core must produce the SAME greedy tokens and, at every step,
logits within the tolerance below. Perturbation tests then break one family fact at a time
(pad colour and image-token count here; the others in test_family_facts.py) and show the
comparison catches it on the logits.

Tolerances (max |logit difference| over all steps; logits of the tiny models are O(1)):
  fp32 CPU: 1e-4   (same kernels on the same inputs: differences are reduction-order noise)
  fp16 / bf16 CUDA: 2e-2 / 6e-2   (same kernels and dtype on both sides; half-precision noise)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_vlm import build_reference, run_reference
from safetensors.torch import load_file, save_file
from tiny_models import copy_tiny_checkpoint, tiny_checkpoint

from vlm_ros.config import GenerationConfig, RuntimeConfig
from vlm_ros.infer.pipeline import Assistant
from vlm_ros.model.families import ImageProcessing

QUESTION = "Is the path ahead clear?"
NEW_TOKENS = 12
ATOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
# layout id -> (family, write_tiny_checkpoint options)
LAYOUTS = {
    "llava_phi": ("llava_phi", {}),
    "llava_phi-fused_qkv": ("llava_phi", {"fused_qkv": True}),
    "llava_phi-bin": ("llava_phi", {"safetensors": False}),
    "llava_phi-sharded": ("llava_phi", {"sharded": True}),
    "mipha_phi": ("mipha_phi", {}),
    "tiny_llava_phi": ("tiny_llava_phi", {}),
    "tinyllava": ("tinyllava", {}),
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.fixture(scope="module")
def checkpoints():
    """Shared tiny checkpoints (test/tiny_models.py), written once per session on first use."""

    def get(layout: str) -> Path:
        family, options = LAYOUTS[layout]
        return tiny_checkpoint(family, seed=1, **options)

    return get


@pytest.fixture(scope="module")
def image():
    """Not square, so pad-to-square (and its colour) matters."""
    return np.random.default_rng(3).integers(0, 256, (30, 52, 3), dtype=np.uint8)


def parity_problems(trace, ref, atol: float) -> list[str]:
    """Every way the core's run differs from the reference's (empty list: parity)."""
    problems = []
    if not torch.equal(trace.pixel_values.cpu().float(), ref.pixels.float()):
        problems.append("pixel values differ")
    if trace.prompt_ids != ref.ids:
        problems.append(f"prompt ids differ: {trace.prompt_ids} vs {ref.ids}")
    if trace.image_embeds.shape != ref.image_embeds.shape:
        problems.append(f"image tokens {trace.image_embeds.shape} vs {ref.image_embeds.shape}")
    ref_tokens, eot = ref.tokens, ref.tokens[-1:] == [trace.eot]
    expected = ref_tokens[:-1] if eot else ref_tokens
    if list(trace.answer.token_ids) != expected:
        problems.append(f"tokens differ: {list(trace.answer.token_ids)} vs {expected}")
    if trace.answer.stop_reason != ("eos" if eot else "max_new_tokens"):
        problems.append(f"stop reason {trace.answer.stop_reason}, reference eos={eot}")
    steps = min(len(trace.step_logits), len(ref.logits))
    if steps == 0 or trace.step_logits.shape[1:] != ref.logits.shape[1:]:
        problems.append(f"logits shapes {trace.step_logits.shape} vs {ref.logits.shape}")
        return problems
    diff = (trace.step_logits[:steps].cpu() - ref.logits[:steps].cpu()).abs().amax(dim=1)
    if diff.max() > atol:
        problems.append(f"logits differ: max |diff| per step {diff.tolist()} > {atol}")
    return problems


def run_both(directory, image, device="cpu", dtype=torch.float32, runtime=None):
    runtime = runtime or RuntimeConfig(device=device, dtype=str(dtype).removeprefix("torch."))
    assistant = Assistant.load(str(directory), runtime)
    try:
        trace = assistant.trace(image, QUESTION, max_new_tokens=NEW_TOKENS)
        trace.eot = assistant.stop_token_id
    finally:
        assistant.close()
    ref = run_reference(build_reference(directory, dtype, device), image, QUESTION, NEW_TOKENS)
    return trace, ref


def first_step_gap(trace, ref) -> float:
    return (trace.step_logits[0].cpu() - ref.logits[0].cpu()).abs().max().item()


def test_parity_fused_phi_attention(tmp_path, image):
    """LLaVA-Phi saved by transformers 4.36: Phi attention as one query_key_value whose output
    is viewed as [batch, seq, heads, 3, head_dim] (q, k, v interleaved per head). Fused here,
    from the separate q/k/v of a tiny checkpoint, Phi layers only (4.36's CLIP kept q/k/v)."""
    directory = copy_tiny_checkpoint("llava_phi", tmp_path / "fused", seed=1)
    heads = json.loads((directory / "config.json").read_text())["num_attention_heads"]
    weights = load_file(str(directory / "model.safetensors"))
    for name in [n for n in weights if n.startswith("model.layers.") and ".q_proj." in n]:
        parts = [weights.pop(name.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        per_head = [p.reshape(heads, -1, *p.shape[1:]) for p in parts]  # [heads, hd, (in)]
        fused = torch.stack(per_head, dim=1).reshape(-1, *parts[0].shape[1:])
        weights[name.replace("q_proj", "query_key_value")] = fused.contiguous()
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})

    trace, ref = run_both(directory, image)
    assert parity_problems(trace, ref, ATOL[torch.float32]) == []


def test_parity_stops_at_endoftext(tmp_path, image):
    """Raise <|endoftext|>'s lm_head bias just enough that greedy emits it after a few tokens:
    core and reference must stop there (this config's eos_token_id is 2, not <|endoftext|>)."""
    directory = copy_tiny_checkpoint("llava_phi", tmp_path / "eos", seed=1)
    assert json.loads((directory / "config.json").read_text())["eos_token_id"] == 2
    with Assistant.load(str(directory)) as assistant:
        eot = assistant.stop_token_id
        logits = assistant.trace(image, QUESTION, max_new_tokens=NEW_TOKENS).step_logits
    gaps = logits.max(dim=1).values - logits[:, eot]  # [T]: how far eot is from the argmax
    weights = load_file(str(directory / "model.safetensors"))
    weights["lm_head.bias"][eot] += gaps[3:].min() + 1e-3
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})

    trace, ref = run_both(directory, image)
    assert trace.answer.stop_reason == "eos" and ref.tokens[-1] == eot
    assert len(trace.answer.token_ids) < NEW_TOKENS
    assert parity_problems(trace, ref, ATOL[torch.float32]) == []


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parity_fp32_cpu(layout, checkpoints, image):
    trace, ref = run_both(checkpoints(layout), image)
    assert len(trace.answer.token_ids) >= 2, "too short to compare decoding steps"
    assert parity_problems(trace, ref, ATOL[torch.float32]) == []


@pytest.mark.parametrize("family", ["llava_phi", "mipha_phi", "tiny_llava_phi", "tinyllava"])
def test_parity_eager_decoder(family, checkpoints, image):
    """The default decoder is the static-cache one; the eager (DynamicCache) reference decoder
    must match the reference too."""
    runtime = RuntimeConfig(decoder="eager")
    trace, ref = run_both(checkpoints(family), image, runtime=runtime)
    assert parity_problems(trace, ref, ATOL[torch.float32]) == []


def test_image_token_counts(checkpoints, image):
    """9 patches at toy scale: CLIP keeps 9 (CLS dropped), SigLIP 9, Factory drops one -> 8,
    as 576 / 729 / 728 at full scale."""
    counts = {}
    for layout in ("llava_phi", "mipha_phi", "tiny_llava_phi", "tinyllava"):
        with Assistant.load(str(checkpoints(layout))) as assistant:
            counts[layout] = assistant.encoder.num_image_tokens
    assert counts == {"llava_phi": 9, "mipha_phi": 9, "tiny_llava_phi": 9, "tinyllava": 8}


# ---- the parity test has teeth ----------------------------------------------------------------


def _assert_caught(trace, ref):
    problems = parity_problems(trace, ref, ATOL[torch.float32])
    assert problems, "the perturbation went unnoticed"
    # on the logits, never on shapes (a changed image-token count changes shapes by itself)
    assert first_step_gap(trace, ref) > 100 * ATOL[torch.float32]


@pytest.mark.parametrize("layout", ["llava_phi", "mipha_phi"])
def test_wrong_pad_colour_is_caught(layout, checkpoints, image, monkeypatch):
    monkeypatch.setattr(ImageProcessing, "pad_color", property(lambda self: (0, 0, 0)))
    trace, ref = run_both(checkpoints(layout), image)
    assert "pixel values differ" in parity_problems(trace, ref, ATOL[torch.float32])
    _assert_caught(trace, ref)


@pytest.mark.parametrize("layout", ["llava_phi", "tinyllava", "mipha_phi"])
def test_wrong_token_count_is_caught(layout, checkpoints, image):
    """Keep CLIP's CLS / the Factory's first patch, or drop Mipha's first patch."""
    directory = checkpoints(layout)
    with Assistant.load(str(directory)) as assistant:
        flipped = not assistant.family.drop_first_token
    runtime = RuntimeConfig(drop_first_patch=flipped)
    trace, ref = run_both(directory, image, runtime=runtime)
    assert trace.image_embeds.shape[1] != ref.image_embeds.shape[1]
    _assert_caught(trace, ref)


# ---- sampling and dtypes ----------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(checkpoints, image):
    with Assistant.load(str(checkpoints("llava_phi"))) as assistant:

        def sampled(seed):
            config = GenerationConfig(do_sample=True, temperature=1.5, top_k=50, seed=seed)
            return assistant.answer(image, QUESTION, max_new_tokens=8, generation=config)

        first = sampled(7)
        assert sampled(7).token_ids == first.token_ids
        others = {sampled(seed).token_ids for seed in (8, 9, 10)}
        assert others != {first.token_ids}, "different seeds all gave the same sample"
        greedy = assistant.answer(image, QUESTION, max_new_tokens=8)
        assert assistant.answer(image, QUESTION, max_new_tokens=8).token_ids == greedy.token_ids


@pytest.mark.parametrize("layout", ["llava_phi", "mipha_phi"])
def test_cpu_bf16_runs_close_to_fp32(layout, checkpoints, image):
    """bf16 on CPU runs and its first-step logits track fp32's: correlation >= 0.99 and max
    |difference| <= 15% of max |logit| (measured on the tiny models: correlation 0.996-0.9999,
    1-9%; bf16 keeps ~3 significant digits and the tiny models' wide random weights amplify
    rounding, so greedy tokens may differ from fp32 on near-ties and are not compared)."""
    directory = str(checkpoints(layout))
    first = {}
    for dtype in ("float32", "bfloat16"):
        with Assistant.load(directory, RuntimeConfig(dtype=dtype)) as assistant:
            trace = assistant.trace(image, QUESTION, max_new_tokens=2)
            assert len(trace.answer.token_ids) == 2
            first[dtype] = trace.step_logits[0]
    fp32, bf16 = first["float32"], first["bfloat16"]
    assert torch.isfinite(bf16).all()
    assert torch.corrcoef(torch.stack([fp32, bf16]))[0, 1] >= 0.99
    assert (bf16 - fp32).abs().max() <= 0.15 * fp32.abs().max()


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parity_cuda(layout, dtype, checkpoints, image):
    trace, ref = run_both(checkpoints(layout), image, device="cuda", dtype=dtype)
    assert parity_problems(trace, ref, ATOL[dtype]) == []
