"""Loading the four published layouts (tiny checkpoints written in their exact formats).

What is checked: every tensor of every layout and file format lands in the model under the
right name (against an independent prefix table written here, not the loader's), the spec
resolved per family (token counts, select layer, pad colour, lm_head bias, stop token), the
fused query_key_value split against transformers 4.36's own definition, legacy TinyLLaVA's
truncated tower against the full SigLIP's penultimate layer, and every failure a user can hit
(missing / unexpected / misshapen tensors, corrupt files, unknown layouts, offline hub ids),
each a CheckpointError naming the key or file.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, copy_tiny_checkpoint, tiny_checkpoint
from transformers import SiglipVisionConfig, SiglipVisionModel

from vlm_ros.errors import CheckpointError
from vlm_ros.model import tiny
from vlm_ros.model.checkpoint import load_checkpoint

FORMATS = {
    "safetensors": {},
    "sharded": {"sharded": True},
    "bin": {"safetensors": False},
    "sharded-bin": {"safetensors": False, "sharded": True},
}
# Published prefix -> VlmModel prefix, per layout (shared/facts/model-formats.md), written out
# independently of vlm_ros.model.layouts. Towers are named as published (vision_model.*).
PREFIXES = {
    "llava_phi": [
        ("model.vision_tower.", "vision_tower."),
        ("model.mm_projector.", "projector."),
        ("model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ],
    "tinyllava": [
        ("vision_tower._vision_tower.", "vision_tower."),
        ("connector._connector.", "projector."),
        ("language_model.", "language_model."),
    ],
}
PREFIXES["mipha_phi"] = PREFIXES["llava_phi"]
PREFIXES["tiny_llava_phi"] = [
    ("model.vision_tower.vision_tower.", "vision_tower."),
    *PREFIXES["llava_phi"][1:],
]
GRID = (tiny.IMAGE_SIZE // tiny.PATCH) ** 2  # 9 patches: the 576/729/729/728 pattern in small
TOKENS = {"llava_phi": GRID, "mipha_phi": GRID, "tiny_llava_phi": GRID, "tinyllava": GRID - 1}


def _published_names(model) -> dict[str, torch.Tensor]:
    """The model's state dict with the tower named as published, whatever transformers does."""
    prefix = model.tower_prefix
    return {
        ("vision_tower.vision_model." + k[len(prefix) :] if k.startswith(prefix) else k): v
        for k, v in model.state_dict().items()
    }


def _canonical(name: str, family: str) -> str:
    for src, dst in PREFIXES[family]:
        if name.startswith(src):
            return dst + name[len(src) :]
    raise AssertionError(f"{name} matches no published prefix of {family}")


COLOURS = [(1, -1, -1), (-1, 1, -1), (-1, -1, 1), (1, 1, 1), (-1, -1, -1), (0.5, 0, -0.5)]


def _pixels(size: int, colour: int) -> torch.Tensor:
    """A normalised image: a solid colour with its top half dimmed (distinct scenes, not noise,
    whose patches all average alike)."""
    pixels = torch.tensor(COLOURS[colour], dtype=torch.float32).view(1, 3, 1, 1)
    pixels = pixels.expand(1, 3, size, size).clone()
    pixels[:, :, : size // 2] *= -0.5
    return pixels


def _forward_logits(loaded, colour: int = 0) -> torch.Tensor:
    """Logits of [text, image, text] through the loaded model (image spliced as embeddings)."""
    model, tok = loaded.model, loaded.tokenizer
    pixels = _pixels(model.vision_config.image_size, colour)
    before = torch.tensor([tok.encode("USER: ", add_special_tokens=False)])
    after = torch.tensor([tok.encode(" is the path clear? ASSISTANT:", add_special_tokens=False)])
    with torch.no_grad():
        embeds = torch.cat(
            [model.embed_tokens(before), model.encode_images(pixels), model.embed_tokens(after)], 1
        )
        return model.language_model(inputs_embeds=embeds).logits


# ---- every layout x format loads, and every tensor lands ------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_lands_under_its_published_name(family):
    path = tiny_checkpoint(family)
    loaded = load_checkpoint(path)
    state = _published_names(loaded.model)
    raw = load_file(str(path / "model.safetensors"))
    for name, tensor in raw.items():
        target = _canonical(name, family)
        if family == "tiny_llava_phi" and target.startswith("language_model.") and "embed" in name:
            tensor = tensor[: state[target].shape[0]]  # resized to the tokenizer (tested below)
        if family == "tiny_llava_phi" and target == "language_model.lm_head.weight":
            tensor = tensor[: state[target].shape[0]]
        assert torch.equal(state[target], tensor), name
    if family != "tiny_llava_phi":  # legacy: its tower comes from the tower dir (tested below)
        assert {_canonical(n, family) for n in raw} == set(state)
    assert not any(p.is_meta for p in loaded.model.parameters())
    assert not loaded.model.training


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "safetensors"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_format_loads_the_same_weights(family, fmt):
    reference = load_checkpoint(tiny_checkpoint(family)).model.state_dict()
    path = tiny_checkpoint(family, **FORMATS[fmt])
    names = {p.name for p in path.iterdir()}
    expected = {
        "sharded": {"model.safetensors.index.json", "model-00002-of-00002.safetensors"},
        "bin": {"pytorch_model.bin"},
        "sharded-bin": {"pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"},
    }[fmt]
    assert expected <= names
    state = load_checkpoint(path).model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_tiny_checkpoints_are_small():
    for family in FAMILIES:
        size = sum(f.stat().st_size for f in tiny_checkpoint(family).rglob("*") if f.is_file())
        assert size < 5_000_000, (family, size)


# ---- the spec resolved per family -------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_token_count_and_layer(family):
    loaded = load_checkpoint(tiny_checkpoint(family))
    spec, model = loaded.spec, loaded.model
    assert spec.name == family
    assert model.num_image_tokens == TOKENS[family]
    size = tiny.IMAGE_SIZE
    features = model.image_features(torch.zeros(2, 3, size, size))
    assert features.shape == (2, TOKENS[family], tiny.VISION["hidden_size"])
    assert model.encode_images(torch.zeros(1, 3, size, size)).shape == (
        1,
        TOKENS[family],
        tiny.TEXT["hidden_size"],
    )
    # CLIP drops CLS, Factory drops a real patch (strategy "patch"), Mipha and legacy keep all.
    assert spec.drop_first_token == (family in ("llava_phi", "tinyllava"))
    assert spec.vision_kind == ("clip" if family == "llava_phi" else "siglip")
    # Legacy reads hidden_states[-1] of its truncated tower (= -2 of the full one).
    assert spec.select_layer == (-1 if family == "tiny_llava_phi" else -2)


@pytest.mark.parametrize(
    "family, color, pad, mode",
    [
        ("llava_phi", (122, 116, 104), True, "shortest_edge_crop"),
        ("mipha_phi", (127, 127, 127), True, "resize"),
        ("tiny_llava_phi", (127, 127, 127), True, "resize"),
        ("tinyllava", (127, 127, 127), False, "resize"),  # "square": plain resize, no pad
    ],
)
def test_spec_image_processing(family, color, pad, mode):
    processing = load_checkpoint(tiny_checkpoint(family)).spec.processing
    assert processing.pad_color == color
    assert processing.pad_to_square is pad
    assert processing.mode == mode
    assert processing.size == tiny.IMAGE_SIZE


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_bias_and_stop_token(family):
    loaded = load_checkpoint(tiny_checkpoint(family))
    has_bias = loaded.model.language_model.lm_head.bias is not None
    assert has_bias == (family != "tiny_llava_phi")  # TinyLLaVABench redefines it bias-free
    eot = loaded.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert loaded.stop_token_id == eot == loaded.spec.stop_token_id
    if family in ("llava_phi", "mipha_phi"):
        assert loaded.config["eos_token_id"] == 2 != loaded.stop_token_id  # config eos ignored


def test_preprocessor_config_overrides_the_family_default(tmp_path):
    path = copy_tiny_checkpoint("mipha_phi", tmp_path / "ckpt")
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre["image_mean"] = [0.25, 0.5, 0.75]
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    assert load_checkpoint(path).spec.processing.pad_color == (63, 127, 191)
    pre["size"] = {"height": 56, "width": 56}
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError, match="56.*image_size 42"):
        load_checkpoint(path)


def test_dtype_default_and_explicit():
    path = tiny_checkpoint("llava_phi")
    assert load_checkpoint(path).model.projector[0].weight.dtype == torch.float32
    loaded = load_checkpoint(path, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(_forward_logits(loaded)).all()


def test_partial_rotary_factor_is_honoured():
    lm = load_checkpoint(tiny_checkpoint("mipha_phi")).model.language_model
    head_dim = tiny.TEXT["hidden_size"] // tiny.TEXT["num_attention_heads"]
    rotary = int(head_dim * 0.4)  # Phi-2: 32 of 80 dims rotate
    assert lm.model.rotary_emb.inv_freq.numel() == rotary // 2
    assert lm.model.layers[0].self_attn.rotary_ndims == rotary


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_depend_on_the_image(family):
    loaded = load_checkpoint(tiny_checkpoint(family))
    firsts = {int(_forward_logits(loaded, c)[0, -1].argmax()) for c in range(len(COLOURS))}
    assert len(firsts) >= 2, firsts


# ---- fused query_key_value (LLaVA-Phi saved with transformers 4.36) ----------------------------


def test_fused_qkv_gives_the_same_logits_as_separate_projections():
    separate = load_checkpoint(tiny_checkpoint("llava_phi"))
    fused = load_checkpoint(tiny_checkpoint("llava_phi", fused_qkv=True))
    torch.testing.assert_close(_forward_logits(fused), _forward_logits(separate), rtol=0, atol=0)
    names = load_file(str(tiny_checkpoint("llava_phi", fused_qkv=True) / "model.safetensors"))
    assert "model.layers.0.self_attn.query_key_value.weight" in names
    assert not any("q_proj" in n and "vision" not in n for n in names)
    # transformers 4.36 fused Phi only: its CLIP tower kept separate q/k/v.
    assert "model.vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.weight" in names


def test_fused_qkv_split_matches_transformers_436_semantics():
    """4.36 Phi: fused = query_key_value(x).view(B, S, heads, 3, head_dim); q/k/v = [..., i, :]."""
    path = tiny_checkpoint("llava_phi", fused_qkv=True)
    raw = load_file(str(path / "model.safetensors"))
    attn = load_checkpoint(path).model.language_model.model.layers[1].self_attn
    heads, hidden = tiny.TEXT["num_attention_heads"], tiny.TEXT["hidden_size"]
    x = torch.randn(2, 5, hidden)
    weight = raw["model.layers.1.self_attn.query_key_value.weight"]
    bias = raw["model.layers.1.self_attn.query_key_value.bias"]
    out = torch.nn.functional.linear(x, weight, bias).view(2, 5, heads, 3, hidden // heads)
    with torch.no_grad():
        for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
            torch.testing.assert_close(proj(x), out[..., i, :].reshape(2, 5, hidden))


# ---- legacy TinyLLaVA: separate tower, truncated, vocab resized -------------------------------


def _full_tower(path: Path) -> SiglipVisionModel:
    """The tower directory loaded whole, with transformers' own class (reference)."""
    config = json.loads((path / tiny.LEGACY_TOWER_DIR / "config.json").read_text())
    config.pop("architectures", None)
    tower = SiglipVisionModel(SiglipVisionConfig(**config, vision_use_head=True)).eval()
    raw = load_file(str(path / tiny.LEGACY_TOWER_DIR / "model.safetensors"))
    nested = isinstance(getattr(tower, "vision_model", None), torch.nn.Module)
    prefix = "" if nested else "vision_model."
    tower.load_state_dict({k[len(prefix) :]: v for k, v in raw.items()}, strict=True)
    return tower


def test_legacy_features_are_the_full_towers_penultimate_layer():
    path = tiny_checkpoint("tiny_llava_phi")
    model = load_checkpoint(path).model
    full = _full_tower(path)
    assert model.vision_config.num_hidden_layers == full.config.num_hidden_layers - 1
    pixels = torch.rand(1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    with torch.no_grad():
        expected = full(pixels, output_hidden_states=True).hidden_states[-2]  # all tokens
        torch.testing.assert_close(model.image_features(pixels), expected)


def test_legacy_vocab_is_resized_to_the_tokenizer():
    loaded = load_checkpoint(tiny_checkpoint("tiny_llava_phi"))
    rows = len(loaded.tokenizer)  # config: mm_use_im_patch_token false, nothing added
    assert loaded.model.language_model.get_input_embeddings().weight.shape[0] == rows
    assert loaded.model.language_model.lm_head.weight.shape[0] == rows
    assert loaded.model.text_config.vocab_size == rows


def test_legacy_tower_from_main_checkpoint_when_tower_dir_has_no_weights(tmp_path):
    path = copy_tiny_checkpoint("tiny_llava_phi", tmp_path / "ckpt")
    reference = load_checkpoint(path).model.state_dict()
    (path / tiny.LEGACY_TOWER_DIR / "model.safetensors").unlink()
    state = load_checkpoint(path).model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_legacy_tower_dir_absolute_override_and_missing(tmp_path):
    path = copy_tiny_checkpoint("tiny_llava_phi", tmp_path / "ckpt")
    tower = shutil.move(str(path / tiny.LEGACY_TOWER_DIR), str(tmp_path / "siglip"))
    with pytest.raises(CheckpointError, match="mm_vision_tower 'vision_tower'"):
        load_checkpoint(path, dtype="float32")
    assert load_checkpoint(path, vision_tower=tower).vision_tower_path == Path(tower)
    config = json.loads((path / "config.json").read_text())
    config["mm_vision_tower"] = str(tower)
    (path / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(path).vision_tower_path == Path(tower)


# ---- failures name what is wrong ---------------------------------------------------------------


def _rewrite(path: Path, change) -> None:
    weights = load_file(str(path / "model.safetensors"))
    change(weights)
    save_file(weights, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    path = copy_tiny_checkpoint("llava_phi", tmp_path / "ckpt")
    _rewrite(path, lambda w: w.pop("model.layers.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"1 model parameters missing.*layers\.1\.mlp\.fc2"):
        load_checkpoint(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = copy_tiny_checkpoint("mipha_phi", tmp_path / "ckpt")
    _rewrite(path, lambda w: w.update({"model.mm_projector.4.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"no place in the model: model\.mm_projector\.4"):
        load_checkpoint(path)


def test_wrong_shape_is_named(tmp_path):
    path = copy_tiny_checkpoint("tinyllava", tmp_path / "ckpt")
    key = "connector._connector.2.weight"
    _rewrite(path, lambda w: w.update({key: torch.zeros(3, 3)}))
    match = r"wrong shape: connector\._connector\.2\.weight \[3, 3\]"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_recomputed_buffers_in_old_checkpoints_are_accepted(tmp_path):
    """Older transformers saved position_ids and rotary inv_freq; they are recomputed."""
    path = copy_tiny_checkpoint("llava_phi", tmp_path / "ckpt")
    extra = {
        "model.vision_tower.vision_model.embeddings.position_ids": torch.arange(GRID + 1)[None],
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(3),
    }
    _rewrite(path, lambda w: w.update(extra))
    assert load_checkpoint(path).model.num_image_tokens == GRID


def test_many_problems_are_counted(tmp_path):
    path = copy_tiny_checkpoint("llava_phi", tmp_path / "ckpt")
    _rewrite(path, lambda w: [w.pop(k) for k in list(w) if k.startswith("model.layers.")])
    with pytest.raises(CheckpointError, match=r"\d+ model parameters missing.*and \d+ more"):
        load_checkpoint(path)


def test_truncated_safetensors_names_the_file(tmp_path):
    path = copy_tiny_checkpoint("llava_phi", tmp_path / "ckpt", sharded=True)
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(path)


def test_garbage_bin_names_the_file(tmp_path):
    path = copy_tiny_checkpoint("mipha_phi", tmp_path / "ckpt", safetensors=False)
    (path / "pytorch_model.bin").write_bytes(b"this is not a pickle" * 50)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_checkpoint(path)


def test_missing_shard_names_the_file(tmp_path):
    path = copy_tiny_checkpoint("tinyllava", tmp_path / "ckpt", sharded=True)
    (path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing files: model-00001-of-00002.safetensors"):
        load_checkpoint(path)


def test_no_weights_lists_what_is_there(tmp_path):
    path = copy_tiny_checkpoint("llava_phi", tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in .*expected one of model.safetensors"):
        load_checkpoint(path)


def test_missing_config_says_what_is_supported(tmp_path):
    path = copy_tiny_checkpoint("llava_phi", tmp_path / "ckpt")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json.*llava_phi, mipha_phi"):
        load_checkpoint(path)


def test_unknown_model_type_is_named(tmp_path):
    path = copy_tiny_checkpoint("llava_phi", tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(CheckpointError, match="model_type 'llava'; supported: llava_phi"):
        load_checkpoint(path)


def test_layout_comes_from_config_not_folder_name(tmp_path):
    path = copy_tiny_checkpoint("mipha_phi", tmp_path / "llava-phi-2-but-really-mipha")
    assert load_checkpoint(path).spec.name == "mipha_phi"


def test_missing_tokenizer_is_named(tmp_path):
    path = copy_tiny_checkpoint("llava_phi", tmp_path / "ckpt")
    for name in ("tokenizer.json", "vocab.json"):
        (path / name).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_checkpoint(path)


def test_not_a_directory_nor_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere" / "at-all")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(tiny_checkpoint("llava_phi") / "config.json")


def test_hub_id_offline_fails_fast_with_a_hint(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    started = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint("zxmonent/llava-phi")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "'zxmonent/llava-phi'" in message and "--model /path/to/dir" in message
    assert "huggingface-cli download zxmonent/llava-phi --local-dir DIR" in message


# ---- the command -----------------------------------------------------------------------------


def test_make_tiny_command(tmp_path, capsys):
    from vlm_ros.cli import main

    out = tmp_path / "tiny"
    args = ["make-tiny", "--family", "tiny_llava_phi", "--out", str(out), "--format", "sharded"]
    assert main([*args, "--fused-qkv", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / tiny.LEGACY_TOWER_DIR / "config.json").is_file()
    assert load_checkpoint(out).spec.name == "tiny_llava_phi"


# ---- hub ids (huggingface_hub.snapshot_download faked: nothing is downloaded) -----------------


@pytest.fixture
def fake_hub(monkeypatch):
    """snapshot_download(repo_id=...) -> the directory registered for that id; the ids asked
    for are recorded. An unregistered id fails the way an offline hub does."""
    import huggingface_hub

    repos: dict[str, Path] = {}
    asked: list[str] = []

    def snapshot_download(repo_id: str, **kwargs) -> str:
        asked.append(repo_id)
        if repo_id not in repos:
            raise OSError(f"fake hub: no repository {repo_id}")
        return str(repos[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return repos, asked


def test_hub_id_loads_the_downloaded_snapshot(fake_hub):
    repos, asked = fake_hub
    repos["zxmonent/llava-phi"] = tiny_checkpoint("llava_phi")
    loaded = load_checkpoint("zxmonent/llava-phi")
    assert asked == ["zxmonent/llava-phi"]
    assert loaded.path == tiny_checkpoint("llava_phi") and loaded.spec.name == "llava_phi"
    local = load_checkpoint(tiny_checkpoint("llava_phi")).model.state_dict()
    assert all(torch.equal(v, local[k]) for k, v in loaded.model.state_dict().items())


def test_legacy_vision_tower_hub_id_is_fetched_the_same_way(tmp_path, fake_hub):
    repos, asked = fake_hub
    path = copy_tiny_checkpoint("tiny_llava_phi", tmp_path / "ckpt")
    tower = shutil.move(str(path / tiny.LEGACY_TOWER_DIR), str(tmp_path / "siglip"))
    config = json.loads((path / "config.json").read_text())
    config["mm_vision_tower"] = "bczhou/TinyLLaVA-3.1B-SigLIP"  # as published
    (path / "config.json").write_text(json.dumps(config))
    repos["bczhou/TinyLLaVA-3.1B"] = path
    repos["bczhou/TinyLLaVA-3.1B-SigLIP"] = Path(tower)
    loaded = load_checkpoint("bczhou/TinyLLaVA-3.1B")
    assert asked == ["bczhou/TinyLLaVA-3.1B", "bczhou/TinyLLaVA-3.1B-SigLIP"]
    assert loaded.vision_tower_path == Path(tower)
    local = load_checkpoint(tiny_checkpoint("tiny_llava_phi")).model.state_dict()
    assert all(torch.equal(v, local[k]) for k, v in loaded.model.state_dict().items())
    del repos["bczhou/TinyLLaVA-3.1B-SigLIP"]  # the tower's id cannot be fetched: say so
    with pytest.raises(CheckpointError, match="vision tower .mm_vision_tower. 'bczhou/Tiny"):
        load_checkpoint("bczhou/TinyLLaVA-3.1B")


def test_vision_tower_override_is_refused_where_the_tower_is_inside(tmp_path):
    with pytest.raises(CheckpointError, match="mipha_phi keeps its vision tower inside"):
        load_checkpoint(tiny_checkpoint("mipha_phi"), vision_tower=tmp_path)


# ---- devices and dtypes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, gpus, words",
    [
        ("bogus", 0, "unknown device 'bogus'; expected cpu, cuda or cuda:N"),
        ("mps", 0, "unknown device 'mps'"),
        ("cuda", 0, "torch sees no CUDA GPU"),
        ("cuda:3", 2, "torch sees 2 CUDA GPU(s): cuda:0..cuda:1"),
    ],
)
def test_bad_device_is_refused_before_loading(device, gpus, words, monkeypatch):
    from vlm_ros.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(InputError, match=re.escape(words)):
        load_checkpoint(tiny_checkpoint("llava_phi"), device=device)


def test_explicit_float16_warns_where_the_reference_does(caplog):
    def overflow_warnings():  # (not the CPU-speed warning, which depends on this CPU)
        return [r for r in caplog.records if "overflow" in r.getMessage()]

    with caplog.at_level("WARNING", logger="vlm_ros.model.checkpoint"):
        load_checkpoint(tiny_checkpoint("mipha_phi"), dtype="float16")  # its reference: fp16
        assert not overflow_warnings()
        loaded = load_checkpoint(tiny_checkpoint("llava_phi"), dtype="float16")
    assert loaded.dtype == torch.float16
    (record,) = overflow_warnings()
    assert "float16 requested for llava_phi" in record.getMessage()
    assert "bfloat16" in record.getMessage() and "float32" in record.getMessage()


def test_emulated_cpu_precision_warns(caplog, monkeypatch):
    """bfloat16 on a CPU without native bf16 matrix instructions is slower than float32: the
    loader says so (and stays quiet where the CPU has them)."""
    from vlm_ros.model import checkpoint

    for native in (True, False):
        monkeypatch.setattr(checkpoint, "cpu_has_native", lambda dtype, native=native: native)
        caplog.clear()
        with caplog.at_level("WARNING", logger="vlm_ros.model.checkpoint"):
            loaded = load_checkpoint(tiny_checkpoint("mipha_phi"), dtype="bfloat16")
        assert loaded.dtype == torch.bfloat16
        emulated = [r for r in caplog.records if "emulated" in r.getMessage()]
        assert len(emulated) == (0 if native else 1)
