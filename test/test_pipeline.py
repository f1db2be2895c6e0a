"""Assistant API behaviour on tiny checkpoints: results, timings, stop rules, streaming, errors,
action ranking (against one-by-one scoring) and its cost."""

from __future__ import annotations

import contextlib
import threading
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_checkpoint

from vlm_ros.config import GenerationConfig, ImageLimits, RuntimeConfig
from vlm_ros.errors import ContextOverflowError, InputError, VlmError
from vlm_ros.infer import pipeline
from vlm_ros.infer.decode import sample, splice_image
from vlm_ros.infer.pipeline import Assistant, NonFiniteLogitsError, _TextStream
from vlm_ros.infer.prompt import check_context, encode_text
from vlm_ros.infer.ranking import candidate_ids
from vlm_ros.model.families import IMAGE_TOKEN_INDEX
from vlm_ros.types import REMOTE_STAGES, STAGES, TIMING_NAMES

QUESTION = "Is the path ahead clear?"
ACTIONS = ["continue", "slow_down", "stop", "turn_left", "turn_right", "wait here a moment"]


@pytest.fixture(scope="module")
def assistant():
    with Assistant.load(str(tiny_checkpoint("llava_phi"))) as a:
        yield a


@pytest.fixture(scope="module")
def mipha():
    with Assistant.load(str(tiny_checkpoint("mipha_phi"))) as a:
        yield a


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(5).integers(0, 256, (36, 48, 3), dtype=np.uint8)


def _force_token_on_call(monkeypatch, assistant, token_id: int, call: int) -> None:
    """Make the decoder's ``call``-th decode_one_token produce ``token_id`` (greedy)."""
    real = assistant.decoder.decode_one_token
    calls = [0]

    def forced(token):
        logits = real(token)
        calls[0] += 1
        if calls[0] == call:
            logits = logits.clone()
            logits[:, token_id] = logits.max() + 10.0
        return logits

    monkeypatch.setattr(assistant.decoder, "decode_one_token", forced)


# ---- answer ---------------------------------------------------------------------------------


def test_answer_returns_text_ids_and_timings(assistant, image):
    answer = assistant.answer(image, QUESTION, max_new_tokens=6)
    assert isinstance(answer.text, str)
    assert len(answer.token_ids) == 6 and answer.stop_reason == "max_new_tokens"
    assert answer.prompt_tokens > 0
    ms = answer.timings.as_dict()
    assert set(ms) == set(TIMING_NAMES)
    assert all(ms[s] == 0 for s in REMOTE_STAGES), ms  # a local model: no wire
    assert all(ms[s] > 0 for s in STAGES), ms
    assert ms["total"] >= sum(ms[s] for s in STAGES if s != "total")
    assert answer.tokens_per_second > 0
    assert assistant.family.name == "llava_phi"


def test_answer_and_trace_take_the_same_path(assistant, image):
    trace = assistant.trace(image, QUESTION, max_new_tokens=5)
    assert trace.answer.token_ids == assistant.answer(image, QUESTION, max_new_tokens=5).token_ids
    assert trace.step_logits.shape[0] == 5
    assert trace.inputs_embeds.shape[1] == len(trace.prompt_ids) - 1 + 9


def test_stops_at_endoftext_not_config_eos(mipha, image, monkeypatch):
    """Mipha's config says eos 2; only <|endoftext|> stops, wherever it comes."""
    assert mipha.loaded.config["eos_token_id"] == 2 and mipha.stop_token_id != 2
    _force_token_on_call(monkeypatch, mipha, mipha.stop_token_id, call=3)
    answer = mipha.answer(image, QUESTION, max_new_tokens=10)
    assert answer.stop_reason == "eos"
    assert len(answer.token_ids) == 3  # prefill's token + 2 decoded; the stop token excluded
    assert mipha.stop_token_id not in answer.token_ids


def test_config_eos_does_not_stop(mipha, image, monkeypatch):
    _force_token_on_call(monkeypatch, mipha, 2, call=1)
    answer = mipha.answer(image, QUESTION, max_new_tokens=4)
    assert answer.token_ids[1] == 2 and answer.stop_reason == "max_new_tokens"


class _OneBufferEncoder:
    """Wraps the real encoder and, as TensorRT does, writes every result into one buffer."""

    def __init__(self, inner):
        self.inner = inner
        self.num_image_tokens = inner.num_image_tokens
        self.buffer = None

    def encode(self, pixel_values, timer):
        embeds = self.inner.encode(pixel_values, timer)
        if self.buffer is None:
            self.buffer = torch.empty_like(embeds)
        return self.buffer.copy_(embeds)


def test_trace_keeps_its_image_features_when_the_encoder_reuses_a_buffer(
    assistant, image, monkeypatch
):
    """A TensorRT engine returns the same output tensor every call: a kept trace must hold
    its own copy, or the next request rewrites it."""
    monkeypatch.setattr(assistant, "encoder", _OneBufferEncoder(assistant.encoder))
    first = assistant.trace(image, QUESTION, max_new_tokens=1)
    kept = first.image_embeds.clone()
    assistant.trace(255 - image, QUESTION, max_new_tokens=1)
    assert not torch.equal(assistant.encoder.buffer, kept)  # the buffer did change (control)
    assert torch.equal(first.image_embeds, kept)


def test_max_new_tokens(assistant, image):
    for n in (1, 3):
        answer = assistant.answer(image, QUESTION, max_new_tokens=n)
        assert len(answer.token_ids) == n and answer.stop_reason == "max_new_tokens"
    for bad in (0, -1, 2.5):
        with pytest.raises(InputError, match="max_new_tokens"):
            assistant.answer(image, QUESTION, max_new_tokens=bad)


def test_deadline_in_the_past(assistant, image):
    answer = assistant.answer(image, QUESTION, deadline=time.monotonic() - 1.0)
    assert answer.stop_reason == "deadline" and len(answer.token_ids) <= 1


def test_deadline_during_decoding(assistant, image, monkeypatch):
    real = assistant.decoder.decode_one_token

    def slow(token):
        time.sleep(0.05)
        return real(token)

    monkeypatch.setattr(assistant.decoder, "decode_one_token", slow)
    answer = assistant.answer(image, QUESTION, max_new_tokens=64, deadline=time.monotonic() + 0.3)
    assert answer.stop_reason == "deadline" and len(answer.token_ids) < 64


def test_cancel(assistant, image):
    cancel = threading.Event()
    cancel.set()
    answer = assistant.answer(image, QUESTION, cancel=cancel)
    assert answer.stop_reason == "cancelled" and answer.token_ids == ()


def test_cancel_during_decoding(assistant, image, monkeypatch):
    """Cancel set while decoding stops the answer at the next token boundary."""
    cancel = threading.Event()
    real = assistant.decoder.decode_one_token

    def cancelling(token):
        cancel.set()  # e.g. the action client cancels while step 2 runs
        return real(token)

    monkeypatch.setattr(assistant.decoder, "decode_one_token", cancelling)
    answer = assistant.answer(image, QUESTION, max_new_tokens=20, cancel=cancel)
    assert answer.stop_reason == "cancelled" and len(answer.token_ids) == 2


def test_streaming_texts_grow_to_the_answer(assistant, image):
    texts: list[str] = []
    answer = assistant.answer(image, QUESTION, max_new_tokens=12, on_text=texts.append)
    assert texts and texts[-1] == answer.text
    for earlier, later in pairwise(texts):
        assert later.startswith(earlier) and later != earlier


def test_streaming_holds_back_incomplete_utf8(assistant):
    """Byte-level BPE splits "é" / "日" into byte tokens: no partial text shows U+FFFD."""
    tokenizer = assistant.tokenizer
    ids = encode_text(tokenizer, " café 日本 ok")
    assert len(ids) > len(" café 日本 ok".split())  # multi-byte characters span tokens
    texts: list[str] = []
    stream = _TextStream(tokenizer, texts.append)
    for i in range(1, len(ids) + 1):
        stream.push(ids[:i])
    assert stream.finish(ids) == "café 日本 ok" == texts[-1]
    assert not any("\ufffd" in t for t in texts)
    assert all(b.startswith(a) for a, b in pairwise(texts))


def test_color_orders_and_gray(assistant, image):
    rgb = assistant.answer(image, QUESTION, max_new_tokens=3).token_ids
    bgr = image[:, :, ::-1].copy()
    assert assistant.answer(bgr, QUESTION, max_new_tokens=3, color_order="bgr").token_ids == rgb
    gray = image[:, :, 0].copy()
    assert len(assistant.answer(gray, QUESTION, max_new_tokens=2).token_ids) == 2
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    assert assistant.answer(rgba, QUESTION, max_new_tokens=3).token_ids == rgb


# ---- errors ---------------------------------------------------------------------------------


def test_context_overflow_is_an_error_with_numbers(assistant, image):
    positions = assistant.max_positions  # the tiny config's max_position_embeddings
    with pytest.raises(ContextOverflowError) as info:
        assistant.answer(image, QUESTION, max_new_tokens=positions - 8)
    message = str(info.value)
    assert f"{positions - 8} new tokens" in message and f"> {positions} positions" in message
    assert "+ 9 image tokens" in message


def test_context_boundary():
    assert check_context(10, 9, 2030, 2048) == 18  # 9 text + 9 image + 2030 = 2048 fits
    with pytest.raises(ContextOverflowError, match="2049 > 2048"):
        check_context(10, 9, 2031, 2048)


def test_overflow_costs_no_model_time(assistant, image):
    calls = []
    hook = assistant.encoder.stage.embeddings.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ContextOverflowError):
            assistant.answer(image, QUESTION, max_new_tokens=assistant.max_positions)
        assert calls == []
        assistant.answer(image, QUESTION, max_new_tokens=2)  # control: the hook does see work
    finally:
        hook.remove()
    assert calls == [1]


@pytest.mark.parametrize(
    "question, words",
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        ("x" * 4001, "too long: 4001 characters"),
        (None, "must be a string"),
        ("two <image> images", "placeholder"),
    ],
)
def test_bad_questions(assistant, image, question, words):
    with pytest.raises(InputError, match=words):
        assistant.answer(image, question)
    with pytest.raises(InputError, match=words):
        assistant.rank(image, question, ACTIONS)


def test_question_limit_is_configurable(image):
    directory = str(tiny_checkpoint("llava_phi"))
    with Assistant.load(directory, limits=ImageLimits(max_question_chars=10)) as a:
        with pytest.raises(InputError, match="too long"):
            a.answer(image, "a question longer than ten")


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((36, 48, 3), np.float32), "dtype uint8"),
        (np.zeros((0, 48, 3), np.uint8), "empty"),
        (np.zeros((36, 48, 2), np.uint8), "channels"),
        (np.zeros((3, 3, 3), np.uint8), "too small"),
        ("image.png", "numpy uint8 array"),
    ],
)
def test_bad_images(assistant, bad, words):
    with pytest.raises(InputError, match=words):
        assistant.answer(bad, QUESTION)
    with pytest.raises(InputError, match=words):
        assistant.rank(bad, QUESTION, ACTIONS)


def test_bad_color_order(assistant, image):
    with pytest.raises(InputError, match="color_order"):
        assistant.answer(image, QUESTION, color_order="rgba")


# ---- rank -----------------------------------------------------------------------------------


def _score_alone(assistant, image, instruction: str, action: str) -> float:
    """One candidate, one full forward pass over prompt + answer (no cache, no padding)."""
    trace = assistant.trace(image, instruction, max_new_tokens=1)
    ids = candidate_ids(assistant.tokenizer, [action], assistant.stop_token_id)[0]
    lm = assistant.model.language_model
    with torch.inference_mode():
        answer = lm.get_input_embeddings()(torch.tensor([ids]))
        embeds = torch.cat([trace.inputs_embeds, answer], dim=1)
        logp = torch.log_softmax(lm(inputs_embeds=embeds).logits.float(), dim=-1)
    start = trace.inputs_embeds.shape[1] - 1  # the position predicting the first answer token
    return sum(logp[0, start + i, t].item() for i, t in enumerate(ids))


def test_rank_agrees_with_scoring_each_alone(assistant, image):
    instruction = "What should the robot do?"
    hint = assistant.rank(image, instruction, ACTIONS)
    lengths = {len(c) for c in candidate_ids(assistant.tokenizer, ACTIONS, 0)}
    assert len(lengths) > 1, "candidates of equal length would not exercise the padding"
    alone = [_score_alone(assistant, image, instruction, a) for a in ACTIONS]
    assert hint.log_likelihoods == pytest.approx(alone, abs=1e-4)


def test_rank_probabilities(assistant, image):
    hint = assistant.rank(image, "What should the robot do?", ACTIONS)
    assert hint.actions == tuple(ACTIONS)
    assert sum(hint.probabilities) == pytest.approx(1.0, abs=1e-9)
    assert all(0.0 <= p <= 1.0 for p in hint.probabilities)
    best = max(range(len(ACTIONS)), key=lambda i: hint.log_likelihoods[i])
    assert hint.chosen == ACTIONS[best] and hint.confidence == max(hint.probabilities)
    expected = torch.softmax(torch.tensor(hint.log_likelihoods, dtype=torch.float64), 0)
    assert hint.probabilities == pytest.approx(expected.tolist(), abs=1e-9)
    ms = hint.timings.as_dict()
    assert all(ms[s] > 0 for s in STAGES) and ms["total"] >= ms["prefill"] + ms["decode"]


def test_rank_costs_one_prefill_and_one_batched_pass(assistant, image):
    lm_calls, vision_calls = [], []
    hooks = [
        assistant.decoder.lm.register_forward_hook(  # the module tree the decoder runs
            lambda m, args, kwargs, out: lm_calls.append(
                (kwargs.get("inputs_embeds"), kwargs.get("input_ids"))
            ),
            with_kwargs=True,
        ),
        assistant.encoder.stage.embeddings.register_forward_hook(  # the vision stage's entry
            lambda *a: vision_calls.append(1)
        ),
    ]
    try:
        assistant.rank(image, "What should the robot do?", ACTIONS)
    finally:
        for h in hooks:
            h.remove()
    assert len(vision_calls) == 1
    assert len(lm_calls) == 2, f"{len(lm_calls)} decoder passes for {len(ACTIONS)} candidates"
    prefill, branches = lm_calls
    assert prefill[0].shape[0] == 1  # the image+prompt prefix, once, at batch 1
    # Every candidate in that one pass, each without its last token (never an input): the
    # static decoder packs them into one batch-1 sequence sharing the prefix's cache.
    cand = candidate_ids(assistant.tokenizer, ACTIONS, assistant.stop_token_id)
    assert tuple(branches[1].shape) == (1, sum(len(c) - 1 for c in cand))
    assert branches[1][0].tolist() == [t for c in cand for t in c[:-1]]


def test_rank_single_candidate(assistant, image):
    hint = assistant.rank(image, "What should the robot do?", ["stop"])
    assert hint.probabilities == (1.0,) and hint.chosen == "stop"


@pytest.mark.parametrize(
    "candidates, words",
    [
        ([], "empty"),
        (["stop", "stop"], "duplicate candidates: stop"),
        (["stop", ""], "empty"),
        (["stop", "  "], "empty"),
        ("stop", "list of strings"),
        (["stop", 3], "not a string"),
    ],
)
def test_bad_candidates(assistant, image, candidates, words):
    with pytest.raises(InputError, match=words):
        assistant.rank(image, "What should the robot do?", candidates)


def test_rank_after_answer_and_answer_after_rank(assistant, image):
    """Ranking leaves the decoder batch-expanded; the next answer must not see it."""
    first = assistant.answer(image, QUESTION, max_new_tokens=4).token_ids
    assistant.rank(image, "What should the robot do?", ACTIONS)
    assert assistant.answer(image, QUESTION, max_new_tokens=4).token_ids == first


# ---- decode verbs ---------------------------------------------------------------------------


def test_splice_checks_the_image_token_count():
    ids = [5, 6, IMAGE_TOKEN_INDEX, 7]
    embed = torch.nn.Embedding(10, 4)
    out = splice_image(ids, torch.zeros(1, 3, 4), embed, 3)
    assert out.shape == (1, 6, 4) and torch.equal(out[0, 2:5], torch.zeros(3, 4))
    with pytest.raises(VlmError, match="3 features for 5 image tokens"):
        splice_image(ids, torch.zeros(1, 3, 4), embed, 5)
    with pytest.raises(InputError, match="exactly one image placeholder"):
        splice_image([5, 6], torch.zeros(1, 3, 4), embed, 3)


def test_sample_modes():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    greedy = GenerationConfig()
    assert sample(logits, greedy).tolist() == [1]
    assert sample(logits, GenerationConfig(do_sample=True, temperature=0.0)).tolist() == [1]
    draws = {
        sample(
            logits, GenerationConfig(do_sample=True, top_k=1), torch.Generator().manual_seed(s)
        ).item()
        for s in range(20)
    }
    assert draws == {1}  # top-k 1 is greedy
    nucleus = GenerationConfig(do_sample=True, top_p=0.5)
    assert {sample(logits, nucleus).item() for _ in range(20)} == {1}  # 1 alone holds > 0.5
    wide = GenerationConfig(do_sample=True, temperature=5.0)
    seeds = [torch.Generator().manual_seed(s) for s in range(50)]
    assert len({sample(logits, wide, g).item() for g in seeds}) > 2


# ---- numerics: non-finite logits are refused, and the Assistant keeps serving ---------------

# The tiny model's final LayerNorm gain times this puts its largest logit near 8e4: finite in
# float32, past float16's 65504 (an overflow like the one LLaVA-Phi's reference warns of).
OVERFLOW_GAIN = 3e4
INSTRUCTION = "What should the robot do?"


@contextlib.contextmanager
def _final_norm_gain(assistant, gain: float):
    weight = assistant.model.language_model.model.final_layernorm.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(gain)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(original)


def test_the_overflowing_gain_is_finite_in_float32(assistant, image):
    with _final_norm_gain(assistant, OVERFLOW_GAIN):
        logits = assistant.trace(image, QUESTION, max_new_tokens=1).step_logits
    assert torch.isfinite(logits).all() and logits.abs().max() > 65504


@pytest.mark.parametrize("decoder", ["static", "eager"])
def test_float16_overflow_is_refused_then_serving_goes_on(decoder, image):
    runtime = RuntimeConfig(dtype="float16", decoder=decoder)
    with Assistant.load(str(tiny_checkpoint("llava_phi")), runtime) as a:
        answer = a.answer(image, QUESTION, max_new_tokens=4)
        hint = a.rank(image, INSTRUCTION, ACTIONS)
        with _final_norm_gain(a, OVERFLOW_GAIN):
            for request in (
                lambda: a.answer(image, QUESTION, max_new_tokens=4),
                lambda: a.rank(image, INSTRUCTION, ACTIONS),
            ):
                with pytest.raises(NonFiniteLogitsError) as info:
                    request()
                message = str(info.value)
                assert "llava_phi produced non-finite logits (inf/nan) in prefill" in message
                assert "dtype float16 on cpu" in message
                assert "its reference warns so" in message
                assert "bfloat16" in message and "float32" in message
        # the same Assistant, weights restored: the same answers as before the failures
        again = a.answer(image, QUESTION, max_new_tokens=4)
        assert (again.text, again.token_ids) == (answer.text, answer.token_ids)
        assert a.rank(image, INSTRUCTION, ACTIONS).log_likelihoods == hint.log_likelihoods


def test_non_finite_ranking_branches_are_refused(assistant, image, monkeypatch):
    hint = assistant.rank(image, INSTRUCTION, ACTIONS)
    real = assistant.decoder.score_branches

    def with_nan(tokens, mask):
        logits = real(tokens, mask).clone()
        logits[0, 0, 0] = float("nan")
        return logits

    monkeypatch.setattr(assistant.decoder, "score_branches", with_nan)
    with pytest.raises(NonFiniteLogitsError, match="in ranking with dtype float32 on cpu: "
                       "float32 does not overflow here"):  # fmt: skip
        assistant.rank(image, INSTRUCTION, ACTIONS)
    monkeypatch.undo()
    assert assistant.rank(image, INSTRUCTION, ACTIONS).log_likelihoods == hint.log_likelihoods


# ---- lifecycle ------------------------------------------------------------------------------


def test_close_frees_and_refuses(image):
    a = Assistant.load(str(tiny_checkpoint("llava_phi")))
    a.close()
    a.close()  # idempotent
    with pytest.raises(VlmError, match="closed"):
        a.answer(image, QUESTION)


def test_threads_setting(image):
    before = torch.get_num_threads()
    try:
        with Assistant.load(str(tiny_checkpoint("llava_phi")), RuntimeConfig(threads=1)) as a:
            assert torch.get_num_threads() == 1
            assert len(a.answer(image, QUESTION, max_new_tokens=2).token_ids) == 2
    finally:
        torch.set_num_threads(before)


def test_concurrent_calls_are_serialised(assistant, image):
    expected = assistant.answer(image, QUESTION, max_new_tokens=4).token_ids
    results = []

    def worker():
        results.append(assistant.answer(image, QUESTION, max_new_tokens=4).token_ids)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3


def test_demo_falls_back_to_a_cached_tiny_checkpoint(tmp_path, monkeypatch, image):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(pipeline, "_demo_candidates", lambda: [tmp_path / "no-demo"])
    with Assistant.load("demo") as a:
        assert a.family.name == "llava_phi"
        assert len(a.answer(image, QUESTION, max_new_tokens=2).token_ids) == 2
    assert (tmp_path / "vlm_ros" / "demo-tiny" / "config.json").is_file()
    assert pipeline.demo_checkpoint_dir() == tmp_path / "vlm_ros" / "demo-tiny"  # reused


def test_demo_prefers_models_demo(tmp_path, monkeypatch):
    shipped = tmp_path / "models" / "demo"
    shipped.mkdir(parents=True)
    (shipped / "config.json").write_text("{}")
    monkeypatch.setattr(pipeline, "_demo_candidates", lambda: [shipped])
    assert pipeline.demo_checkpoint_dir() == shipped


def test_demo_is_found_in_this_checkout():
    """The real lookup (no monkeypatch): the checkout's models/demo, not the random fallback."""
    root = Path(__file__).resolve().parents[1]
    assert pipeline.demo_checkpoint_dir() == root / "models" / "demo"
