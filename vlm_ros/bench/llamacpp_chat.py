"""A checkpoint's Phi decoder as a text-only chat model for llama-cpp-python's OpenAI server
(``python -m llama_cpp.server``): the third-party server the remote backend is tested against
(test/test_remote_thirdparty.py, docs/SERVING.md).

The weights are written by the bench peer's exporter (llamacpp.export_gguf, llama.cpp's
``phi2`` layout); this module adds what a server needs to turn text into ids and back: the
checkpoint's byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer (tokens by id, their
types, merges, bos/eos), and a chat template. The template is the project's prompt
(infer/prompt.py: conv_phi_v0) without the image: llama-cpp-python renders a message's content
list through the template as it is, and this template keeps the text parts and drops any
``image_url`` part, so the decoder answers the question alone.

    python -m vlm_ros.bench.llamacpp_chat models/demo /tmp/demo-text.gguf
    python -m llama_cpp.server --model /tmp/demo-text.gguf --model_alias demo-text --n_ctx 512

Optional: gguf (and, to serve, llama-cpp-python[server]) are imported only here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from vlm_ros.bench.llamacpp import PeerUnavailable, export_gguf
from vlm_ros.infer.prompt import SYSTEM

# llama-cpp-python's server and what its [server] extra installs (module names)
SERVER_MODULES = (
    "llama_cpp.server",
    "fastapi",
    "uvicorn",
    "sse_starlette",
    "starlette_context",
    "pydantic_settings",
)
_TEXT_PARTS = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)
# conv_phi_v0 as infer/prompt.TEMPLATE, text only: "SYSTEM USER: question ASSISTANT:"
CHAT_TEMPLATE = (
    SYSTEM + "{% for message in messages %}"
    "{% if message['role'] == 'user' %} USER: " + _TEXT_PARTS + "{% elif message['role'] == "
    "'assistant' %} ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def require_server() -> None:
    """PeerUnavailable naming the install unless llama-cpp-python's server can be imported."""
    import importlib

    for name in SERVER_MODULES:
        try:
            importlib.import_module(name)  # optional: the third-party server, tests/docs only
        except ImportError as exc:
            raise PeerUnavailable(
                f"llama-cpp-python's OpenAI server needs {name} ({exc}): "
                "pip install 'llama-cpp-python[server]' gguf (scripts/requirements.txt)"
            ) from exc


def gpt2_vocab(tokenizer_json: Path, n_vocab: int, stop_id: int) -> Callable:
    """A ``vocab(writer)`` for export_gguf: a byte-level BPE tokenizer.json (Hugging Face
    tokenizers) as llama.cpp's "gpt2" tokenizer with GPT-2's pre-tokenizer. ``stop_id`` is
    bos and eos (the checkpoint's stop token; the prompt adds no BOS)."""
    import gguf  # optional: see module docstring

    spec = json.loads(tokenizer_json.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise PeerUnavailable(f"{tokenizer_json}: not a byte-level BPE tokenizer")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    special = {int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special")}
    by_id.update({int(t["id"]): t["content"] for t in spec.get("added_tokens", [])})
    if sorted(by_id) != list(range(n_vocab)):
        raise PeerUnavailable(
            f"{tokenizer_json}: {len(by_id)} tokens, ids not exactly 0..{n_vocab - 1} "
            "(the decoder's vocab_size)"
        )
    tokens = [by_id[i] for i in range(n_vocab)]
    kinds = [
        gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(n_vocab)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def write(writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types([int(k) for k in kinds])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(stop_id)
        writer.add_eos_token_id(stop_id)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)

    return write


def export_chat_gguf(checkpoint: str | Path, path: Path) -> Path:
    """The checkpoint's decoder (float32) and tokenizer as one GGUF chat model at ``path``."""
    from vlm_ros.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint, dtype="float32")
    tokenizer_json = loaded.path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise PeerUnavailable(f"{loaded.path} has no tokenizer.json (a fast BPE tokenizer)")
    lm = loaded.model.language_model
    vocab = gpt2_vocab(tokenizer_json, int(lm.config.vocab_size), int(loaded.stop_token_id))
    return export_gguf(lm, path, vocab=vocab)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint directory or hub id (e.g. models/demo)")
    parser.add_argument("out", type=Path, help="the GGUF file to write")
    args = parser.parse_args(argv)
    try:
        export_chat_gguf(args.checkpoint, args.out)
    except PeerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
