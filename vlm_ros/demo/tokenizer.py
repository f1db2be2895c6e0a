"""The demo model's tokenizer: a byte-level BPE (Phi-2's kind) trained on the world's text.

Trained with ``tokenizers`` on the prompt template and every caption/question/answer of a slice
of the training split, with ``<|endoftext|>`` as its one special token; written with the same
files as tiny.py's tokenizers (tokenizer.json, vocab.json + merges.txt, tokenizer_config.json
naming CodeGenTokenizer, special_tokens_map.json), so checkpoint.load_tokenizer reads it as it
reads Phi-2's. Small vocabulary: most words of the world become single tokens, which keeps the
prompt short (cheap training) and makes every answer one or two tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer

from vlm_ros.demo.data import corpus, split_seeds
from vlm_ros.infer.prompt import build_prompt

ENDOFTEXT = "<|endoftext|>"
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
    tokenizer = ByteLevelBPETokenizer(add_prefix_space=False)
    tokenizer.train_from_iterator(
        training_text(),
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[ENDOFTEXT],
        show_progress=False,
    )
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer.save_model(str(out))
    special = {f"{role}_token": ENDOFTEXT for role in ("bos", "eos", "unk")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "CodeGenTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer
