"""Load a published LLaVA-Phi / Mipha / TinyLLaVA checkpoint into a VlmModel.

``load_checkpoint(dir_or_hub_id)`` detects the layout from config.json's model_type (never from
the folder's name, unlike the reference loaders), resolves the FamilySpec for this checkpoint
(layouts.py), builds the model with its parameters on the ``meta`` device (nothing allocated,
nothing randomly initialised), checks that every checkpoint tensor has a place and every
parameter a tensor of the right shape, and only then reads each tensor once and assigns it
(``load_state_dict(assign=True)``): peak memory is the model plus one tensor.

The tokenizer returned is a transformers ``PreTrainedTokenizerFast`` (``AutoTokenizer``), so
``encode(text, add_special_tokens=False)`` / ``decode(ids, skip_special_tokens=True)`` work.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PhiConfig
from transformers.utils import logging as hf_logging

from vlm_ros.config import DTYPE_NAMES, dtype_name
from vlm_ros.errors import CheckpointError, InputError
from vlm_ros.model.compat import cpu_has_native
from vlm_ros.model.families import FamilySpec
from vlm_ros.model.layouts import (
    Layout,
    LoadOptions,
    detect,
    read_config,
    resolve,
    split_fused_qkv,
)
from vlm_ros.model.network import VlmModel, installed_tower_prefix

ENDOFTEXT = "<|endoftext|>"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
DEVICE_TYPES = ("cpu", "cuda")
_log = logging.getLogger(__name__)


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to run.

    spec: the FamilySpec resolved for this checkpoint (image processing from its preprocessor
    config, select layer, token dropping, stop token = the tokenizer's <|endoftext|>).
    model: VlmModel in eval mode on ``device`` / ``dtype``.
    tokenizer: transformers PreTrainedTokenizerFast (encode/decode).
    stop_token_id: the tokenizer's id of "<|endoftext|>" (50256 in every real checkpoint) —
    not the config's eos, which is 2 in Mipha's config.
    config: config.json as a dict. path: the checkpoint directory (a hub snapshot for hub ids).
    vision_tower_path: legacy TinyLLaVA's separate vision-tower directory, else None.
    """

    spec: FamilySpec
    model: VlmModel
    tokenizer: object
    stop_token_id: int
    config: dict
    path: Path
    dtype: torch.dtype
    device: str
    vision_tower_path: Path | None = None


def load_checkpoint(
    path_or_hub_id: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    vision_tower: str | Path | None = None,
    drop_first_patch: bool | None = None,
    memory_check: Callable[..., object] | None = None,
    prepare_block: Callable[[nn.Module], object] | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint directory (or a Hugging Face hub id, fetched once into the HF cache).

    device: "cpu", "cuda" or "cuda:N", checked before anything is read (InputError).
    dtype None picks the family's safe default for the device (FamilySpec.default_dtype).
    vision_tower overrides legacy TinyLLaVA's ``mm_vision_tower`` (a local directory), for
    machines that cannot reach the hub id written in its config; other layouts refuse it.
    drop_first_patch overrides the family's drop-first-token (RuntimeConfig.drop_first_patch);
    it is part of the layout, so ``spec`` and ``model.spec`` are the same object.
    memory_check(spec, vision_config, text_config, dtype_name) runs once the layout is known
    and before any weight is read, so a plan that cannot fit is refused first
    (memory_plan.checker).
    prepare_block(module) runs on each decoder block and on lm_head as soon as its weights are
    filled (int8 weight-only quantization at load: the half-precision decoder never has to fit
    whole, which on an 8 GB Jetson it does not).
    """
    check_device(device)
    directory = resolve_checkpoint_dir(str(path_or_hub_id))
    config = read_config(directory)
    detect(config, directory)  # an unknown layout is named before the tokenizer is read
    tokenizer = load_tokenizer(directory)
    stop = stop_token_id(tokenizer, directory)
    options = LoadOptions(len(tokenizer), stop, installed_tower_prefix(), drop_first_patch)
    layout = resolve(directory, config, _tower_resolver(vision_tower), options)
    if vision_tower is not None and layout.vision_tower_dir is None:
        raise CheckpointError(
            f"a vision tower directory ({vision_tower}) was given, but {layout.spec.name} keeps "
            "its vision tower inside the checkpoint; only legacy TinyLLaVA (tiny_llava_phi) "
            "reads a separate one"
        )
    torch_dtype = to_dtype(dtype if dtype is not None else layout.spec.default_dtype(device))
    if dtype is not None and torch_dtype == torch.float16 and layout.spec.fp16_overflows:
        _log.warning(
            "float16 requested for %s, whose reference warns that float16 overflows (inf/nan "
            "logits); bfloat16 (same range as float32) or float32 is the safe choice",
            layout.spec.name,
        )
    _warn_slow_cpu_precision(torch.device(device), torch_dtype)
    if memory_check is not None:
        memory_check(layout.spec, layout.vision_config, layout.text_config, dtype_name(torch_dtype))
    model = build_model(layout)
    check_layout(layout, model)
    fill_model(model, layout, device, torch_dtype, prepare_block)
    return LoadedCheckpoint(
        layout.spec,
        model.eval(),
        tokenizer,
        stop,
        config,
        directory,
        torch_dtype,
        device,
        layout.vision_tower_dir,
    )


# ---- where it runs, where the checkpoint is ------------------------------------------------


def _warn_slow_cpu_precision(device: torch.device, dtype: torch.dtype) -> None:
    """bf16 on a CPU with AVX512-BF16 is faster than float32 (docs/performance.md); on one
    without it, emulated and slower. Say so instead of leaving a user to guess."""
    if device.type == "cpu" and not cpu_has_native(dtype):
        name = dtype_name(dtype)
        _log.warning(
            "%s on this CPU is emulated (no native %s matrix instructions): expect it slower "
            "than float32, the CPU default",
            name,
            name,
        )


def check_device(device: str) -> torch.device:
    """A device this machine can run on, else an InputError that says what is there."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise InputError(f"unknown device {device!r}; expected cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda or "none: a CPU-only build"
            raise InputError(
                f"device {device!r} requested, but torch sees no CUDA GPU (torch "
                f"{torch.__version__}, CUDA {built}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise InputError(
                f"device {device!r} requested, but torch sees {count} CUDA GPU(s): "
                f"cuda:0..cuda:{count - 1}"
            )
    return parsed


def resolve_checkpoint_dir(name: str) -> Path:
    """An existing directory, else a hub id ("owner/name") fetched with huggingface_hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory")
    if not HUB_ID.match(name):
        raise CheckpointError(f"no checkpoint directory {path} (and {name!r} is not a hub id)")
    return hub_snapshot(name, "checkpoint")


def hub_snapshot(repo_id: str, what: str) -> Path:
    """Download (or find in the HF cache) a hub repository; any failure says how to go local."""
    from huggingface_hub import snapshot_download  # only hub ids need the hub client

    try:
        return Path(snapshot_download(repo_id=repo_id))
    except Exception as exc:  # offline, no network, unknown repo, gated, bad id
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        raise CheckpointError(
            f"{what} {repo_id!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub ({reason}). "
            f"Point at a local copy instead (--model /path/to/dir): on a machine with network run "
            f"`hf download {repo_id} --local-dir DIR` (older huggingface_hub: "
            f"`huggingface-cli download {repo_id} --local-dir DIR`) and copy DIR here."
        ) from exc


def _tower_resolver(override: str | Path | None):
    """Legacy TinyLLaVA's mm_vision_tower: absolute path, relative to the checkpoint directory
    (or the working directory, as from_pretrained would), else a hub id."""

    def resolve_dir(name: str, checkpoint_dir: Path) -> Path:
        if override is not None:
            tower = Path(override).expanduser()
            if not tower.is_dir():
                raise CheckpointError(f"vision tower directory {override} does not exist")
            return tower
        path = Path(name).expanduser()
        for candidate in (path,) if path.is_absolute() else (checkpoint_dir / path, path):
            if candidate.is_dir():
                return candidate
        if path.is_absolute() or not HUB_ID.match(name):
            raise CheckpointError(
                f"mm_vision_tower {name!r} of {checkpoint_dir} is not a directory"
            )
        return hub_snapshot(name, "vision tower (mm_vision_tower)")

    return resolve_dir


# ---- tokenizer -----------------------------------------------------------------------------


def load_tokenizer(directory: Path):
    """AutoTokenizer, fast. Legacy TinyLLaVA's reference asks for use_fast=False; for Phi-2's
    CodeGen byte-level BPE the slow and fast tokenizers give the same ids, and the fast one is
    built from tokenizer.json (or converted from vocab.json + merges.txt)."""
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"no tokenizer in {directory}: expected {' or '.join(TOKENIZER_FILES)}"
        )

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # config=PhiConfig(): the tokenizer class comes from tokenizer_config.json, else Phi's
        # (CodeGen); config.json is never read, so Factory's auto_map cannot prompt for
        # remote code and the unknown model_types do not warn.
        return AutoTokenizer.from_pretrained(
            str(directory), use_fast=True, config=PhiConfig(), trust_remote_code=False
        )
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer in {directory}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)


def stop_token_id(tokenizer, directory: Path) -> int:
    token_id = tokenizer.get_vocab().get(ENDOFTEXT)
    if token_id is None:
        raise CheckpointError(f"the tokenizer in {directory} has no {ENDOFTEXT} token")
    return int(token_id)


# ---- build, check, fill ----------------------------------------------------------------------


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters are created on the meta device (no memory, no random init); buffers (rotary
    inv_freq, position_ids: recomputed, never in checkpoints) stay real and cheap."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_model(layout: Layout) -> VlmModel:
    """The model the layout describes, parameters on the meta device; model.spec is
    layout.spec (the same frozen object LoadedCheckpoint.spec holds)."""
    with _parameters_on_meta():
        return VlmModel(layout.spec, layout.vision_config, layout.text_config)


def _fill_blocks(layout: Layout, by_block: bool) -> list[tuple[str, list[str]]]:
    """The checkpoint's keys in fill order: ("", everything outside the decoder blocks), then
    one group per decoder layer and lm_head (unless lm_head is tied to the embeddings); one
    group of everything when nothing is prepared per block."""
    if not by_block:
        return [("", list(layout.refs))]
    blocks = [
        f"language_model.model.layers.{i}." for i in range(layout.text_config.num_hidden_layers)
    ]
    if not layout.text_config.tie_word_embeddings:
        blocks.append("language_model.lm_head.")
    groups: dict[str, list[str]] = {"": [], **{b: [] for b in blocks}}
    for key in layout.refs:
        block = next((b for b in blocks if key.startswith(b)), "")
        groups[block].append(key)
    return list(groups.items())


def check_layout(layout: Layout, model: VlmModel) -> None:
    """Every checkpoint tensor has a place, every parameter a tensor, all shapes match."""
    wanted = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    if layout.text_config.tie_word_embeddings:
        wanted.pop("language_model.lm_head.weight", None)
    missing = [k for k in wanted if k not in layout.refs]
    unexpected = list(layout.unexpected)
    mismatched = []
    for key, ref in [*layout.refs.items(), *layout.checked_only.items()]:
        if key not in wanted:
            unexpected.append(ref.name)
        elif ref.shape() != wanted[key]:
            mismatched.append(f"{ref.name} {list(ref.shape())} (model {key} {list(wanted[key])})")
    problems = [
        _listing("checkpoint tensors with no place in the model", unexpected),
        _listing("model parameters missing from the checkpoint", missing),
        _listing("tensors of the wrong shape", mismatched),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{layout.spec.name} checkpoint does not fit: " + "; ".join(problems))


def _listing(what: str, names: list[str], limit: int = 10) -> str:
    if not names:
        return ""
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {what}: {', '.join(sorted(names)[:limit])}{more}"


def fill_model(
    model: VlmModel,
    layout: Layout,
    device: str,
    dtype: torch.dtype,
    prepare_block: Callable[[nn.Module], object] | None = None,
) -> None:
    """Read each tensor once, convert it, and make it the parameter (no second model copy).

    Block by block (the vision tower, embeddings and norms first, then each decoder layer, then
    lm_head), each passed to ``prepare_block`` once filled: the peak is the model as prepared
    plus one block as read."""
    heads = layout.text_config.num_attention_heads
    tied = layout.text_config.tie_word_embeddings
    expected, loaded, unexpected = set(model.state_dict()), set(), []
    for prefix, keys in _fill_blocks(layout, prepare_block is not None):
        state = {}
        for key in keys:
            ref = layout.refs[key]
            tensor = ref.files.load(ref.name)
            if ref.part is not None:
                tensor = split_fused_qkv(tensor, heads, ref.part)
            if ref.rows is not None:
                tensor = tensor[: ref.rows].clone()
            # copy=True: safetensors and mmap'd .bin tensors are views of the file; the model
            # must own its memory (a checkpoint replaced on disk must not change or crash a
            # running model). Each source tensor is dropped right after.
            target = dtype if tensor.is_floating_point() else None
            state[key] = tensor.to(device=device, dtype=target, copy=True)
        # strict over all blocks together (below), not per block
        unexpected += model.load_state_dict(state, strict=False, assign=True).unexpected_keys
        loaded.update(state)
        del state
        if prefix and prepare_block is not None:
            prepare_block(model.get_submodule(prefix.rstrip(".")))
    missing = [] if tied else sorted(expected - loaded)
    if missing or unexpected:
        found = [_listing("model keys missing", missing), _listing("keys unused", unexpected)]
        raise CheckpointError("; ".join(f for f in found if f))
    if tied:
        model.language_model.tie_weights()
    model.to(device)  # the real buffers; parameters are there already
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(_listing("parameters left unfilled", still_meta))
