"""Assistant: the ROS-free core the node, CLI, benchmark and bag evaluator call.

Composes the stages, each in its own module: preprocess (image -> pixels) -> vision (pixels ->
projected image embeddings) -> prompt (question -> ids, context check) -> decode (splice,
prefill, token loop) or ranking (one batched pass over candidate answers). Per-stage timings
(preprocess, vision, projector, prefill, decode, total) come back with every result.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vlm_ros.config import GenerationConfig, ImageLimits, RuntimeConfig, dtype_name
from vlm_ros.engines import weight_int8
from vlm_ros.errors import InputError, NonFiniteLogitsError, VlmError
from vlm_ros.infer import decode, prompt, ranking
from vlm_ros.infer.preprocess import preprocess, validate_image
from vlm_ros.infer.vision import make_vision_encoder
from vlm_ros.model import memory_plan
from vlm_ros.model.checkpoint import LoadedCheckpoint, load_checkpoint
from vlm_ros.model.families import FamilySpec
from vlm_ros.model.tiny import write_tiny_checkpoint
from vlm_ros.timing import StageTimer
from vlm_ros.types import (
    STAGES,
    ActionHint,
    Answer,
    ColorOrder,
    Request,
    StageTimings,
    StopReason,
    check_token_budget,
)

DEMO = "demo"
ResultMode = Literal["answer", "trace"]  # what _run keeps: the answer, or every tensor too
DEMO_FAMILY = "llava_phi"
_log = logging.getLogger(__name__)


def demo_checkpoint_dir() -> Path:
    """``models/demo`` (repo checkout or installed package share) when it holds a config.json,
    else a tiny generated LLaVA-Phi-layout checkpoint, written once under the user cache."""
    for candidate in _demo_candidates():
        if (candidate / "config.json").is_file():
            return candidate
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlm_ros"
    _log.warning(
        "models/demo not found (looked in %s): serving a tiny random-weight checkpoint, whose "
        "answers are noise; install the package with its models/ folder for the demo model",
        ", ".join(str(c) for c in _demo_candidates()),
    )
    return _ensure_tiny(cache / "demo-tiny")


# vlm_ros/infer/pipeline.py -> the repository root (the ROS package) in a source checkout
REPO_ROOT = Path(__file__).resolve().parents[2]


def _demo_candidates() -> list[Path]:
    found = [REPO_ROOT / "models" / "demo"]  # a source checkout
    try:  # installed with colcon: share/vlm_ros/models/demo (ament_index is not rclpy)
        from ament_index_python.packages import get_package_share_directory

        found.append(Path(get_package_share_directory("vlm_ros")) / "models" / "demo")
    except Exception:  # no ament index, or the package is not installed
        pass
    return found


def _ensure_tiny(directory: Path) -> Path:
    """Write the tiny checkpoint into a sibling temp dir and rename it into place, so a crash
    or a concurrent first run never leaves a half-written demo behind."""
    if (directory / "config.json").is_file():
        return directory

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    write_tiny_checkpoint(staging, DEMO_FAMILY, seed=0)
    try:
        staging.rename(directory)
    except OSError:  # another process won the race; use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _quantize_block(block: torch.nn.Module) -> None:
    """int8 weight-only quantization of one decoder block as it is loaded, its freed
    float weights handed back at once (memory_plan.trim_heap)."""
    weight_int8.quantize_weights(block)
    memory_plan.trim_heap()


@dataclass
class _Prefix:
    """One request's prompt ids (with -200), pixels [1, 3, S, S], image embeddings [1, N, hidden]
    and spliced inputs_embeds [1, S - 1 + N, hidden]."""

    ids: list[int]
    pixels: torch.Tensor | None  # None: the request expired or was cancelled before encoding
    image_embeds: torch.Tensor | None
    embeds: torch.Tensor | None
    stopped: StopReason | None = None  # "deadline" / "cancelled" before the image was encoded


@dataclass
class Trace:
    """Everything one greedy/sampled run saw, for parity checks and debugging:
    pixel_values [1, 3, S, S], image_embeds [1, N, hidden], prompt ids (with -200),
    inputs_embeds [1, S - 1 + N, hidden], and the logits of every step [T, V] (float32)."""

    answer: Answer
    pixel_values: torch.Tensor
    image_embeds: torch.Tensor
    prompt_ids: list[int]
    inputs_embeds: torch.Tensor
    step_logits: torch.Tensor


class Assistant:
    """Answers questions about an image and ranks candidate actions, with stage timings.

    Safe to call from several threads (calls are serialised by a lock); the node calls it from
    one worker thread.
    """

    def __init__(
        self,
        loaded: LoadedCheckpoint,
        runtime: RuntimeConfig = RuntimeConfig(),
        generation: GenerationConfig = GenerationConfig(),
        limits: ImageLimits = ImageLimits(),
    ):
        self.loaded = loaded
        self.runtime, self.generation, self.limits = runtime, generation, limits
        self.device = torch.device(loaded.device)
        model = loaded.model
        wanted = runtime.drop_first_patch
        if wanted is not None and wanted != model.spec.drop_first_token:
            raise InputError(
                f"drop_first_patch={wanted} is a load option: the checkpoint was loaded with "
                f"drop_first_token={model.spec.drop_first_token}; use Assistant.load(..., "
                "runtime) or load_checkpoint(..., drop_first_patch=...)"
            )
        self.model = model
        self.tokenizer = loaded.tokenizer
        self.stop_token_id = loaded.stop_token_id
        # The decoder first: its settings are checked there, before an ONNX export or a
        # TensorRT probe is paid for.
        self.decoder = decode.make_decoder(model.language_model, runtime)
        self.encoder = make_vision_encoder(model, runtime)
        self.max_positions = self._max_positions()
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def load(
        cls,
        model: str = DEMO,
        runtime: RuntimeConfig = RuntimeConfig(),
        generation: GenerationConfig = GenerationConfig(),
        limits: ImageLimits = ImageLimits(),
        *,
        vision_tower: str | Path | None = None,
    ) -> Assistant:
        """Load a checkpoint directory, a hub id, or "demo". vision_tower: legacy TinyLLaVA's
        SigLIP directory, instead of config.json's mm_vision_tower (load_checkpoint)."""
        if runtime.threads > 0:
            torch.set_num_threads(runtime.threads)
        path = demo_checkpoint_dir() if model == DEMO else model
        # int8 weight-only: each decoder block is quantized as soon as it is read, so the
        # half-precision decoder never has to fit whole (an 8 GB Jetson's case)
        streamed = runtime.quantize == "int8_weight_only" and runtime.decoder == "static"
        loaded = load_checkpoint(
            path, runtime.device, runtime.dtype, vision_tower=vision_tower,
            drop_first_patch=runtime.drop_first_patch,
            memory_check=memory_plan.checker(runtime),
            prepare_block=_quantize_block if streamed else None,
        )  # fmt: skip
        return cls(loaded, runtime, generation, limits)

    @property
    def family(self) -> FamilySpec:
        return self.model.spec

    def _max_positions(self) -> int:
        """The decoder's context: Phi's position table, and the static cache's length if used."""
        limit = int(self.model.text_config.max_position_embeddings)
        if self.runtime.decoder == "static":
            limit = min(limit, self.runtime.max_seq_len)
        return limit

    # ---- public API ---------------------------------------------------------------------

    def answer(
        self,
        image: np.ndarray,
        question: str,
        max_new_tokens: int | None = None,
        generation: GenerationConfig | None = None,
        deadline: float | None = None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        color_order: ColorOrder = "rgb",
    ) -> Answer:
        """Answer ``question`` about ``image`` (see docs/ARCHITECTURE.md)."""
        request = Request(
            image, question, color_order, max_new_tokens, generation, deadline, cancel, on_text
        )
        return self.answer_request(request)

    def trace(
        self,
        image: np.ndarray,
        question: str,
        max_new_tokens: int | None = None,
        generation: GenerationConfig | None = None,
        color_order: ColorOrder = "rgb",
    ) -> Trace:
        """``answer`` that also returns the intermediate tensors and per-step logits (the same
        code path; used by the parity tests)."""
        return self.trace_request(Request(image, question, color_order, max_new_tokens, generation))

    def rank(
        self,
        image: np.ndarray,
        instruction: str,
        candidates: list[str] | tuple[str, ...],
        color_order: ColorOrder = "rgb",
    ) -> ActionHint:
        """Probability of each candidate as the answer to ``instruction`` (see ranking.py)."""
        return self.rank_request(Request(image, instruction, color_order), candidates)

    def answer_request(self, request: Request) -> Answer:
        """``answer`` for a Request built by the caller (the node builds one per job)."""
        return self._run(request, "answer").answer

    def trace_request(self, request: Request) -> Trace:
        """``trace`` for a Request (its deadline, cancel and on_text are honoured too)."""
        return self._run(request, "trace")

    def rank_request(self, request: Request, candidates: list[str] | tuple[str, ...]) -> ActionHint:
        """``rank`` for a Request: request.question is the instruction. Its token budget,
        generation, deadline, cancel and on_text do not apply: a ranking runs whole."""
        actions = ranking.validate_candidates(candidates)
        request = replace(request, deadline=None, cancel=None)
        with self._lock, torch.inference_mode():
            self._check_open()
            timer = StageTimer(self.device)
            with timer.stage("total"), self._finite_logits() as decoder:
                cand_ids = ranking.candidate_ids(self.tokenizer, actions, self.stop_token_id)
                longest = max(len(c) for c in cand_ids)  # positions the branches need
                pre = self._prefix(request, timer, longest)
                totals = ranking.score_candidates(
                    decoder, pre.embeds, cand_ids, self.stop_token_id, timer
                )
                probs = ranking.probabilities(totals)
            return ActionHint(
                actions,
                tuple(float(p) for p in probs),
                tuple(float(t) for t in totals),
                _timings(timer),
            )

    def close(self) -> None:
        """Free the model (and GPU memory); later calls raise VlmError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.decoder.reset()
            del self.encoder, self.decoder, self.model, self.loaded
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def __enter__(self) -> Assistant:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- stages -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise VlmError("this Assistant is closed")

    @contextlib.contextmanager
    def _finite_logits(self) -> Iterator[_FiniteLogits]:
        """The decoder, its prefill and ranking logits checked; reset afterwards, whether the
        request finished or raised, so the next request starts from a clean cache."""
        try:
            yield _FiniteLogits(self.decoder, self.loaded.dtype, self.device, self.family)
        finally:
            self.decoder.reset()

    def _prefix(self, request: Request, timer: StageTimer, new_positions: int) -> _Prefix:
        """Question and image -> prompt ids and spliced inputs_embeds [1, S - 1 + N, hidden].
        Text checks run first, so a bad question or an overflow costs no model time; an image
        is still validated on an expired or cancelled request, but not encoded.
        new_positions: what comes after the prompt (the token budget, or ranking's longest
        candidate), for the context check."""
        prompt.validate_question(request.question, self.limits)
        ids = prompt.prompt_ids(self.tokenizer, request.question)
        n_image = self.encoder.num_image_tokens
        prompt.check_context(len(ids), n_image, new_positions, self.max_positions)
        stopped = request.interrupted()
        if stopped:
            validate_image(request.image, self.limits)
            return _Prefix(ids, None, None, None, stopped)
        with timer.stage("preprocess"):
            processing = self.family.processing
            pixels = preprocess(request.image, processing, request.color_order, self.limits)
            pixels = pixels.to(self.device)  # [1, 3, S, S] float32
        image_embeds = self.encoder.encode(pixels, timer)  # [1, N, hidden]
        embeds = decode.splice_image(ids, image_embeds, self.model.embed_tokens, n_image)
        return _Prefix(ids, pixels, image_embeds, embeds)

    def _complete(self, request: Request) -> Request:
        """The request with the Assistant's generation config where it names none, and its
        token budget checked (a config may hold a bad one too)."""
        if request.generation is None:
            request = replace(request, generation=self.generation)
        check_token_budget(request.token_budget)
        return request

    def _run(self, request: Request, mode: ResultMode) -> Trace:
        """One generated answer; mode "trace" also keeps every step's logits and a copy of the
        image features (what trace() returns), "answer" keeps nothing extra."""
        request, keep = self._complete(request), mode == "trace"
        with self._lock, torch.inference_mode():
            self._check_open()
            timer = StageTimer(self.device)
            stream = _TextStream(self.tokenizer, request.on_text)
            with timer.stage("total"):
                pre = self._prefix(request, timer, request.token_budget)
                with self._finite_logits() as decoder:
                    if pre.stopped:
                        gen = decode.Generation([], pre.stopped)
                    else:
                        gen = decode.generate(
                            decoder,
                            pre.embeds,
                            request,
                            stop_token_id=self.stop_token_id,
                            timer=timer,
                            on_token=stream.push if request.on_text else None,
                            keep_logits=keep,
                        )
                text = stream.finish(gen.token_ids)
            timings = _timings(timer)
            answer = Answer(text, tuple(gen.token_ids), timings, gen.stop_reason, len(pre.ids))
            logits = torch.stack(gen.step_logits) if gen.step_logits else torch.empty(0)
            # A trace outlives the call: copy the image features, which a compiled encoder
            # (TensorRT, ONNX Runtime) writes into one buffer that the next request overwrites.
            image_embeds = pre.image_embeds
            if keep and image_embeds is not None:
                image_embeds = image_embeds.clone()
            return Trace(answer, pre.pixels, image_embeds, pre.ids, pre.embeds, logits)


class _FiniteLogits:
    """The Decoder protocol over ``decoder``, refusing non-finite logits where an overflow shows
    first: the prefill (the whole image+prompt pass) and ranking's batched branch pass. Decode
    steps are not checked (one host sync per token would cost more than it finds)."""

    def __init__(self, decoder: decode.Decoder, dtype: torch.dtype, device, family: FamilySpec):
        self.decoder, self.dtype, self.device, self.family = decoder, dtype, device, family

    @property
    def forward_calls(self) -> int:
        return self.decoder.forward_calls

    @property
    def reuses_outputs(self) -> bool:
        return self.decoder.reuses_outputs

    def reset(self) -> None:
        self.decoder.reset()

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        return self._checked(self.decoder.prefill(embeds), "prefill")  # [1, V]

    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode_one_token(token)  # [1, V]

    def score_branches(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._checked(self.decoder.score_branches(tokens, mask), "ranking")  # [K, T, V]

    def _checked(self, logits: torch.Tensor, stage: str) -> torch.Tensor:
        if bool(torch.isfinite(logits).all()):
            return logits
        dtype = dtype_name(self.dtype)
        if self.dtype == torch.float16:
            warned = " (its reference warns so)" if self.family.fp16_overflows else ""
            advice = (
                f"float16 overflowed{warned}; load it with dtype bfloat16 (float32's range) or "
                "float32 (--dtype, or the node's dtype parameter)"
            )
        elif self.dtype == torch.bfloat16:
            advice = "load it with dtype float32 (--dtype, or the node's dtype parameter)"
        else:
            advice = "float32 does not overflow here: the checkpoint's weights may hold inf/nan"
        raise NonFiniteLogitsError(
            f"{self.family.name} produced non-finite logits (inf/nan) in {stage} with dtype "
            f"{dtype} on {self.device}: {advice}"
        )


class _TextStream:
    """Incremental text for ``on_text``: the whole id list is decoded each time (correct for
    byte-level BPE, cheap at answer lengths), a trailing incomplete UTF-8 character (U+FFFD) is
    held back, and the callback only fires when the text grew. Each text is a prefix of the
    next, and the last one equals the final answer text."""

    def __init__(self, tokenizer, callback: Callable[[str], None] | None):
        self.tokenizer, self.callback, self.sent = tokenizer, callback, None

    def text(self, ids: list[int]) -> str:
        return prompt.decode_ids(self.tokenizer, ids).strip()

    def push(self, ids: list[int]) -> None:
        text = self.text(ids).rstrip("\ufffd")
        if text and text != self.sent:
            self.sent = text
            self.callback(text)

    def finish(self, ids: list[int]) -> str:
        text = self.text(ids)
        if self.callback is not None and text != self.sent:
            self.sent = text
            self.callback(text)
        return text


def _timings(timer: StageTimer) -> StageTimings:
    ms = timer.milliseconds()
    return StageTimings(**{name: ms.get(name, 0.0) for name in STAGES})
