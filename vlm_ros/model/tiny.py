"""Tiny checkpoints in the exact published layouts, for tests and CI (nothing is downloaded).

``write_tiny_checkpoint(out_dir, family)`` writes what the real checkpoint of ``family`` holds —
its tensor names and prefixes, config.json fields and nesting, tokenizer files, preprocessor
config, and for legacy TinyLLaVA the separate vision-tower directory named by
``mm_vision_tower`` — at toy scale (Phi: hidden 64, 2 layers; vision: hidden 32, 42 px, patch 14
-> 9 patches) with seeded random weights, drawn wide enough (see _randomise) that greedy tokens
depend on the image, so tests can tell images apart.

The tokenizer is a byte-level BPE (Phi-2's kind) trained on a few hundred words of robot-scene
text, with ``<|endoftext|>`` as a special token at its own small id (not 50256).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer
from transformers import CLIPVisionConfig, PhiConfig, SiglipVisionConfig, SiglipVisionModel

from vlm_ros.model.compat import tower_is_nested
from vlm_ros.model.families import CLIP_MEAN, CLIP_STD, FAMILIES, SIGLIP_MEAN, SIGLIP_STD
from vlm_ros.model.network import PUBLISHED_TOWER_PREFIX, VlmModel

FAMILY_NAMES = tuple(FAMILIES)
ENDOFTEXT = "<|endoftext|>"
IMAGE_SIZE = 42
PATCH = 14
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
EMBED_STD = 0.2
SHARP_STD = 0.5
PROJECTOR_STD = 0.3
LEGACY_TOWER_DIR = "vision_tower"  # mm_vision_tower, relative to the checkpoint directory

CORPUS = """the robot sees a clear corridor ahead with a door on the left and a chair on the right
a person is walking across the hallway so the robot should slow down and wait
there is a red box on the floor blocking the path turn left to go around it
the table holds a cup a bottle and a laptop near the window
stop the path is blocked by a closed door and a wet floor sign
continue forward the aisle is empty and well lit
a dog sits next to the sofa in the living room
the kitchen has a white fridge a stove and a sink under the cabinet
turn right at the end of the corridor where the stairs begin
how many people are in the room two people are standing near the shelf
what colour is the ball the ball is blue and green
is the path ahead clear yes the path ahead is clear
is there an obstacle no there is no obstacle in front of the robot
the warehouse shelves are full of brown boxes and a forklift is parked beside them
a bicycle leans against the wall outside the office
the light is green the crossing is safe move forward slowly
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: <image> What should the robot do? ASSISTANT: slow_down stop turn_left turn_right continue
Answer the question using a single word or phrase. 0 1 2 3 4 5 6 7 8 9 . , ? ! : ' "
"""


def write_tiny_checkpoint(
    out_dir: str | Path,
    family: str,
    seed: int = 0,
    *,
    safetensors: bool = True,
    sharded: bool = False,
    fused_qkv: bool = False,
    vocab_size: int | None = None,
) -> Path:
    """Write a tiny ``family`` checkpoint into ``out_dir`` and return it.

    safetensors False writes pytorch_model.bin; sharded splits the weights in two files with an
    index; fused_qkv stores Phi attention as transformers 4.36's ``query_key_value`` (LLaVA-Phi
    saved with its pinned transformers). vocab_size defaults to the tokenizer's length rounded up
    to a multiple of 64, so that, as in Phi-2 (51200 rows, 50295 tokens), the embeddings are
    larger than the tokenizer.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILY_NAMES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(out)
    eot = tokenizer.token_to_id(ENDOFTEXT)
    vocab = vocab_size or -(-tokenizer.get_vocab_size() // 64) * 64
    state, config = _BUILDERS[family](out, vocab, eot, seed)
    if fused_qkv:
        state = _fuse_qkv(state, TEXT["num_attention_heads"])
    _write_weights(out, state, safetensors=safetensors, sharded=sharded)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---- per-family layouts ---------------------------------------------------------------------


def _llava_phi(out: Path, vocab: int, eot: int, seed: int):
    vision = CLIPVisionConfig(**VISION, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    model = _random_model("llava_phi", vision, vocab, seed)
    keys = {"vision_tower.": "model.vision_tower.", **_LLAVA_BODY}
    config = {
        **_phi_fields(vocab, bos=1, eos=2),  # as in the public LLaVA-Phi config (eos 2, not eot)
        "architectures": ["LlavaPhiForCausalLM"],
        "model_type": "llava_phi",
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
        "image_aspect_ratio": "pad",
        "freeze_vision_tower": False,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "vision_config": {
            "vision_tower": {
                **_vision_fields(vision),
                "mm_vision_select_feature": "patch",
                "mm_vision_select_layer": -2,
            },
            "mm_projector": _mm_projector(),
        },
    }
    _write_preprocessor(out, clip=True)
    return _rename(_published_state(model), keys), config


def _mipha_phi(out: Path, vocab: int, eot: int, seed: int):
    vision = _siglip(VISION["num_hidden_layers"], head=True)
    model = _random_model("mipha_phi", vision, vocab, seed)
    keys = {"vision_tower.": "model.vision_tower.", **_LLAVA_BODY}
    config = {
        **_phi_fields(vocab, bos=1, eos=2),  # Mipha-3B's config says bos 1, eos 2
        "architectures": ["MiphaPhiForCausalLM"],
        "model_type": "mipha_phi",
        "torch_dtype": "float32",
        "transformers_version": "4.37.1",
        "image_aspect_ratio": "pad",
        "freeze_vision_tower": False,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "tokenizer_model_max_length": 2048,
        "vision_config": {
            "vision_tower": {
                **_vision_fields(vision),
                "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
                "mm_vision_select_feature": "patch",
                "mm_vision_select_layer": -2,
            },
            "mm_projector": _mm_projector(),
        },
    }
    _write_preprocessor(out, clip=False)
    return _rename(_published_state(model), keys), config


def _tiny_llava_phi(out: Path, vocab: int, eot: int, seed: int):
    """The main checkpoint holds the truncated tower (last layer deleted, no head); the tower
    directory holds a whole SigLIP vision model (all layers + head), as published."""
    full_layers = VISION["num_hidden_layers"] + 1
    tower = SiglipVisionModel(_siglip(full_layers, head=True))
    _randomise(tower, seed + 1)
    truncated = _siglip(full_layers - 1, head=False)
    model = _random_model("tiny_llava_phi", truncated, vocab, seed)
    tower_state = tower.state_dict()  # names as installed; the kept layers load by name
    model.vision_tower.load_state_dict(
        {k: v for k, v in tower_state.items() if k in model.vision_tower.state_dict()}
    )
    flat = not tower_is_nested(tower)
    tower_state = {("vision_model." if flat else "") + k: v.clone() for k, v in tower_state.items()}
    tower_dir = out / LEGACY_TOWER_DIR
    tower_dir.mkdir(exist_ok=True)
    tower_config = {**_vision_fields(tower.config), "architectures": ["SigLipVisionModel"]}
    (tower_dir / "config.json").write_text(json.dumps(tower_config, indent=2) + "\n")
    _write_preprocessor(tower_dir, clip=False)
    _write_weights(tower_dir, dict(tower_state), safetensors=True, sharded=False)
    keys = {"vision_tower.": "model.vision_tower.vision_tower.", **_LLAVA_BODY}
    config = {
        **_phi_fields(vocab, bos=eot, eos=eot, pad=eot),  # bos/eos/pad are <|endoftext|>
        "architectures": ["TinyLlavaPhiForCausalLM"],
        "model_type": "tiny_llava_phi",
        "torch_dtype": "float32",
        "transformers_version": "4.37.2",
        "mm_vision_tower": LEGACY_TOWER_DIR,
        "mm_hidden_size": VISION["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": 3072,
        "tokenizer_padding_side": "right",
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
    }
    return _rename(_published_state(model), keys), config


def _tinyllava(out: Path, vocab: int, eot: int, seed: int):
    vision = _siglip(VISION["num_hidden_layers"], head=True)
    model = _random_model("tinyllava", vision, vocab, seed)
    keys = {
        "vision_tower.": "vision_tower._vision_tower.",
        "projector.": "connector._connector.",
        "language_model.": "language_model.",
    }
    text = {
        **_phi_fields(vocab, bos=eot, eos=eot),
        "_name_or_path": "microsoft/phi-2",
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
    }
    vision_dict = {
        **_vision_fields(vision),
        "model_name_or_path": "google/siglip-so400m-patch14-384",
        "model_name_or_path2": "",
    }
    config = {
        "architectures": ["TinyLlavaForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration.TinyLlavaConfig",
            "AutoModelForCausalLM": "modeling_tinyllava_phi.TinyLlavaForConditionalGeneration",
        },
        "model_type": "tinyllava",
        "cache_dir": None,
        "connector_type": "mlp2x_gelu",
        "hidden_size": TEXT["hidden_size"],
        "ignore_index": -100,
        "image_aspect_ratio": "square",
        "image_token_index": -200,
        "llm_model_name_or_path": "microsoft/phi-2",
        "tokenizer_name_or_path": "microsoft/phi-2",
        "num_queries": None,
        "num_resampler_layers": None,
        "pad_token": "<|endoftext|>",
        "pad_token_id": eot,
        "resampler_hidden_size": None,
        "text_config": text,
        "tokenizer_model_max_length": 3072,
        "tokenizer_padding_side": "right",
        "tokenizer_use_fast": False,
        "torch_dtype": "float32",
        "transformers_version": "4.40.1",
        "tune_type_connector": "full",
        "tune_type_llm": "full",
        "tune_type_vision_tower": "frozen",
        "tune_vision_tower_from_layer": 0,
        "use_cache": True,
        "vision_config": vision_dict,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "patch",
        "vision_hidden_size": VISION["hidden_size"],
        "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
        "vision_model_name_or_path2": "",
        "vocab_size": vocab,
    }
    _write_preprocessor(out, clip=False)
    return _rename(_published_state(model), keys), config


_BUILDERS = {
    "llava_phi": _llava_phi,
    "mipha_phi": _mipha_phi,
    "tiny_llava_phi": _tiny_llava_phi,
    "tinyllava": _tinyllava,
}
# LLaVA-style body: Phi's own modules under model.*, plus model.mm_projector.
_LLAVA_BODY = {
    "projector.": "model.mm_projector.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}


# ---- model and weights ------------------------------------------------------------------------


def _text_config(vocab: int) -> PhiConfig:
    fields = _phi_fields(vocab, bos=1, eos=2)
    del fields["rope_scaling"]  # null, as published; passing it warns in transformers >= 5
    return PhiConfig(**fields)


def _random_model(family: str, vision, vocab: int, seed: int) -> VlmModel:
    model = VlmModel(FAMILIES[family], vision, _text_config(vocab))
    _randomise(model, seed)
    return model


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Seeded weights wide enough for image-dependent greedy tokens: norms around 1, small
    biases, matrices std 0.1 except attention queries/keys (0.5) and the projector (0.3), which
    make attention sharp and image tokens loud enough to steer the answer; embeddings std 0.2
    (wider ones drown the image in the residual stream: measured over 6 images x 2 seeds).
    Own generator, drawn after construction in name order (the tower's prefix ignored): the same
    weights whatever transformers version built the modules (4.x nests the towers under
    vision_model and registers some modules in another order), and the global RNG is left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    params = sorted(
        module.named_parameters(), key=lambda item: item[0].replace("vision_model.", "")
    )
    for name, param in params:
        if "layernorm" in name or "layer_norm" in name or "pre_layrnorm" in name:
            param.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=gen)
        elif "embed" in name or "probe" in name:
            param.normal_(0.0, EMBED_STD, generator=gen)
        elif name.endswith("bias"):
            param.normal_(0.0, 0.05, generator=gen)
        elif name.startswith("projector."):
            param.normal_(0.0, PROJECTOR_STD, generator=gen)
        elif "q_proj" in name or "k_proj" in name:
            param.normal_(0.0, SHARP_STD, generator=gen)
        else:
            param.normal_(0.0, 0.1, generator=gen)


def _published_state(model: VlmModel) -> dict[str, torch.Tensor]:
    """The model's state dict with the tower named as published (vision_tower.vision_model.*),
    whatever the installed transformers calls it."""
    prefix = model.tower_prefix
    return {
        (PUBLISHED_TOWER_PREFIX + k[len(prefix) :] if k.startswith(prefix) else k): v
        for k, v in model.state_dict().items()
    }


def _rename(state: dict, prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        prefix = next(p for p in prefixes if key.startswith(p))
        out[prefixes[prefix] + key[len(prefix) :]] = tensor.detach().clone().contiguous()
    return out


def _fuse_qkv(state: dict, heads: int) -> dict:
    """Phi's q/k/v -> transformers 4.36 Phi's query_key_value, interleaved per head: rows
    ordered [head, (q,k,v), head_dim]."""
    out = {}
    for key, tensor in state.items():
        # Only the Phi layers: transformers 4.36's CLIP kept separate q/k/v.
        proj = re.search(r"\.self_attn\.([qkv])_proj\.", key)
        if proj is None or not _is_phi_layer(key):
            out[key] = tensor
        elif proj.group(1) == "q":
            parts = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            per_head = [p.reshape(heads, p.shape[0] // heads, *p.shape[1:]) for p in parts]
            fused = torch.stack(per_head, dim=1)  # [heads, 3, head_dim, (H)]
            fused = fused.reshape(-1, *parts[0].shape[1:]).contiguous()
            out[key.replace("q_proj", "query_key_value")] = fused
    return out


def _is_phi_layer(key: str) -> bool:
    return key.startswith(("model.layers.", "language_model.model.layers."))


def _write_weights(out: Path, state: dict, *, safetensors: bool, sharded: bool) -> None:
    ext, single, index = (
        ("safetensors", "model.safetensors", "model.safetensors.index.json")
        if safetensors
        else ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")
    )
    stem = single.rsplit(".", 1)[0]
    names = list(state)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]] if sharded else [names]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}" if sharded else single
        tensors = {n: state[n].contiguous() for n in shard}
        if safetensors:
            save_file(tensors, str(out / file), metadata={"format": "pt"})
        else:
            torch.save(tensors, out / file)
        weight_map.update({n: file for n in shard})
    if sharded:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / index).write_text(json.dumps(index_doc, indent=2) + "\n")


# ---- config fragments -----------------------------------------------------------------------


def _phi_fields(vocab: int, *, bos: int, eos: int, pad: int | None = None) -> dict:
    """PhiConfig fields as published (top-level partial_rotary_factor / rope_theta)."""
    fields = {
        "vocab_size": vocab,
        **TEXT,
        "num_key_value_heads": None,
        "hidden_act": "gelu_new",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "partial_rotary_factor": 0.4,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "qk_layernorm": False,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.0,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    if pad is not None:
        fields["pad_token_id"] = pad
    return fields


def _siglip(layers: int, head: bool) -> SiglipVisionConfig:
    fields = {**VISION, "num_hidden_layers": layers}
    return SiglipVisionConfig(
        **fields,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        vision_use_head=head,
        hidden_act="gelu_pytorch_tanh",
    )


_VISION_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
    "projection_dim", "initializer_range", "initializer_factor", "dropout",
)  # fmt: skip


def _vision_fields(config) -> dict:
    """A vision config as published: its own fields (the transformers-4.3x spelling)."""
    data = config.to_dict()
    return {k: data[k] for k in _VISION_KEYS if k in data}


def _mm_projector() -> dict:
    return {
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": VISION["hidden_size"],
        "hidden_size": TEXT["hidden_size"],
    }


def _write_preprocessor(out: Path, *, clip: bool) -> None:
    """The family's true processing: CLIP resize-shortest-edge + centre crop; SigLIP direct
    resize; both bicubic (resample 3), rescale 1/255."""
    common = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
    }
    if clip:
        doc = {
            **common,
            "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            "do_center_crop": True,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": IMAGE_SIZE},
        }
    else:
        doc = {
            **common,
            "image_mean": list(SIGLIP_MEAN),
            "image_std": list(SIGLIP_STD),
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "SiglipProcessor",
            "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        }
    (out / "preprocessor_config.json").write_text(json.dumps(doc, indent=2) + "\n")


# ---- tokenizer --------------------------------------------------------------------------------


def _write_tokenizer(out: Path):
    """The tiny checkpoints' tokenizer, trained on CORPUS."""
    return write_phi_style_tokenizer(out, CORPUS.splitlines(), 420, 1, clean_up_spaces=True)


def write_phi_style_tokenizer(
    out: Path, texts: list[str], vocab_size: int, min_frequency: int, clean_up_spaces: bool
) -> ByteLevelBPETokenizer:
    """Train a byte-level BPE like Phi-2's (CodeGen/GPT-2 kind) on ``texts`` and write Phi-2's
    tokenizer files: tokenizer.json for the fast tokenizer, vocab.json + merges.txt for the
    slow one, and the configs that name them (checkpoint.load_tokenizer reads them as it
    reads Phi-2's). The tiny checkpoints and the demo model both use it."""
    tokenizer = ByteLevelBPETokenizer(add_prefix_space=False)
    tokenizer.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
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
        "clean_up_tokenization_spaces": clean_up_spaces,
        "model_max_length": 2048,
        "tokenizer_class": "CodeGenTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer
