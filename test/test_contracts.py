"""The contracts that live in one place: typed modes checked once with a one-line message,
errors told apart by class, a frozen load plan whose spec the model shares, one Request object
through the core, and a decode loop that allocates nothing per token."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np
import pytest
import torch
from tiny_models import copy_tiny_checkpoint, tiny_checkpoint

from vlm_ros.config import (
    CPU_LINEAR_MODES,
    DECODERS,
    QUANTIZE_MODES,
    VISION_BACKENDS,
    GenerationConfig,
    RuntimeConfig,
)
from vlm_ros.errors import (
    CheckpointError,
    EvictedError,
    InputError,
    NoWeightsError,
    QueueFullError,
)
from vlm_ros.infer import decode
from vlm_ros.infer.pipeline import Assistant
from vlm_ros.model.checkpoint import load_checkpoint
from vlm_ros.model.families import (
    FAMILIES,
    PROCESSING_MODES,
    VISION_KINDS,
    FamilySpec,
    ImageProcessing,
)
from vlm_ros.model.layouts import LoadOptions, read_config, resolve
from vlm_ros.model.weights import open_weights
from vlm_ros.serving.worker import PERIODIC, QUERY, InferenceWorker
from vlm_ros.timing import StageTimer
from vlm_ros.types import STOP_REASONS, Answer, Request, StageTimings

QUESTION = "Is the path ahead clear?"


@pytest.fixture(scope="module")
def assistant():
    with Assistant.load(str(tiny_checkpoint("llava_phi"))) as a:
        yield a


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 256, (36, 48, 3), dtype=np.uint8)


# ---- typed modes: every invalid value refused once, on one line naming field/value/choices ----

_SPEC = FAMILIES["llava_phi"]
INVALID = [
    ("RuntimeConfig.decoder", DECODERS, lambda: RuntimeConfig(decoder="fast")),
    ("RuntimeConfig.quantize", QUANTIZE_MODES, lambda: RuntimeConfig(quantize="int4")),
    ("RuntimeConfig.cpu_linear", CPU_LINEAR_MODES, lambda: RuntimeConfig(cpu_linear="mkl")),
    ("RuntimeConfig.vision_backend", VISION_BACKENDS, lambda: RuntimeConfig(vision_backend="x")),
    ("FamilySpec.vision_kind", VISION_KINDS, lambda: _SPEC.with_overrides(vision_kind="vit")),
    (
        "ImageProcessing.mode",
        PROCESSING_MODES,
        lambda: dataclasses.replace(_SPEC.processing, mode="crop"),
    ),
    (
        "Answer.stop_reason",
        STOP_REASONS,
        lambda: Answer("", (), StageTimings(), "timeout"),  # type: ignore[arg-type]
    ),
]


@pytest.mark.parametrize("field, allowed, build", INVALID, ids=[i[0] for i in INVALID])
def test_every_invalid_mode_is_one_line_naming_field_value_and_choices(field, allowed, build):
    with pytest.raises(InputError) as caught:
        build()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{field} must be one of ")
    assert all(repr(choice) in message for choice in allowed)
    bad = message.rsplit("got ", 1)[1]
    assert bad.strip("'") not in allowed  # the refused value is named, and is not a choice


def test_every_valid_mode_is_accepted():
    for backend in VISION_BACKENDS:
        assert RuntimeConfig(vision_backend=backend).vision_backend == backend
    for decoder in DECODERS:
        assert RuntimeConfig(decoder=decoder).decoder == decoder
    for mode in QUANTIZE_MODES:
        assert RuntimeConfig(quantize=mode).quantize == mode
    for mode in CPU_LINEAR_MODES:
        assert RuntimeConfig(cpu_linear=mode).cpu_linear == mode
    for kind in VISION_KINDS:
        assert _SPEC.with_overrides(vision_kind=kind).vision_kind == kind
    for mode in PROCESSING_MODES:
        assert dataclasses.replace(_SPEC.processing, mode=mode).mode == mode
    for reason in STOP_REASONS:
        assert Answer("", (), StageTimings(), reason).stop_reason == reason
    assert isinstance(_SPEC, FamilySpec) and isinstance(_SPEC.processing, ImageProcessing)


def test_an_invalid_mode_is_refused_before_any_model_is_loaded(tmp_path):
    """Checked when the config is built: Assistant.load is never reached (the path does not
    even exist, which would be the error otherwise)."""
    with pytest.raises(InputError, match="RuntimeConfig.decoder"):
        Assistant.load(str(tmp_path / "missing"), RuntimeConfig(decoder="fast"))


# ---- errors by class, not wording ----------------------------------------------------------


def test_eviction_is_its_own_class():
    worker = InferenceWorker(max_queue=1)
    try:
        started, gate = threading.Event(), threading.Event()
        worker.submit(lambda: (started.set(), gate.wait(30)), PERIODIC)  # holds the worker
        assert started.wait(30)
        periodic = worker.submit(lambda: "periodic", PERIODIC)  # queued
        query = worker.submit(lambda: "query", QUERY)  # evicts the periodic job
        gate.set()
        assert query.result(timeout=30) == "query"
        exc = periodic.exception(timeout=30)
        assert isinstance(exc, EvictedError) and isinstance(exc, QueueFullError)
    finally:
        worker.shutdown()


def test_no_weights_is_its_own_class(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NoWeightsError) as caught:
        open_weights(tmp_path)
    assert isinstance(caught.value, CheckpointError)


def test_a_legacy_tower_dir_without_weights_is_told_by_class(tmp_path):
    """The tower directory holds a config only: NoWeightsError, so the main checkpoint's copy
    fills the tower; any other CheckpointError there still fails the load."""
    directory = copy_tiny_checkpoint("tiny_llava_phi", tmp_path / "ckpt")
    tower = directory / "vision_tower"
    for weights in [*tower.glob("*.safetensors"), *tower.glob("*.bin")]:
        weights.unlink()
    loaded = load_checkpoint(directory)
    assert loaded.vision_tower_path == tower
    (tower / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(directory)


# ---- load once, frozen ---------------------------------------------------------------------


def _layout(family: str, **options):
    directory = tiny_checkpoint(family)
    return resolve(
        directory, read_config(directory), lambda name, d: d / name, LoadOptions(**options)
    )


def test_the_layout_is_final_and_immutable():
    layout = _layout("llava_phi")
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.spec = FAMILIES["mipha_phi"]  # type: ignore[misc]
    with pytest.raises(TypeError):
        layout.refs["extra"] = next(iter(layout.refs.values()))  # type: ignore[index]
    with pytest.raises(TypeError):
        layout.checked_only["extra"] = next(iter(layout.refs.values()))  # type: ignore[index]
    assert isinstance(layout.unexpected, tuple) and isinstance(layout.ignored, tuple)


def test_load_options_are_applied_by_resolve():
    """Vocab rows (legacy TinyLLaVA resizes to the tokenizer), tower prefix, drop-first-patch
    and stop token come out of resolve, not from edits after it."""
    plain = _layout("tiny_llava_phi")
    rows = plain.text_config.vocab_size
    cut = _layout("tiny_llava_phi", tokenizer_size=rows - 9, stop_token_id=7)
    config = read_config(tiny_checkpoint("tiny_llava_phi"))
    added = int(config.get("mm_use_im_patch_token", True)) + 2 * int(
        config.get("mm_use_im_start_end", False)
    )  # the tokens legacy TinyLLaVA's builder adds before resizing
    assert cut.text_config.vocab_size == rows - 9 + added
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        assert cut.refs[key].shape()[0] == rows - 9 + added
    assert _layout("tiny_llava_phi", tokenizer_size=rows + 9).text_config.vocab_size == rows
    assert _layout("llava_phi", tokenizer_size=9).text_config.vocab_size > 9  # not resized
    assert cut.spec.stop_token_id == 7
    assert plain.spec.stop_token_id == FAMILIES["tiny_llava_phi"].stop_token_id
    flat = _layout("llava_phi", tower_prefix="vision_tower.")
    assert any(k.startswith("vision_tower.embeddings.") for k in flat.refs)
    assert not any(k.startswith("vision_tower.vision_model.") for k in flat.refs)
    flipped = _layout("llava_phi", drop_first_patch=False)
    assert flipped.spec.drop_first_token is False
    assert _layout("llava_phi").spec.drop_first_token is True


@pytest.mark.parametrize("flip", [False, True], ids=["as-published", "drop-first-patch-flipped"])
def test_loaded_spec_and_model_spec_agree(flip):
    path = str(tiny_checkpoint("tinyllava"))
    published = FAMILIES["tinyllava"].drop_first_token
    runtime = RuntimeConfig(drop_first_patch=(not published) if flip else None)
    with Assistant.load(path, runtime) as a:
        assert a.loaded.spec is a.model.spec
        assert a.family.drop_first_token == (published != flip)
        expected = json.loads((tiny_checkpoint("tinyllava") / "config.json").read_text())
        assert a.loaded.config == expected


def test_a_drop_first_patch_that_contradicts_the_loaded_model_is_refused():
    loaded = load_checkpoint(tiny_checkpoint("tinyllava"))
    flipped = not loaded.spec.drop_first_token
    with pytest.raises(InputError, match="drop_first_patch"):
        Assistant(loaded, RuntimeConfig(drop_first_patch=flipped))
    Assistant(loaded, RuntimeConfig(drop_first_patch=loaded.spec.drop_first_token)).close()


# ---- one request object ----------------------------------------------------------------------


def test_answer_request_is_what_answer_runs(assistant, image):
    config = GenerationConfig(max_new_tokens=5)
    by_args = assistant.answer(image, QUESTION, generation=config)
    by_request = assistant.answer_request(Request(image, QUESTION, generation=config))
    assert by_request.token_ids == by_args.token_ids and by_request.text == by_args.text
    streamed: list[str] = []
    request = Request(image, QUESTION, max_new_tokens=5, on_text=streamed.append)
    assert assistant.answer_request(request).text == streamed[-1]


def test_trace_and_rank_requests(assistant, image):
    request = Request(image, QUESTION, max_new_tokens=4)
    trace = assistant.trace_request(request)
    assert trace.answer.token_ids == assistant.trace(image, QUESTION, 4).answer.token_ids
    assert trace.step_logits.shape[0] >= len(trace.answer.token_ids)
    hint = assistant.rank_request(Request(image, "What now?"), ["stop", "go"])
    assert hint.actions == ("stop", "go")
    expired = Request(image, "What now?", deadline=time.monotonic() - 1)
    assert assistant.rank_request(expired, ["stop", "go"]).probabilities == hint.probabilities


def test_a_request_names_a_bad_budget_when_built():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="max_new_tokens must be a positive integer"):
            Request(np.zeros((8, 8, 3), np.uint8), QUESTION, max_new_tokens=bad)  # type: ignore[arg-type]
    assert Request(np.zeros((8, 8, 3), np.uint8), QUESTION).token_budget == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        Request(np.zeros((8, 8, 3), np.uint8), QUESTION).question = "x"  # type: ignore[misc]


# ---- the token loop ------------------------------------------------------------------------


class _CountingTimer(StageTimer):
    """A StageTimer that counts how often each stage is entered (one CUDA event pair each)."""

    def __init__(self):
        super().__init__("cpu")
        self.entries: dict[str, int] = {}

    def stage(self, name):
        self.entries[name] = self.entries.get(name, 0) + 1
        return super().stage(name)


def test_the_decode_loop_is_timed_once_and_its_position_is_advanced_in_place(assistant, image):
    decoder = assistant.decoder
    position = decoder._position
    pointer = position.data_ptr()
    hidden = assistant.model.text_config.hidden_size
    timer = _CountingTimer()
    request = Request(image, QUESTION, max_new_tokens=8)
    with torch.inference_mode():
        gen = decode.generate(
            decoder, torch.randn(1, 12, hidden), request, stop_token_id=-1, timer=timer
        )
        assert len(gen.token_ids) == 8 and decoder.length == 12 + 7
        assert int(decoder._position) == decoder.length  # the next slot, kept in step
    decoder.reset()
    assert timer.entries == {"prefill": 1, "decode": 1}  # not one decode entry per token
    assert decoder._position is position and position.data_ptr() == pointer
    assert timer.milliseconds()["decode"] > 0
