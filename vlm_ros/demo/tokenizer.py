"""The demo model's tokenizer: a byte-level BPE (Phi-2's kind) trained on the world's text.

Trained with ``tokenizers`` on the prompt template and every caption/question/answer of a slice
of the training split, with ``<|endoftext|>`` as its one special token; written with the same
files as tiny.py's tokenizers (tokenizer.json, vocab.json + merges.txt, tokenizer_config.json
naming CodeGenTokenizer, special_tokens_map.json), so checkpoint.load_tokenizer reads it as it
reads Phi-2's. Small vocabulary: most words of the world become single tokens, which keeps the
prompt short (cheap training) and makes every answer one or two tokens.
"""

from __future__ import annotations

from pathlib import Path

from vlm_ros.demo.data import corpus, split_seeds
from vlm_ros.infer.prompt import build_prompt
from vlm_ros.model.tiny import ENDOFTEXT, write_phi_style_tokenizer

VOCAB_SIZE = 640
CORPUS_SCENES = 400


def training_text() -> list[str]:
    """The template (repeated, so its words merge into whole tokens) plus world text."""
    template = [build_prompt("Is the path ahead clear?") + " yes" + ENDOFTEXT] * 200
    return template + corpus(split_seeds("train", CORPUS_SCENES))


def train_tokenizer(out: str | Path):
    """Train and write the tokenizer files into ``out``; returns the ``tokenizers`` object."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return write_phi_style_tokenizer(
        out, training_text(), VOCAB_SIZE, min_frequency=2, clean_up_spaces=False
    )
