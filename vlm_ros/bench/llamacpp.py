"""llama.cpp as a measured peer of the static decoder: the benchmarked Phi decoder written to a
GGUF file in llama.cpp's own ``phi2`` layout (the ``gguf`` library), quantized by llama.cpp's
own quantizer (``llama_model_quantize``: what ``llama-quantize`` runs), and run through
llama-cpp-python's C API on the very input embeddings our decoder gets (image features
included), so prefill and decode are timed on the same work and the f32 logits can be compared
with ours.

What a llama.cpp user on a CPU gets, with two choices made for the comparison: the KV cache is
float32 (ours is float32; llama.cpp's default f16 cache would add its own rounding to the logit
check; at these prompt lengths the KV cache is a few percent of the bytes read per token), and
the vocabulary is llama.cpp's "none" tokenizer (the bench feeds ids and embeddings, never
text). Weights of every type are read from the file: ``gguf_bytes`` counts what one decode step
reads from memory (every tensor but the token-embedding table, of which one row is looked up).

Optional: llama-cpp-python and gguf are imported only here, by ``vlm-ros bench --llamacpp``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PhiForCausalLM

from vlm_ros.errors import VlmError
from vlm_ros.infer.fidelity import prefix_agreement

GGUF_TYPES = ("f32", "q8_0", "q4_0")
# llama.cpp's llama_ftype values (include/llama.h): what llama-quantize names f32/q8_0/q4_0
_FTYPES = {"f32": 0, "q8_0": 7, "q4_0": 2}
_GGML_F32 = 0  # ggml_type of a float32 KV cache
QUANT_BLOCK = 32  # q8_0/q4_0 blocks: every quantized row must be a multiple of this


class PeerUnavailable(VlmError):
    """llama-cpp-python or gguf is not installed, or the model cannot be written for it."""


def require_llama_cpp():
    """The llama_cpp module (low-level API), or PeerUnavailable naming what to install."""
    try:
        import gguf  # noqa: F401  # optional: the GGUF writer, only for the peer
        import llama_cpp  # optional: llama.cpp's C API, only for the peer
    except ImportError as exc:
        raise PeerUnavailable(
            f"the llama.cpp peer needs llama-cpp-python and gguf ({exc.name} is missing): "
            "pip install llama-cpp-python gguf (scripts/requirements.txt has both)"
        ) from exc
    if _QUIET[0] is None:  # llama.cpp logs every load and graph to stderr: errors only
        _QUIET[0] = llama_cpp.llama_log_callback(_log_errors_only)
        llama_cpp.llama_log_set(_QUIET[0], None)
    return llama_cpp


_QUIET: list = [None]  # the installed log callback (kept referenced: C holds a pointer to it)
_GGML_LOG_ERROR = 4  # ggml_log_level


def _log_errors_only(level: int, text: bytes, _user) -> None:
    if level >= _GGML_LOG_ERROR and level != 5:  # 5: GGML_LOG_LEVEL_CONT, a continued line
        sys.stderr.write(text.decode(errors="replace"))


def version() -> str:
    from importlib.metadata import version as dist_version

    return dist_version("llama-cpp-python")


# ---- export ------------------------------------------------------------------------------


def _rotary_dims(cfg) -> int:
    """Rotary dimensions per head (Phi rotates the first partial_rotary_factor of each)."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    return int(factor * head_dim)


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def phi2_tensors(lm: PhiForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) for every weight of transformers' Phi, in llama.cpp's phi2
    naming (src/llama-arch.cpp): separate q/k/v projections, fc1 = ffn_up, fc2 = ffn_down."""
    body = lm.model
    yield "token_embd.weight", body.embed_tokens.weight
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        parts = {
            "attn_norm": layer.input_layernorm,
            "attn_q": attn.q_proj,
            "attn_k": attn.k_proj,
            "attn_v": attn.v_proj,
            "attn_output": attn.dense,
            "ffn_up": mlp.fc1,
            "ffn_down": mlp.fc2,
        }
        for name, module in parts.items():
            yield f"blk.{i}.{name}.weight", module.weight
            yield f"blk.{i}.{name}.bias", module.bias
    yield "output_norm.weight", body.final_layernorm.weight
    yield "output_norm.bias", body.final_layernorm.bias
    yield "output.weight", lm.lm_head.weight
    yield "output.bias", lm.lm_head.bias


def check_exportable(lm: PhiForCausalLM) -> None:
    """What llama.cpp's phi2 graph cannot express, refused before anything is written."""
    cfg = lm.config
    if getattr(cfg, "qk_layernorm", False):
        raise PeerUnavailable("llama.cpp's phi2 graph has no q/k layernorm (qk_layernorm=True)")
    if cfg.hidden_act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise PeerUnavailable(f"llama.cpp's phi2 uses GELU; this model uses {cfg.hidden_act}")
    if lm.lm_head.bias is None:
        raise PeerUnavailable("llama.cpp's phi2 needs an lm_head bias (Phi-2 has one)")
    odd = [n for n, t in phi2_tensors(lm) if t.dim() == 2 and t.shape[1] % QUANT_BLOCK]
    if odd:
        raise PeerUnavailable(f"rows not a multiple of {QUANT_BLOCK} (q8_0/q4_0 blocks): {odd[:3]}")


def export_gguf(lm: PhiForCausalLM, path: Path, vocab: Callable | None = None) -> Path:
    """Write ``lm`` as a float32 GGUF file in llama.cpp's phi2 layout; returns ``path``.
    ``vocab(writer)`` writes the tokenizer's metadata (llamacpp_chat.py: a text vocabulary
    for llama-cpp-python's server); without it the file has the "none" tokenizer."""
    import gguf  # optional: see require_llama_cpp

    check_exportable(lm)
    cfg = lm.config
    writer = gguf.GGUFWriter(str(path), "phi2")
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_head_count(int(cfg.num_attention_heads))
    writer.add_head_count_kv(int(cfg.num_key_value_heads or cfg.num_attention_heads))
    writer.add_layer_norm_eps(float(cfg.layer_norm_eps))
    writer.add_rope_dimension_count(_rotary_dims(cfg))
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_vocab_size(int(cfg.vocab_size))
    if vocab is None:
        writer.add_tokenizer_model("none")  # ids and embeddings in, no text
    else:
        vocab(writer)
    writer.add_file_type(_FTYPES["f32"])
    for name, tensor in phi2_tensors(lm):
        writer.add_tensor(name, tensor.detach().float().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize(source: Path, target: Path, kind: str, threads: int) -> Path:
    """llama.cpp's own quantizer (llama-quantize's library call) from the f32 file."""
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPES[kind]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0:
        raise PeerUnavailable(f"llama_model_quantize to {kind} failed (status {status})")
    return target


def gguf_bytes(path: Path) -> dict[str, int]:
    """Bytes a decode step reads from the file's tensors (the embedding table: one row) and
    the file's tensor types, counted from the file itself."""
    import gguf  # optional: see require_llama_cpp

    reader = gguf.GGUFReader(str(path))
    weights, types = 0, {}
    for tensor in reader.tensors:
        size = int(tensor.n_bytes)
        if tensor.name == "token_embd.weight":
            size //= int(tensor.shape[-1])  # one row of n_vocab
        weights += size
        kind = tensor.tensor_type.name
        types[kind] = types.get(kind, 0) + 1
    return {"weights": weights, "tensor_types": types}


# ---- running --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerStep:
    """Milliseconds of one llama_decode call and the logits of its last position [V]."""

    ms: float
    logits: np.ndarray


class LlamaCppDecoder:
    """One GGUF model and one context (batch 1, float32 KV cache of ``n_ctx`` positions) on
    the CPU; ``prefill`` takes embeddings [S, hidden], ``decode_one_token`` a token id."""

    def __init__(self, path: Path, n_ctx: int, threads: int, max_prompt: int):
        self.llama_cpp = lib = require_llama_cpp()
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        read_into_memory(lib, model_params)
        if not extra_buffer_types(lib):
            model_params.use_extra_bufts = False
        self.model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise PeerUnavailable(f"llama.cpp could not load {path}")
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = max_prompt  # one prefill = one graph
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        ctx_params.type_k = ctx_params.type_v = _GGML_F32
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise PeerUnavailable(f"llama.cpp could not make a context for {path}")
        self.hidden = int(lib.llama_model_n_embd(self.model))
        self.vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model)))
        self.max_prompt = max_prompt
        self._embd_batch = lib.llama_batch_init(max_prompt, self.hidden, 1)
        self._token_batch = lib.llama_batch_init(1, 0, 1)
        self.length = 0

    def close(self) -> None:
        lib = self.llama_cpp
        lib.llama_batch_free(self._embd_batch)
        lib.llama_batch_free(self._token_batch)
        lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)

    def _run(self, batch, count: int) -> PeerStep:
        lib = self.llama_cpp
        start = time.perf_counter()
        status = lib.llama_decode(self.ctx, batch)
        lib.llama_synchronize(self.ctx)
        ms = (time.perf_counter() - start) * 1000.0
        if status != 0:
            raise PeerUnavailable(f"llama_decode failed (status {status})")
        pointer = lib.llama_get_logits_ith(self.ctx, count - 1)
        logits = np.ctypeslib.as_array(pointer, shape=(self.vocab,)).copy()
        self.length += count
        return PeerStep(ms, logits)

    def prefill(self, embeds: np.ndarray) -> PeerStep:
        """embeds [S, hidden] float32 -> the last position's logits; the cache is cleared."""
        steps = embeds.shape[0]
        if steps > self.max_prompt or embeds.shape[1] != self.hidden:
            raise ValueError(f"embeds {embeds.shape}: at most {self.max_prompt} x {self.hidden}")
        lib = self.llama_cpp
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        self.length = 0
        batch = self._embd_batch
        data = np.ascontiguousarray(embeds, dtype=np.float32)
        ctypes.memmove(batch.embd, data.ctypes.data, data.nbytes)
        for i in range(steps):
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == steps - 1
        batch.n_tokens = steps
        return self._run(batch, steps)

    def decode_one_token(self, token: int) -> PeerStep:
        batch = self._token_batch
        batch.token[0] = token
        batch.pos[0] = self.length
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = 0
        batch.logits[0] = True
        batch.n_tokens = 1
        return self._run(batch, 1)

    def greedy(self, embeds: np.ndarray, new_tokens: int) -> tuple[list[int], list[PeerStep]]:
        """Greedy answer of ``new_tokens`` (never stopping early) and every step's timing."""
        step = self.prefill(embeds)
        steps, tokens = [step], [int(step.logits.argmax())]
        while len(tokens) < new_tokens:
            step = self.decode_one_token(tokens[-1])
            steps.append(step)
            tokens.append(int(step.logits.argmax()))
        return tokens, steps


def system_info() -> str:
    """llama.cpp's own line of the CPU features it was built for and detects."""
    return require_llama_cpp().llama_print_system_info().decode().strip()


def library_dir() -> str:
    """Where the llama.cpp library in use was loaded from: llama-cpp-python's own build, or a
    build of another ISA named by ``LLAMA_CPP_LIB_PATH`` (its own loader reads the variable;
    scripts/avx2-limited-bench.sh uses it for an AVX2-only build)."""
    return os.environ.get("LLAMA_CPP_LIB_PATH") or str(
        Path(require_llama_cpp().__file__).parent / "lib"
    )


def read_into_memory(lib, params) -> None:
    """Load the weights into memory now, as ours are, not mmap'ed pages read on first use.
    The field is ``load_mode`` in newer llama.cpp, ``use_mmap`` before; a ctypes Structure
    takes any attribute name silently, so the field present is checked."""
    fields = {name for name, *_ in type(params)._fields_}
    if "load_mode" in fields:
        params.load_mode = lib.LLAMA_LOAD_MODE_NONE
    elif "use_mmap" in fields:
        params.use_mmap = False


def extra_buffer_types(lib) -> bool:
    """Whether llama.cpp may place weights in its CPU "extra" buffer types (the repacked
    layouts, AMX). Not on a CPU with AMX: there llama.cpp's AMX matmul segfaults on the q8_0
    and q4_0 models at the first decode (measured on a Xeon with AMX_INT8, llama-cpp-python
    0.3.36; upstream ggml-org/llama.cpp#20824, open), and the only switch the C API has turns
    the repacked layouts off with it, so on such hosts llama.cpp runs its plain kernels."""
    return b"AMX_INT8 = 1" not in lib.llama_print_system_info()


# ---- the peer in a bench run ------------------------------------------------------------------

DECODE_STEPS = 63  # as the bench's own decode_per_token: the 63 steps after a 64-token prefill


class LlamaCppPeer:
    """The decoder exported once, quantized to each asked type, every type loaded side by side;
    ``iteration`` times one prefill and DECODE_STEPS decode steps of each on the same
    embeddings, as the bench times ours."""

    def __init__(self, lm: PhiForCausalLM, kinds: tuple[str, ...], workdir: Path, **context):
        require_llama_cpp()
        source = export_gguf(lm, workdir / "decoder-f32.gguf")
        self.files = {
            kind: source
            if kind == "f32"
            else quantize(source, workdir / f"decoder-{kind}.gguf", kind, context["threads"])
            for kind in kinds
        }
        self.bytes = {kind: gguf_bytes(path) for kind, path in self.files.items()}
        self.decoders = {k: LlamaCppDecoder(path, **context) for k, path in self.files.items()}
        self.samples: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}

    def close(self) -> None:
        for decoder in self.decoders.values():
            decoder.close()

    def warm_up(self, embeds: np.ndarray) -> None:
        for decoder in self.decoders.values():
            decoder.greedy(embeds, 4)

    def iteration(self, embeds: np.ndarray) -> None:
        for kind, decoder in self.decoders.items():
            _, steps = decoder.greedy(embeds, DECODE_STEPS + 1)
            samples = self.samples[kind]
            samples.setdefault("prefill", []).append(steps[0].ms)
            decode = [s.ms for s in steps[1:]]
            samples.setdefault("decode_per_token", []).append(sum(decode) / len(decode))

    def accuracy(self, embeds: np.ndarray, tokens: list[int], first_logits: np.ndarray) -> dict:
        """Each type against our float32 path on the same embeddings: the first step's logits
        (max |difference|, and over our logit range) and the greedy tokens' common prefix."""
        spread = float(first_logits.max() - first_logits.min()) or 1.0
        out = {}
        for kind, decoder in self.decoders.items():
            theirs, steps = decoder.greedy(embeds, len(tokens))
            error = float(np.abs(steps[0].logits - first_logits).max())
            out[kind] = {
                "first_logits_max_abs_error": error,
                "first_logits_error_over_range": error / spread,
                "first_token_equal": theirs[:1] == tokens[:1],
                "greedy_prefix_agreement": prefix_agreement(tokens, theirs),
            }
        return out
