"""The one prompt template, ``<image>`` splitting, and the context-length check.

All three families use LLaVA-Phi's ``conv_phi_v0`` single-turn prompt (shared/facts/
model-formats.md). The prompt is tokenised like the references' ``tokenizer_image_token``: split
on ``<image>``, tokenise each chunk on its own (so "USER: " keeps its trailing-space token), put
IMAGE_TOKEN_INDEX (-200) between them, add no BOS. The model never sees text; this module hands
the pipeline ids, and nowhere else holds prompt text.
"""

from __future__ import annotations

from collections.abc import Sequence

from vlm_ros.config import ImageLimits
from vlm_ros.errors import ContextOverflowError, InputError
from vlm_ros.model.families import IMAGE_TOKEN_INDEX

IMAGE_PLACEHOLDER = "<image>"
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATE = SYSTEM + " USER: " + IMAGE_PLACEHOLDER + "\n{question} ASSISTANT:"
# Trained answers follow "ASSISTANT:" as " answer<|endoftext|>" (SeparatorStyle.TWO adds ": ").
ANSWER_PREFIX = " "


def validate_question(question: object, limits: ImageLimits = ImageLimits()) -> str:
    """Refuse non-strings, empty/whitespace-only and over-long questions (kept verbatim
    otherwise: the references do not strip them)."""
    if not isinstance(question, str):
        raise InputError(f"question must be a string, got {type(question).__name__}")
    if not question.strip():
        raise InputError("question is empty")
    if len(question) > limits.max_question_chars:
        raise InputError(
            f"question is too long: {len(question)} characters, at most "
            f"{limits.max_question_chars} allowed"
        )
    if IMAGE_PLACEHOLDER in question:
        raise InputError(f"question must not contain the image placeholder {IMAGE_PLACEHOLDER!r}")
    return question


def build_prompt(question: str) -> str:
    """The full single-turn prompt text with one ``<image>`` placeholder."""
    return TEMPLATE.format(question=question)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a transformers tokenizer or a raw
    ``tokenizers.Tokenizer``)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(ids, "ids", ids))


def decode_ids(tokenizer, ids: Sequence[int]) -> str:
    """Text of ``ids``, special tokens (``<|endoftext|>``) skipped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """``tokenizer_image_token``: chunk ids joined by IMAGE_TOKEN_INDEX, no BOS.

    Returns ids with exactly one -200 for a prompt with one ``<image>``.
    """
    chunks = [encode_text(tokenizer, chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + chunk
    return ids


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Ids of the full prompt for ``question`` (one IMAGE_TOKEN_INDEX placeholder)."""
    return tokenize_prompt(tokenizer, build_prompt(question))


def split_at_image(ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(ids before the placeholder, ids after it); exactly one placeholder is required."""
    positions = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    if len(positions) != 1:
        raise InputError(f"prompt must hold exactly one image placeholder, found {len(positions)}")
    at = positions[0]
    return list(ids[:at]), list(ids[at + 1 :])


def sequence_length(num_prompt_ids: int, num_image_tokens: int) -> int:
    """Length of the spliced prompt: the one placeholder becomes ``num_image_tokens``."""
    return num_prompt_ids - 1 + num_image_tokens


def check_context(
    num_prompt_ids: int, num_image_tokens: int, max_new_tokens: int, max_positions: int
) -> int:
    """Raise ContextOverflowError (never truncate) when the spliced prompt plus the requested
    new tokens does not fit the decoder's positions; returns the spliced prompt length."""
    length = sequence_length(num_prompt_ids, num_image_tokens)
    needed = length + max_new_tokens
    if needed > max_positions:
        raise ContextOverflowError(
            f"prompt does not fit the context: {num_prompt_ids - 1} text tokens + "
            f"{num_image_tokens} image tokens + {max_new_tokens} new tokens = {needed} > "
            f"{max_positions} positions; shorten the question or lower max_new_tokens"
        )
    return length
