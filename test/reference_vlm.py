"""An independent reference for the parity tests, written from the published formats
(shared/facts/model-formats.md) without importing anything from vlm_ros.

It reads the checkpoint's tensors itself (safetensors / .bin, sharded or not), maps the published
key names with its own table, builds transformers' CLIPVisionModel / SiglipVisionModel, a
Linear-GELU-Linear projector and PhiForCausalLM, preprocesses with transformers' image processor
(plus the references' expand2square), tokenises with the `tokenizers` library directly, splices
with torch.cat, and decodes with ``PhiForCausalLM.generate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PhiConfig,
    PhiForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

try:  # newer transformers (5.5: yes, 5.3: no) name the PIL-based processors *Pil; older: no suffix
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
except ImportError:  # (the compatibility floor in README is tested with the older names)
    from transformers import CLIPImageProcessor as CLIPImageProcessorPil
    from transformers import SiglipImageProcessor as SiglipImageProcessorPil

PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
    "{question} ASSISTANT:"
)
IMAGE_TOKEN_INDEX = -200
PHI_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "hidden_act", "max_position_embeddings", "layer_norm_eps", "partial_rotary_factor",
    "rope_theta", "qk_layernorm", "tie_word_embeddings",
)  # fmt: skip
VISION_DROP = ("model_type", "architectures", "transformers_version", "torch_dtype")


# ---- reading tensors ---------------------------------------------------------------------------


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: model.safetensors, pytorch_model.bin, or their
    sharded forms with an index."""
    for single, index in [
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ]:
        files = []
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / single).is_file():
            files = [single]
        if files:
            out: dict[str, torch.Tensor] = {}
            for name in files:
                path = directory / name
                if name.endswith(".safetensors"):
                    out.update(load_file(str(path)))
                else:
                    out.update(torch.load(path, map_location="cpu", weights_only=True))
            return out
    raise FileNotFoundError(f"no weights in {directory}")


def unfuse_qkv(tensors: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """transformers 4.36 Phi's query_key_value, rows [head, (q, k, v), head_dim] -> q/k/v."""
    out = {}
    for key, value in tensors.items():
        if ".self_attn.query_key_value." not in key:
            out[key] = value
            continue
        per_head = value.reshape(heads, 3, value.shape[0] // (3 * heads), *value.shape[1:])
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            part = per_head[:, i].reshape(-1, *value.shape[1:])
            out[key.replace("query_key_value", name)] = part.contiguous()
    return out


def take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    # transformers >= 5 flattens CLIPVisionModel/SiglipVisionModel (no "vision_model." level)
    if not any(k.startswith("vision_model.") for k in own):
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    assert not missing and not unexpected, f"{what}: missing {missing}, unexpected {unexpected}"
    module.load_state_dict(state, strict=True)


# ---- the reference model --------------------------------------------------------------------


@dataclass
class Reference:
    family: str
    vision: nn.Module
    projector: nn.Sequential
    lm: PhiForCausalLM
    processor: object
    pad: tuple[int, int, int] | None  # expand2square colour, None = plain resize
    select_layer: int
    drop_first: bool
    tokenizer: Tokenizer
    eot: int


def build_reference(directory: Path, dtype=torch.float32, device="cpu") -> Reference:
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    family = config["model_type"]
    tensors = read_tensors(directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    eot = tokenizer.token_to_id("<|endoftext|>")

    if family in ("llava_phi", "mipha_phi"):
        text = {k: config[k] for k in PHI_KEYS if k in config}
        vision_dict = config["vision_config"]["vision_tower"]
        vision_state = take(tensors, "model.vision_tower.")
        projector_state = take(tensors, "model.mm_projector.")
        lm_state = {
            **{"model." + k: v for k, v in take(tensors, "model.").items()
               if not k.startswith(("vision_tower.", "mm_projector."))},
            **{"lm_head." + k: v for k, v in take(tensors, "lm_head.").items()},
        }  # fmt: skip
        processor_dir, select, drop = directory, -2, family == "llava_phi"
        pad = config.get("image_aspect_ratio") == "pad"
    elif family == "tiny_llava_phi":
        text = {k: config[k] for k in PHI_KEYS if k in config}
        # TinyLLaVABench loads the whole SigLIP from mm_vision_tower and reads the output of
        # its penultimate layer (its truncated tower's last one), keeping all tokens.
        tower_dir = directory / config["mm_vision_tower"]
        vision_dict = json.loads((tower_dir / "config.json").read_text())
        vision_state = read_tensors(tower_dir)
        projector_state = take(tensors, "model.mm_projector.")
        lm_state = {
            **{"model." + k: v for k, v in take(tensors, "model.").items()
               if not k.startswith(("vision_tower.", "mm_projector."))},
            **{"lm_head." + k: v for k, v in take(tensors, "lm_head.").items()},
        }  # fmt: skip
        processor_dir, select, drop = tower_dir, -2, False
        pad = config.get("image_aspect_ratio") == "pad"
    elif family == "tinyllava":
        text = {k: config["text_config"][k] for k in PHI_KEYS if k in config["text_config"]}
        vision_dict = config["vision_config"]
        vision_state = take(tensors, "vision_tower._vision_tower.")
        projector_state = take(tensors, "connector._connector.")
        lm_state = take(tensors, "language_model.")
        processor_dir, select = directory, config.get("vision_feature_layer", -2)
        drop = config.get("vision_feature_select_strategy") == "patch"
        pad = config.get("image_aspect_ratio") == "pad"
    else:
        raise ValueError(family)

    lm_state = unfuse_qkv(lm_state, text["num_attention_heads"])
    is_clip = "class_embedding" in "".join(vision_state)
    vision_fields = {k: v for k, v in vision_dict.items() if k not in VISION_DROP}
    vision_fields = {k: v for k, v in vision_fields.items() if not k.startswith("mm_")}
    if is_clip:
        vision = CLIPVisionModel(CLIPVisionConfig(**vision_fields))
        processor = CLIPImageProcessorPil.from_pretrained(str(processor_dir))
    else:
        if "vision_use_head" not in vision_fields:
            vision_fields["vision_use_head"] = any(".head." in k for k in vision_state)
        vision = SiglipVisionModel(SiglipVisionConfig(**vision_fields))
        processor = SiglipImageProcessorPil.from_pretrained(str(processor_dir))
    load_strict(vision, vision_state, "vision tower")

    # TinyLLaVABench resizes the embeddings to the tokenizer (rows past it are cut).
    vocab_rows = lm_state["model.embed_tokens.weight"].shape[0]
    if family == "tiny_llava_phi":
        vocab_rows = min(vocab_rows, tokenizer.get_vocab_size())
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            lm_state[key] = lm_state[key][:vocab_rows]
    lm = PhiForCausalLM(PhiConfig(**{**text, "vocab_size": vocab_rows}))
    if "lm_head.bias" not in lm_state:  # TinyLLaVABench's lm_head has no bias
        lm.lm_head = nn.Linear(lm.config.hidden_size, vocab_rows, bias=False)
    load_strict(lm, lm_state, "language model")

    hidden_in = projector_state["0.weight"].shape[1]
    hidden = projector_state["2.weight"].shape[0]
    projector = nn.Sequential(nn.Linear(hidden_in, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    load_strict(projector, projector_state, "projector")

    pad_colour = tuple(int(x * 255) for x in processor.image_mean) if pad else None
    for m in (vision, projector, lm):
        m.to(device=device, dtype=dtype).eval()
    return Reference(
        family, vision, projector, lm, processor, pad_colour, select, drop, tokenizer, eot
    )


# ---- running it ---------------------------------------------------------------------------------


def expand2square(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), colour)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def pixel_values(ref: Reference, rgb: np.ndarray) -> torch.Tensor:
    image = Image.fromarray(rgb).convert("RGB")
    if ref.pad is not None:
        image = expand2square(image, ref.pad)
    return ref.processor(images=image, return_tensors="pt")["pixel_values"]


def prompt_ids(ref: Reference, question: str) -> list[int]:
    chunks = PROMPT.format(question=question).split("<image>")
    ids = ref.tokenizer.encode(chunks[0], add_special_tokens=False).ids
    for chunk in chunks[1:]:
        ids = ids + [IMAGE_TOKEN_INDEX] + ref.tokenizer.encode(chunk, add_special_tokens=False).ids
    return ids


@dataclass
class RefRun:
    pixels: torch.Tensor
    image_embeds: torch.Tensor
    ids: list[int]
    inputs_embeds: torch.Tensor
    tokens: list[int]  # as generate returns them (a final <|endoftext|> included)
    logits: torch.Tensor  # [T, V]


@torch.no_grad()
def run_reference(ref: Reference, rgb: np.ndarray, question: str, max_new_tokens: int) -> RefRun:
    param = next(ref.lm.parameters())
    pixels = pixel_values(ref, rgb)
    hidden = ref.vision(pixels.to(param.device, param.dtype), output_hidden_states=True)
    feats = hidden.hidden_states[ref.select_layer]
    if ref.drop_first:
        feats = feats[:, 1:]
    image_embeds = ref.projector(feats)
    ids = prompt_ids(ref, question)
    at = ids.index(IMAGE_TOKEN_INDEX)
    embed = ref.lm.get_input_embeddings()
    before = embed(torch.tensor([ids[:at]], device=param.device))
    after = embed(torch.tensor([ids[at + 1 :]], device=param.device))
    inputs_embeds = torch.cat([before, image_embeds, after], dim=1)
    out = ref.lm.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=param.device),
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=ref.eot,
        pad_token_id=ref.eot,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0].tolist()
    logits = torch.stack([step[0] for step in out.logits]).float()
    return RefRun(pixels, image_embeds, ids, inputs_embeds, tokens, logits)
