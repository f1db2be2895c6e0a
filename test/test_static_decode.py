"""Static-KV-cache decoder: identical greedy tokens (and near-identical logits) to the eager
reference on every tiny layout, equal action-hint scores, the cache allocated once, overflow
refused. Everything here runs on CPU; the CUDA-graph variant runs where a GPU exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, tiny_checkpoint

from vlm_ros.config import RuntimeConfig
from vlm_ros.engines import cpu_kernels
from vlm_ros.errors import ContextOverflowError
from vlm_ros.infer.pipeline import Assistant
from vlm_ros.infer.static_decode import StaticDecoder

QUESTIONS = ["Is the path ahead clear?", "What should the robot do?"]
ACTIONS = ["continue", "slow_down", "stop", "turn_left", "turn_right"]
LOGIT_ATOL = 1e-4  # fp32: the two caches differ only in attention's summation length


def _images(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, 256, (40 + 7 * i, 52, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    path = str(tiny_checkpoint(request.param))
    eager = Assistant.load(path, runtime=RuntimeConfig(decoder="eager"))
    static = Assistant.load(path, runtime=RuntimeConfig(decoder="static", max_seq_len=256))
    yield eager, static
    eager.close()
    static.close()


def test_static_tokens_identical_to_eager(pair):
    eager, static = pair
    assert isinstance(static.decoder, StaticDecoder)
    for image in _images():
        for question in QUESTIONS:
            a = eager.trace(image, question, max_new_tokens=12)
            b = static.trace(image, question, max_new_tokens=12)
            assert b.answer.token_ids == a.answer.token_ids
            assert b.answer.stop_reason == a.answer.stop_reason
            torch.testing.assert_close(b.step_logits, a.step_logits, atol=LOGIT_ATOL, rtol=0)


def test_static_action_hint_scores_equal_eager(pair):
    eager, static = pair
    for image in _images(2):
        a = eager.rank(image, QUESTIONS[1], ACTIONS)
        b = static.rank(image, QUESTIONS[1], ACTIONS)
        assert b.chosen == a.chosen
        np.testing.assert_allclose(b.log_likelihoods, a.log_likelihoods, atol=1e-4, rtol=0)


def _branches_both_ways(decoder: StaticDecoder, prefix: torch.Tensor, tokens, mask):
    decoder.prefill(prefix)
    packed = decoder.score_branches(tokens, mask)
    decoder.prefill(prefix)
    expanded = decoder._score_expanded(tokens, mask)
    decoder.reset()
    return packed, expanded


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_branches_equal_the_expanded_cache(pair, attention):
    """The packed tree-masked pass (prefix read in place) gives the logits of the expanded
    per-branch cache, with transformers' sdpa and eager attention alike; padding rows are 0."""
    _, static = pair
    lm = static.decoder.lm
    before = lm.config._attn_implementation
    lm.set_attn_implementation(attention)
    try:
        decoder = StaticDecoder(lm, max_seq_len=64)
        generator = torch.Generator().manual_seed(3)
        prefix = torch.randn(1, 20, lm.config.hidden_size, generator=generator)
        tokens = torch.randint(0, 100, (4, 5), generator=generator)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
        with torch.inference_mode():
            packed, expanded = _branches_both_ways(decoder, prefix, tokens, mask)
    finally:
        lm.set_attn_implementation(before)
    wanted = mask.bool()
    torch.testing.assert_close(packed[wanted], expanded[wanted], atol=LOGIT_ATOL, rtol=0)
    assert packed[~wanted].abs().max() == 0


def test_branches_fall_back_when_the_cache_is_nearly_full(pair, monkeypatch):
    _, static = pair
    decoder = StaticDecoder(static.decoder.lm, max_seq_len=24)
    called = []
    real = decoder._score_expanded
    monkeypatch.setattr(decoder, "_score_expanded", lambda t, m: called.append(1) or real(t, m))
    prefix = torch.randn(1, 20, static.decoder.lm.config.hidden_size)
    tokens, mask = torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)
    with torch.inference_mode():
        decoder.prefill(prefix)
        logits = decoder.score_branches(tokens, mask)  # 6 packed tokens > 4 free slots
    assert called and logits.shape[:2] == (3, 2) and torch.isfinite(logits).all()


def test_static_answer_after_rank_unchanged(pair):
    """Ranking must leave the static cache usable: the next answer equals a fresh one."""
    eager, static = pair
    image = _images(1)[0]
    static.rank(image, QUESTIONS[1], ACTIONS)
    assert (
        static.answer(image, QUESTIONS[0], 8).token_ids
        == eager.answer(image, QUESTIONS[0], 8).token_ids
    )


def test_cache_allocated_once_and_reused(pair):
    _, static = pair
    decoder = static.decoder
    keys = decoder.cache.layers[0].keys
    assert keys.shape[2] == 256
    pointer = keys.data_ptr()
    static.answer(_images(1)[0], QUESTIONS[0], 4)
    static.answer(_images(1)[0], QUESTIONS[1], 4)
    assert decoder.cache.layers[0].keys.data_ptr() == pointer


def test_static_overflow_is_refused():
    path = str(tiny_checkpoint("llava_phi"))
    with Assistant.load(path, runtime=RuntimeConfig(decoder="static", max_seq_len=64)) as a:
        with pytest.raises(ContextOverflowError):
            a.answer(_images(1)[0], QUESTIONS[0], max_new_tokens=200)


def _replaying(step):
    """What a CUDA graph does to its outputs: every call writes into one and the same buffer."""
    buffer: list[torch.Tensor] = []

    def replay(token, position):
        out = step(token, position)
        if not buffer:
            buffer.append(torch.empty_like(out))
        return buffer[0].copy_(out)

    return replay


@pytest.mark.parametrize("copied", [True, False], ids=["copied", "negative-control"])
def test_kept_step_logits_survive_the_next_replay(pair, copied):
    """A compiled (CUDA-graph) step's logits are overwritten by the next step; generate copies
    them where it keeps them (reuses_outputs), so trace()'s per-step logits (and the bench's)
    stay right. Uncopied, the kept logits all read as the last step's: the control shows the
    check can fail."""
    eager, static = pair
    image = _images(1)[0]
    reference = eager.trace(image, QUESTIONS[0], max_new_tokens=8)
    assert len(reference.answer.token_ids) >= 3  # at least two decode steps to tell apart
    decoder = static.decoder
    saved = decoder._step, decoder.reuses_outputs, decoder._fast
    decoder._step, decoder.reuses_outputs = _replaying(decoder._decode_step), copied
    decoder._fast = None  # compiled, the step is transformers' forward in the graph
    try:
        kept = static.trace(image, QUESTIONS[0], max_new_tokens=8).step_logits
    finally:
        decoder._step, decoder.reuses_outputs, decoder._fast = saved
    same = torch.allclose(kept, reference.step_logits, atol=LOGIT_ATOL, rtol=0)
    assert same == copied


def test_decode_step_traces_as_one_graph():
    """torch.compile(mode="reduce-overhead") captures one CUDA graph per graph it traces: a
    graph break in the decode step would split it and put Python back between the pieces on
    every token. Tracing needs no GPU, so CI checks the step is one graph with no break."""
    path = str(tiny_checkpoint("llava_phi"))
    with Assistant.load(path, runtime=RuntimeConfig(decoder="static", max_seq_len=64)) as a:
        decoder = a.decoder
        with torch.inference_mode():
            decoder.prefill(torch.randn(1, 9, a.model.text_config.hidden_size))
            explained = torch._dynamo.explain(decoder._decode_step)(
                torch.tensor([[5]]), torch.tensor([decoder.length])
            )
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_decode_on_cpu_with_the_default_linear_kernels():
    """compile_decode on CPU with cpu_linear left at auto (once it crashed at the first answer:
    inductor could not lower the oneDNN Linear the uncompiled path swaps in): on an AMD CPU
    the step's GEMVs are inductor's own (InductorGemvLinear), elsewhere torch's Linear for
    inductor to lower; tokens as the uncompiled static decoder's. The step is compiled at
    load: answering afterwards compiles no frame."""
    path = str(tiny_checkpoint("llava_phi"))
    image = _images(1)[0]
    runtime = RuntimeConfig(decoder="static", max_seq_len=256)
    with Assistant.load(path, runtime=runtime) as plain:
        reference = plain.answer(image, QUESTIONS[0], 6).token_ids
    runtime = RuntimeConfig(decoder="static", compile_decode=True, max_seq_len=256)
    with Assistant.load(path, runtime=runtime) as compiled:
        kinds = {type(m).__name__ for m in compiled.decoder.lm.modules()}
        amd = cpu_kernels.cpu_vendor() in cpu_kernels.AMD_VENDORS
        assert ("InductorGemvLinear" in kinds) == amd and "OneDnnLinear" not in kinds, kinds
        # compiled at load (StaticDecoder.warm_up), so the first answer compiles nothing
        frames = dict(torch._dynamo.utils.counters["frames"])
        assert frames.get("ok", 0) >= 1, frames
        assert compiled.decoder.compiled and compiled.decoder.compile_refused is None
        assert compiled.decoder.length == 0 and compiled.decoder.forward_calls == 0
        assert compiled.answer(image, QUESTIONS[0], 6).token_ids == reference
        assert dict(torch._dynamo.utils.counters["frames"]) == frames


@pytest.mark.parametrize("cpu_linear", ["inductor", "onednn"])
def test_compiled_decode_on_the_other_linear_kernels(cpu_linear):
    """Compiled with cpu_linear 'inductor' (the step's GEMVs written by inductor, on any CPU)
    or 'onednn' (oneDNN through an opaque op; x86 only), the step passes its load check and
    answers with the uncompiled decoder's tokens; the model's own modules stay as loaded."""
    if cpu_linear == "onednn" and not cpu_kernels.onednn_linear_available():
        pytest.skip("oneDNN's linear exists on x86-64 builds of torch only")
    path = str(tiny_checkpoint("llava_phi"))
    image = _images(1)[0]
    with Assistant.load(path, runtime=RuntimeConfig(max_seq_len=256)) as plain:
        reference = plain.answer(image, QUESTIONS[0], 6).token_ids
    runtime = RuntimeConfig(compile_decode=True, max_seq_len=256, cpu_linear=cpu_linear)
    with Assistant.load(path, runtime=runtime) as compiled:
        decoder = compiled.decoder
        expected = {"inductor": "InductorGemvLinear", "onednn": "OneDnnLinear"}[cpu_linear]
        assert any(type(m).__name__ == expected for m in decoder.lm.modules())
        assert not any(type(m).__name__ == expected for m in compiled.model.modules())
        assert decoder.compiled and decoder.compile_refused is None
        assert compiled.answer(image, QUESTIONS[0], 6).token_ids == reference


@pytest.mark.parametrize("wrong", ["off", "nan", "fails"])
def test_a_compiled_step_that_disagrees_is_refused_at_load(monkeypatch, caplog, wrong):
    """A compiled step whose logits are not the uncompiled step's (a miscompile, or code from
    inductor's cache built for another instruction set: test_compile_cache.py), or
    whose compile fails, is not served: the decoder says why (compile_refused, a warning
    naming it) and answers with the uncompiled lean step, the same tokens as a decoder never
    asked to compile."""
    from vlm_ros.infer import static_decode

    def broken(x):
        raise RuntimeError("C++ compile failed: no compiler\n(long inductor log)")

    def miscompiled(step, device):
        bad = {"off": lambda x: x * 2.0, "nan": lambda x: x * float("nan"), "fails": broken}
        return lambda token, position: bad[wrong](step(token, position))

    monkeypatch.setattr(static_decode, "compile_step", miscompiled)
    path = str(tiny_checkpoint("llava_phi"))
    image = _images(1)[0]
    with Assistant.load(path, runtime=RuntimeConfig(decoder="static", max_seq_len=256)) as a:
        reference = a.answer(image, QUESTIONS[0], 6).token_ids
    runtime = RuntimeConfig(decoder="static", compile_decode=True, max_seq_len=256)
    with caplog.at_level("WARNING"), Assistant.load(path, runtime=runtime) as refused:
        decoder = refused.decoder
        assert not decoder.compiled and not decoder.reuses_outputs
        assert decoder._fast is not None  # the lean step serves
        expected = {
            "off": "differ from the uncompiled step's",
            "nan": "non-finite",
            "fails": "compiling the decode step failed: RuntimeError: C++ compile failed",
        }[wrong]
        assert expected in decoder.compile_refused and "inductor log" not in decoder.compile_refused
        assert decoder.length == 0 and decoder.forward_calls == 0
        assert refused.answer(image, QUESTIONS[0], 6).token_ids == reference
    assert any("serving the uncompiled step" in r.getMessage() for r in caplog.records)


def test_cache_write_counter_follows_the_decoder_length(pair):
    """transformers 5.x places new keys/values by the cache's own counter, not by the
    cache_position passed in: it must equal the decoder's length after prefill, decode steps
    and a rank followed by a new request."""
    _, static = pair
    decoder = static.decoder

    def counter() -> int | None:
        layer = decoder.cache.layers[0]
        held = getattr(layer, "cumulative_length", None)  # transformers 5.x
        return None if held is None else int(held)

    image = _images(1)[0]
    static.rank(image, QUESTIONS[1], ACTIONS)
    with torch.inference_mode():
        decoder.prefill(torch.randn(1, 11, static.model.text_config.hidden_size))
        assert counter() in (None, 11) and decoder.length == 11
        for _ in range(3):
            decoder.decode_one_token(torch.tensor([[7]]))
        assert counter() in (None, 14) and decoder.length == 14


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
)
def test_cuda_graph_decode_tokens_identical():
    path = str(tiny_checkpoint("llava_phi"))
    eager = Assistant.load(path, runtime=RuntimeConfig(device="cuda", dtype="float32"))
    fast = Assistant.load(
        path,
        runtime=RuntimeConfig(
            device="cuda", dtype="float32", decoder="static", compile_decode=True, max_seq_len=256
        ),
    )
    for image in _images():
        a, b = eager.trace(image, QUESTIONS[0], 12), fast.trace(image, QUESTIONS[0], 12)
        assert b.answer.token_ids == a.answer.token_ids
        # every kept step's logits, read after later replays (outputs copied out of the graph)
        torch.testing.assert_close(b.step_logits, a.step_logits, atol=LOGIT_ATOL, rtol=0)


NEEDS_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"
)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_packed_branches_equal_the_expanded_cache(dtype):
    """The tree-masked packed pass on CUDA (sdpa kernels with an additive mask, bf16's
    finfo.min): the same logits as the expanded per-branch cache, padding rows 0."""
    path = str(tiny_checkpoint("llava_phi"))
    runtime = RuntimeConfig(device="cuda", dtype=dtype, decoder="static", max_seq_len=64)
    with Assistant.load(path, runtime=runtime) as a:
        decoder = a.decoder
        generator = torch.Generator().manual_seed(3)
        prefix = torch.randn(1, 20, a.model.text_config.hidden_size, generator=generator)
        tokens = torch.randint(0, 100, (4, 5), generator=generator).cuda()
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
        with torch.inference_mode():
            packed, expanded = _branches_both_ways(decoder, prefix.cuda(), tokens, mask.cuda())
    wanted = mask.bool().cuda()
    assert torch.isfinite(packed[wanted]).all()
    scale = expanded[wanted].abs().max()
    limit = LOGIT_ATOL if dtype == "float32" else 3e-2 * float(scale)  # bf16: summation order
    torch.testing.assert_close(packed[wanted], expanded[wanted], atol=limit, rtol=0)
    assert packed[~wanted].abs().max() == 0


@pytest.mark.gpu
@NEEDS_CUDA
def test_cuda_static_action_hint_scores_equal_eager():
    path = str(tiny_checkpoint("mipha_phi"))
    cuda = {"device": "cuda", "dtype": "float32"}
    eager = Assistant.load(path, runtime=RuntimeConfig(decoder="eager", **cuda))
    static = Assistant.load(path, runtime=RuntimeConfig(decoder="static", max_seq_len=256, **cuda))
    try:
        for image in _images(2):
            a = eager.rank(image, QUESTIONS[1], ACTIONS)
            b = static.rank(image, QUESTIONS[1], ACTIONS)
            assert b.chosen == a.chosen
            np.testing.assert_allclose(b.log_likelihoods, a.log_likelihoods, atol=1e-3, rtol=0)
    finally:
        eager.close()
        static.close()


def test_no_deprecated_cache_argument(pair):
    """transformers 5.2x renamed past_key_values to cache (removed in 5.40): both decoders use
    whichever name the installed PhiForCausalLM takes, so nothing warns."""
    import warnings

    eager, static = pair
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for assistant in pair:
            assistant.answer(_images(1)[0], QUESTIONS[0], 3)
            assistant.rank(_images(1)[0], QUESTIONS[1], ACTIONS)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_dynamic_int8_frees_the_float32_weights_at_once():
    """quantize='int8' swaps every Linear for torch.ao's int8 one; the float32 modules it
    drops sit in reference cycles. Loading must free them, not leave them to a full collection
    a serving process may not run for hours (llava-phi-full: 15.1 GiB resident instead of 5.3).
    The cyclic collector is off here, so only the loader's own collection can free them."""
    import gc
    import weakref

    from transformers import PhiConfig, PhiForCausalLM

    from vlm_ros.infer.decode import make_decoder

    config = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    lm = PhiForCausalLM(config).eval()
    weights = [weakref.ref(m.weight) for m in lm.modules() if type(m) is torch.nn.Linear]
    assert len(weights) == 13  # 6 per layer and the head
    gc.disable()
    try:
        decoder = make_decoder(lm, RuntimeConfig(quantize="int8", max_seq_len=32))
        alive = [ref for ref in weights if ref() is not None]
    finally:
        gc.enable()
    assert isinstance(decoder, StaticDecoder)
    assert not alive, f"{len(alive)} float32 Linear weights still alive after loading"


def test_dynamic_int8_picks_qnnpack_on_arm_and_keeps_the_default_elsewhere(monkeypatch):
    """torch 2.13's aarch64 wheel defaults to the x86 quantized engine, which cannot pack
    weights on Arm ("unknown architecure"): dynamic int8 asks for QNNPACK there, leaves x86
    hosts on torch's default, and an Arm torch without QNNPACK is refused by name at load.
    (The Arm run itself: scripts/arm64-emulated-check.sh, bench/results/arm64-qemu-tests.json.)"""
    from vlm_ros.errors import InputError
    from vlm_ros.infer import static_decode
    from vlm_ros.infer.static_decode import check_quantize, int8_engine

    default = torch.backends.quantized.engine
    assert int8_engine("x86_64") == default
    assert int8_engine("aarch64") == "qnnpack" and int8_engine("arm64") == "qnnpack"
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    monkeypatch.setattr(static_decode, "quantized_engines", lambda: ["x86", "none"])
    with pytest.raises(InputError, match="QNNPACK"):
        check_quantize("int8", torch.device("cpu"), torch.float32)
