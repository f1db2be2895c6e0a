"""What each published layout's config.json and tensor names mean, in canonical terms.

One function per ``model_type`` reads config.json (and, for legacy TinyLLaVA, the separate
vision-tower directory) and describes the checkpoint; ``resolve`` turns that, with the load
options (tokenizer size, stop token, the installed transformers' tower prefix, drop-first-patch),
into the final frozen ``Layout``: the FamilySpec resolved for this checkpoint, the transformers
configs of the vision tower and of the Phi decoder, and where each canonical parameter of
``VlmModel`` (see vlm_ros/model/network.py) comes from. Nothing changes a Layout afterwards, and
nothing here reads tensor data; checkpoint.py checks the plan against the model and loads it.

Facts: shared/facts/model-formats.md.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from transformers import CLIPVisionConfig, PhiConfig, SiglipVisionConfig

from vlm_ros.errors import CheckpointError, NoWeightsError
from vlm_ros.model.compat import rotary_factor
from vlm_ros.model.families import (
    CLIP_MEAN,
    CLIP_STD,
    FAMILIES,
    SIGLIP_MEAN,
    SIGLIP_STD,
    FamilySpec,
    ImageProcessing,
    VisionKind,
)
from vlm_ros.model.network import PUBLISHED_TOWER_PREFIX
from vlm_ros.model.weights import WeightFiles, open_weights

SUPPORTED = tuple(FAMILIES)

# PhiConfig's own fields. The LLaVA-style configs subclass PhiConfig and add many mm_* fields;
# only these reach the decoder. partial_rotary_factor and rope_theta are top-level in every
# published config; transformers >= 5 moves them into rope_parameters when given as kwargs.
PHI_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act",
    "max_position_embeddings", "initializer_range", "layer_norm_eps", "use_cache",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
    "partial_rotary_factor", "qk_layernorm", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip

# Tensors some checkpoints carry that are recomputed buffers, not parameters: older transformers
# saved the vision position_ids and the rotary inv_freq as persistent buffers.
RECOMPUTED_BUFFERS = re.compile(r"(embeddings\.position_ids|rotary_emb\.inv_freq)$")
FUSED_QKV = ".self_attn.query_key_value."


@dataclass(frozen=True)
class TensorRef:
    """Where one canonical tensor comes from. ``part`` 0/1/2 picks q/k/v out of a fused
    ``query_key_value`` tensor (transformers 4.36 Phi, saved by LLaVA-Phi's own classes)."""

    files: WeightFiles
    name: str
    part: int | None = None
    rows: int | None = None  # keep only the first rows (legacy TinyLLaVA's vocab resize)

    def shape(self) -> tuple[int, ...]:
        shape = self.files.shape(self.name)
        if self.part is not None:
            shape = (shape[0] // 3, *shape[1:])
        return shape if self.rows is None else (min(self.rows, shape[0]), *shape[1:])


@dataclass(frozen=True)
class Layout:
    """A checkpoint resolved against VlmModel: what to build and what fills it. Final: the
    maps are read-only views and the tuples immutable, so the plan checked is the plan loaded.
    (text_config is a transformers PhiConfig, a mutable object by its own design; it is built
    with its final vocab_size and the model reads it, never writes it.)"""

    spec: FamilySpec
    vision_config: CLIPVisionConfig | SiglipVisionConfig
    text_config: PhiConfig
    refs: Mapping[str, TensorRef]  # canonical name -> source
    unexpected: tuple[str, ...] = ()  # source tensors with no place
    ignored: tuple[str, ...] = ()  # deliberately dropped (see the key maps)
    # must fit the model exactly, not loaded (legacy TinyLLaVA's second tower copy)
    checked_only: Mapping[str, TensorRef] = field(default_factory=lambda: MappingProxyType({}))
    vision_tower_dir: Path | None = None


@dataclass(frozen=True)
class LoadOptions:
    """What the loader knows beyond config.json, given to ``resolve`` so the Layout comes out
    final. tokenizer_size: len(tokenizer) (legacy TinyLLaVA resizes its vocab to it); stop_token_id:
    the tokenizer's <|endoftext|>; tower_prefix: where the installed transformers keeps a tower's
    modules (network.installed_tower_prefix); drop_first_patch: RuntimeConfig's override of the
    family's drop-first-token (None: as published)."""

    tokenizer_size: int | None = None
    stop_token_id: int | None = None
    tower_prefix: str = PUBLISHED_TOWER_PREFIX
    drop_first_patch: bool | None = None


class Placement(enum.Enum):
    """Where a key map puts a source tensor."""

    LOAD = "load"  # fills the canonical parameter
    CHECK = "check"  # must fit the model exactly, but is not loaded (legacy tower copy)
    DROP = "drop"  # dropped on purpose (documented at the key map)
    NO_PLACE = "no_place"  # has no place in the model: a load error names it


@dataclass(frozen=True)
class Mapped:
    """A key map's answer for one source tensor name."""

    placement: Placement
    canonical: str = ""  # the VlmModel state-dict name, for LOAD and CHECK


NO_PLACE = Mapped(Placement.NO_PLACE)
DROPPED = Mapped(Placement.DROP)
KeyMap = Callable[[str], Mapped]
DirResolver = Callable[[str, Path], Path]


@dataclass(frozen=True)
class _Described:
    """What a per-family function reads from config.json, before the load options apply."""

    spec: FamilySpec
    vision_config: CLIPVisionConfig | SiglipVisionConfig
    text_config: PhiConfig
    sources: list[tuple[WeightFiles, KeyMap]]
    vision_tower_dir: Path | None = None
    # Legacy TinyLLaVA resizes embeddings and lm_head to len(tokenizer) + the tokens it adds.
    tokens_added: int | None = None


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"no config.json in {directory}: cannot tell which layout this is "
            f"(supported model_type: {', '.join(SUPPORTED)})"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config


def detect(config: dict, path: Path) -> str:
    """The layout is config.json's model_type, never the folder's name."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{path / 'config.json'} has model_type {model_type!r}; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    return model_type


def resolve(
    directory: Path, config: dict, resolve_dir: DirResolver, options: LoadOptions = LoadOptions()
) -> Layout:
    """The final, frozen Layout of the checkpoint in ``directory``."""
    model_type = detect(config, directory)
    return _plan(_RESOLVERS[model_type](directory, config, resolve_dir), options)


# ---- per-family resolvers ---------------------------------------------------------------


def _llava_phi(directory: Path, config: dict, _: DirResolver) -> _Described:
    """LLaVA-Phi: CLIP inside the checkpoint, nested vision_config.{vision_tower, mm_projector}."""
    tower = _nested_tower(config, directory)
    weights = open_weights(directory)
    keymap = _llava_keymap("model.vision_tower.")
    vision = CLIPVisionConfig(**_without_mm(tower))
    base = FAMILIES["llava_phi"]
    spec = base.with_overrides(
        select_layer=_select_layer(config, tower, base.select_layer),
        drop_first_token=tower.get("mm_vision_select_feature", "patch") == "patch",
        processing=_processing(base.processing, [directory], vision.image_size, config),
    )
    return _Described(spec, vision, _phi_config(config), [(weights, keymap)])


def _mipha_phi(directory: Path, config: dict, _: DirResolver) -> _Described:
    """Mipha: SigLIP inside the checkpoint, nested like LLaVA-Phi, all 729 tokens kept."""
    tower = _nested_tower(config, directory)
    weights = open_weights(directory)
    keymap = _llava_keymap("model.vision_tower.")
    vision = _siglip_config(_without_mm(tower), weights, keymap)
    base = FAMILIES["mipha_phi"]
    spec = base.with_overrides(
        select_layer=_select_layer(config, tower, base.select_layer),
        drop_first_token=False,  # Mipha keeps every token for "patch" and "cls_patch" alike
        processing=_processing(base.processing, [directory], vision.image_size, config),
    )
    return _Described(spec, vision, _phi_config(config), [(weights, keymap)])


def _tiny_llava_phi(directory: Path, config: dict, resolve_dir: DirResolver) -> _Described:
    """Legacy TinyLLaVA (TinyLLaVABench): SigLIP configured and loaded from ``mm_vision_tower``.

    Its SigLIP class deletes the last encoder layer and replaces the head with Identity, then
    reads ``hidden_states[-1]``: the output of layer L-1 of L, i.e. the penultimate layer of the
    full model, before post_layernorm, all tokens. We build exactly that truncated tower and read
    its last hidden state (select_layer -1), so the tensors present fill it exactly.

    Weights: the reference builds the tower lazily (delay_load) and fills it from the tower
    directory, discarding the main checkpoint's ``model.vision_tower.vision_tower.*`` copy. We
    do the same when the tower directory has weights (the main copy is still checked to fit);
    when it has only a config, the main checkpoint's copy fills the tower.
    """
    name = config.get("mm_vision_tower")
    if not name:
        raise CheckpointError(
            f"{directory / 'config.json'} (tiny_llava_phi) has no mm_vision_tower"
        )
    tower_dir = resolve_dir(str(name), directory)
    tower_cfg = read_config(tower_dir)
    tower_cfg = (
        tower_cfg.get("vision_config", tower_cfg)
        if tower_cfg.get("model_type") == "siglip"
        else tower_cfg
    )
    full_layers = int(tower_cfg.get("num_hidden_layers", 27))
    vision = SiglipVisionConfig(
        **{**tower_cfg, "num_hidden_layers": full_layers - 1, "vision_use_head": False}
    )
    main = open_weights(directory)
    main_tower = "model.vision_tower.vision_tower."
    sources = [(main, _llava_keymap(main_tower))]
    tower_weights = _optional_weights(tower_dir)
    if tower_weights is not None:
        sources = [
            (main, _llava_keymap(main_tower, tower_checked_only=True)),
            (tower_weights, _legacy_tower_keymap(full_layers - 1)),
        ]
    base = FAMILIES["tiny_llava_phi"]
    spec = base.with_overrides(
        select_layer=-1,
        drop_first_token=False,
        processing=_processing(base.processing, [directory, tower_dir], vision.image_size, config),
    )
    # builder.py adds <im_patch> (and <im_start>/<im_end>) before resize_token_embeddings.
    added = int(bool(config.get("mm_use_im_patch_token", True))) + 2 * int(
        bool(config.get("mm_use_im_start_end", False))
    )
    return _Described(spec, vision, _phi_config(config), sources, tower_dir, added)


def _tinyllava(directory: Path, config: dict, _: DirResolver) -> _Described:
    """TinyLLaVA Factory: text_config / vision_config dicts; language_model.*,
    vision_tower._vision_tower.*, connector._connector.* keys."""
    for key in ("text_config", "vision_config"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{directory / 'config.json'} (tinyllava) has no {key} object")
    text = config["text_config"]
    if text.get("model_type", "phi") != "phi":
        raise CheckpointError(
            f"{directory / 'config.json'}: text_config model_type {text.get('model_type')!r}; "
            "only Phi decoders are supported"
        )
    weights = open_weights(directory)
    keymap = _factory_keymap
    vision_dict = dict(config["vision_config"])
    kind: VisionKind = "clip" if vision_dict.get("model_type") == "clip_vision_model" else "siglip"
    if kind == "clip":
        vision = CLIPVisionConfig(**vision_dict)
    else:
        vision = _siglip_config(vision_dict, weights, keymap)
    base = FAMILIES["tinyllava"]
    default = base.processing
    if kind == "clip":
        default = ImageProcessing(default.size, "shortest_edge_crop", CLIP_MEAN, CLIP_STD, False)
    spec = base.with_overrides(
        vision_kind=kind,
        select_layer=int(config.get("vision_feature_layer", -2)),
        # strategy "patch" slices [:, 1:] whatever the tower: a real SigLIP patch is dropped.
        drop_first_token=config.get("vision_feature_select_strategy", "patch") == "patch",
        processing=_processing(default, [directory], vision.image_size, config),
    )
    return _Described(spec, vision, _phi_config(text), [(weights, keymap)])


_RESOLVERS = {
    "llava_phi": _llava_phi,
    "mipha_phi": _mipha_phi,
    "tiny_llava_phi": _tiny_llava_phi,
    "tinyllava": _tinyllava,
}


# ---- key maps: source tensor name -> where it goes (a Mapped) --------------------------------
# Canonical names use the published tower prefix ("vision_tower.vision_model."); _plan moves
# them to the installed transformers' prefix.


def _llava_keymap(tower_prefix: str, tower_checked_only: bool = False) -> KeyMap:
    """LLaVA-style names: ``model.*`` is the Phi body plus the tower and mm_projector."""
    tower = Placement.CHECK if tower_checked_only else Placement.LOAD

    def keymap(name: str) -> Mapped:
        if name.startswith(tower_prefix):
            return Mapped(tower, "vision_tower." + name[len(tower_prefix) :])
        if name.startswith("model.mm_projector."):
            return Mapped(Placement.LOAD, "projector." + name[len("model.mm_projector.") :])
        if name.startswith(("model.", "lm_head.")):
            return Mapped(Placement.LOAD, "language_model." + name)
        return NO_PLACE

    return keymap


def _factory_keymap(name: str) -> Mapped:
    for prefix, canonical in (
        ("language_model.", "language_model."),
        ("vision_tower._vision_tower.", "vision_tower."),
        ("connector._connector.", "projector."),
    ):
        if name.startswith(prefix):
            return Mapped(Placement.LOAD, canonical + name[len(prefix) :])
    return NO_PLACE


def _legacy_tower_keymap(kept_layers: int) -> KeyMap:
    """A SigLIP checkpoint loaded into the truncated legacy tower: text tower, head and the
    deleted last encoder layer are dropped, as SigLipVisionModel.from_pretrained drops them."""
    deleted = f"vision_model.encoder.layers.{kept_layers}."

    def keymap(name: str) -> Mapped:
        if not name.startswith("vision_model.") or name.startswith(("vision_model.head.", deleted)):
            return DROPPED
        return Mapped(Placement.LOAD, "vision_tower." + name)

    return keymap


# ---- assembling the plan -------------------------------------------------------------------


def _plan(described: _Described, options: LoadOptions) -> Layout:
    """Every source tensor placed, the load options applied, frozen."""
    refs: dict[str, TensorRef] = {}
    checked: dict[str, TensorRef] = {}  # the legacy main checkpoint's tower copy: must fit
    unexpected: list[str] = []
    ignored: list[str] = []
    for files, keymap in described.sources:
        for name in files.names():
            mapped = keymap(name)
            if mapped.placement is Placement.NO_PLACE:
                unexpected.append(name)
            elif mapped.placement is Placement.DROP or RECOMPUTED_BUFFERS.search(name):
                ignored.append(name)
            else:
                target = checked if mapped.placement is Placement.CHECK else refs
                canonical = _installed_name(mapped.canonical, options.tower_prefix)
                target.update(_expand_fused(canonical, files, name))
    text = described.text_config
    rows = _vocab_rows(refs, described.tokens_added, options.tokenizer_size)
    if rows is not None:
        _cut_vocab(refs, rows)
        text.vocab_size = rows  # before the Layout exists: the config is built, not yet shared
    return Layout(
        _final_spec(described.spec, options),
        described.vision_config,
        text,
        MappingProxyType(refs),
        tuple(unexpected),
        tuple(ignored),
        MappingProxyType(checked),
        described.vision_tower_dir,
    )


def _installed_name(canonical: str, tower_prefix: str) -> str:
    """Published tower names -> the installed transformers' names (flattened in 5.x)."""
    if canonical.startswith(PUBLISHED_TOWER_PREFIX):
        return tower_prefix + canonical[len(PUBLISHED_TOWER_PREFIX) :]
    return canonical


EMBED_KEYS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")


def _vocab_rows(
    refs: Mapping[str, TensorRef], tokens_added: int | None, tokenizer_size: int | None
) -> int | None:
    """The decoder's vocabulary rows: the embedding tensor's (trust the tensor, not the
    config), cut to the tokenizer where the family resizes to it.

    Legacy TinyLLaVA's builder.py calls resize_token_embeddings(len(tokenizer)): the rows past
    the tokenizer (Phi-2: 51200 rows, 50295 tokens) are cut from embed_tokens and lm_head, so
    greedy decoding can never pick them. A tokenizer larger than the embeddings keeps the
    embeddings as they are (the reference would add untrained rows for tokens no prompt
    contains)."""
    embed = refs.get(EMBED_KEYS[0])
    if embed is None:
        return None
    rows = embed.shape()[0]
    if tokens_added is not None and tokenizer_size is not None:
        rows = min(rows, tokenizer_size + tokens_added)
    return rows


def _cut_vocab(refs: dict[str, TensorRef], rows: int) -> None:
    for key in EMBED_KEYS:
        ref = refs.get(key)
        if ref is not None and rows < ref.files.shape(ref.name)[0]:
            refs[key] = replace(ref, rows=rows)


def _final_spec(spec: FamilySpec, options: LoadOptions) -> FamilySpec:
    overrides: dict[str, object] = {}
    if options.stop_token_id is not None:
        overrides["stop_token_id"] = options.stop_token_id
    if options.drop_first_patch is not None:  # e.g. un-dropping Factory TinyLLaVA's patch
        overrides["drop_first_token"] = options.drop_first_patch
    return spec.with_overrides(**overrides)


def _expand_fused(canonical: str, files: WeightFiles, name: str):
    if FUSED_QKV not in canonical or not canonical.startswith("language_model."):
        return [(canonical, TensorRef(files, name))]
    head, tail = canonical.split(FUSED_QKV)
    return [
        (f"{head}.self_attn.{proj}.{tail}", TensorRef(files, name, part))
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj"))
    ]


def split_fused_qkv(tensor, num_heads: int, part: int):
    """q, k or v out of transformers 4.36 Phi's ``query_key_value`` (weight [3*H, H] or bias
    [3*H]). Its output is viewed as [B, S, heads, 3, head_dim]: interleaved per head, so the
    split is by heads, not into three contiguous thirds."""
    rows = tensor.shape[0]
    head_dim = rows // (3 * num_heads)
    per_head = tensor.reshape(num_heads, 3, head_dim, *tensor.shape[1:])  # [heads, 3, hd, (H)]
    return per_head[:, part].reshape(rows // 3, *tensor.shape[1:]).contiguous()


# ---- config helpers ----------------------------------------------------------------------


def _nested_tower(config: dict, directory: Path) -> dict:
    tower = (config.get("vision_config") or {}).get("vision_tower")
    if not isinstance(tower, dict):
        raise CheckpointError(
            f"{directory / 'config.json'} ({config.get('model_type')}) "
            "has no vision_config.vision_tower"
        )
    return tower


def _without_mm(tower: dict) -> dict:
    return {
        k: v
        for k, v in tower.items()
        if not k.startswith("mm_") and k != "vision_model_name_or_path"
    }


def _phi_config(config: dict) -> PhiConfig:
    # rope_scaling null is the published default; passing it warns in transformers >= 5.
    fields = {k: config[k] for k in PHI_FIELDS if k in config}
    if fields.get("rope_scaling", 0) is None:
        del fields["rope_scaling"]
    text = PhiConfig(**fields)
    factor = config.get("partial_rotary_factor")
    if factor is not None and rotary_factor(text) != float(factor):
        raise CheckpointError(f"partial_rotary_factor {factor} was not honoured by PhiConfig")
    return text


def _siglip_config(fields: dict, weights: WeightFiles, keymap: KeyMap) -> SiglipVisionConfig:
    """The attention-pooling head is unused by every family; build it only if the checkpoint
    has it, so strict loading matches whichever way the tower was saved."""
    has_head = any(
        keymap(n).canonical.startswith("vision_tower.vision_model.head.") for n in weights.names()
    )
    return SiglipVisionConfig(**{**fields, "vision_use_head": has_head})


def _select_layer(config: dict, tower: dict, default: int) -> int:
    return int(tower.get("mm_vision_select_layer", config.get("mm_vision_select_layer", default)))


def _processing(
    default: ImageProcessing, dirs: list[Path], image_size: int, config: dict
) -> ImageProcessing:
    """preprocessor_config.json where present (first of ``dirs``), else the family default at the
    tower's image size; pad-to-square from config image_aspect_ratio ("pad" pads)."""
    pad = config.get("image_aspect_ratio") == "pad"
    for directory in dirs:
        path = directory / "preprocessor_config.json"
        if path.is_file():
            processing = _from_preprocessor(path, default, pad)
            break
    else:
        processing = ImageProcessing(image_size, default.mode, default.mean, default.std, pad)
    if processing.size != image_size:
        raise CheckpointError(
            f"image size {processing.size} from the preprocessor config does not match the vision "
            f"tower's image_size {image_size}"
        )
    return processing


def _from_preprocessor(path: Path, default: ImageProcessing, pad: bool) -> ImageProcessing:
    try:
        pre = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable {path}: {exc}") from exc
    crop = pre.get("do_center_crop", False) and pre.get("crop_size") is not None
    if crop:
        size, mode = _side(pre["crop_size"]), "shortest_edge_crop"
        resize = _side(pre.get("size", size))
        if resize != size:
            raise CheckpointError(f"{path}: resize {resize} != crop {size} is not supported")
    else:
        size, mode = _side(pre.get("size", default.size)), "resize"
    is_clip = mode == "shortest_edge_crop"
    mean = tuple(pre.get("image_mean", CLIP_MEAN if is_clip else SIGLIP_MEAN))
    std = tuple(pre.get("image_std", CLIP_STD if is_clip else SIGLIP_STD))
    return ImageProcessing(size, mode, mean, std, pad)  # type: ignore[arg-type]


def _side(size) -> int:
    """HF size fields: an int, {"shortest_edge": n} or {"height": n, "width": n} (square only)."""
    if isinstance(size, int):
        return size
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    if size.get("height") != size.get("width"):
        raise CheckpointError(f"non-square image size {size} is not supported")
    return int(size["height"])


def _optional_weights(directory: Path) -> WeightFiles | None:
    try:
        return open_weights(directory)
    except NoWeightsError:
        return None
