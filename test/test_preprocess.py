"""Preprocessing against transformers' own image processors and the references' pad-to-square.

Pixels must agree bit for bit (tolerance 0): both sides resize uint8 with PIL bicubic and do the
same float64 rescale / float32 normalise, so any difference is a real deviation (a rounding of
the shortest-edge size, a crop offset, a pad colour) and would change the model's answers.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from vlm_ros.config import ImageLimits
from vlm_ros.errors import InputError
from vlm_ros.infer.preprocess import preprocess
from vlm_ros.model.families import FAMILIES

CLIP = FAMILIES["llava_phi"].processing  # 336, shortest edge + crop, pad (122, 116, 104)
SIGLIP = FAMILIES["mipha_phi"].processing  # 384, direct resize, pad (127, 127, 127)
SHAPES = [(48, 64), (64, 48), (37, 91), (50, 50), (13, 200)]


def _image(shape, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*shape, channels) if channels else shape, dtype=np.uint8)


def _clip_reference(size: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )


def _siglip_reference(size: int) -> SiglipImageProcessorPil:
    return SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """The references' expand2square (LLaVA mm_utils), written from its documented behaviour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def _reference(processing, rgb: np.ndarray, pad: bool) -> torch.Tensor:
    pil = Image.fromarray(rgb)
    if pad:
        pil = expand2square(pil, tuple(int(m * 255) for m in processing.mean))
    if processing.mode == "shortest_edge_crop":
        processor = _clip_reference(processing.size)
    else:
        processor = _siglip_reference(processing.size)
    return processor(images=pil, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("processing", [CLIP, SIGLIP], ids=["clip", "siglip"])
@pytest.mark.parametrize("pad", [False, True], ids=["no-pad", "pad"])
def test_matches_transformers_processor(shape, processing, pad):
    rgb = _image(shape)
    ours = preprocess(rgb, replace(processing, pad_to_square=pad))
    ref = _reference(processing, rgb, pad)
    assert ours.shape == ref.shape == (1, 3, processing.size, processing.size)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref), f"max diff {(ours - ref).abs().max().item()}"


@pytest.mark.parametrize("size", [42, 57])
def test_tiny_and_odd_sizes_match(size):
    """Tiny checkpoints use 42 px; an odd size checks the crop offset rounding."""
    rgb = _image((33, 70))
    for processing, ref in [(CLIP, _clip_reference), (SIGLIP, _siglip_reference)]:
        p = replace(processing, size=size, pad_to_square=False)
        expected = ref(size)(images=rgb, return_tensors="pt")["pixel_values"]
        assert torch.equal(preprocess(rgb, p), expected)


def test_pad_colours_are_the_references():
    assert CLIP.pad_color == (122, 116, 104)
    assert SIGLIP.pad_color == (127, 127, 127)
    # a black image padded: the corners come out as the pad colour, normalised
    out = preprocess(np.zeros((10, 40, 3), np.uint8), replace(SIGLIP, size=40))
    assert torch.allclose(out[0, :, 0, 0], torch.full((3,), (127 / 255 - 0.5) / 0.5))


def test_factory_tinyllava_does_not_pad():
    assert not FAMILIES["tinyllava"].processing.pad_to_square
    assert all(FAMILIES[f].processing.pad_to_square for f in ("llava_phi", "mipha_phi"))


def test_bgr_equals_rgb_reversed():
    rgb = _image((40, 60))
    assert torch.equal(preprocess(rgb[:, :, ::-1].copy(), CLIP, "bgr"), preprocess(rgb, CLIP))
    assert not torch.equal(preprocess(rgb, CLIP, "bgr"), preprocess(rgb, CLIP))


def test_gray_is_replicated():
    gray = _image((40, 60), channels=0)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    expected = preprocess(rgb, SIGLIP)
    assert torch.equal(preprocess(gray, SIGLIP), expected)
    assert torch.equal(preprocess(gray[:, :, None], SIGLIP), expected)
    assert torch.equal(preprocess(gray, SIGLIP, "bgr"), expected)  # order is moot for gray


def test_alpha_is_dropped_like_pil_convert_rgb():
    rgba = _image((40, 60), channels=4)
    pil_rgb = np.asarray(Image.fromarray(rgba, "RGBA").convert("RGB"))
    assert torch.equal(preprocess(rgba, CLIP), preprocess(pil_rgb, CLIP))
    bgra = rgba[:, :, [2, 1, 0, 3]].copy()
    assert torch.equal(preprocess(bgra, CLIP, "bgr"), preprocess(pil_rgb, CLIP))


def test_non_contiguous_input():
    big = _image((80, 120))
    view = big[::2, ::2]
    assert torch.equal(preprocess(view, CLIP), preprocess(view.copy(), CLIP))


@pytest.mark.parametrize(
    "image, words",
    [
        ([[1, 2], [3, 4]], ["numpy uint8 array", "list"]),
        (np.zeros((32, 32, 3), np.float32), ["dtype uint8", "float32", "(32, 32, 3)"]),
        (np.zeros((32, 32, 3), np.uint16), ["dtype uint8", "uint16"]),
        (np.zeros((32,), np.uint8), ["HxW", "(32,)"]),
        (np.zeros((2, 32, 32, 3), np.uint8), ["HxW", "(2, 32, 32, 3)"]),
        (np.zeros((32, 32, 2), np.uint8), ["channels", "got 2"]),
        (np.zeros((32, 32, 5), np.uint8), ["channels", "got 5"]),
        (np.zeros((0, 32, 3), np.uint8), ["empty", "(0, 32, 3)"]),
        (np.zeros((32, 0), np.uint8), ["empty", "(32, 0)"]),
        (np.zeros((4, 32, 3), np.uint8), ["too small", "4x32"]),
        (np.zeros((9000, 8, 3), np.uint8), ["too large", "9000x8"]),
    ],
)
def test_bad_images_are_refused_by_name(image, words):
    with pytest.raises(InputError) as info:
        preprocess(image, CLIP)
    for word in words:
        assert word in str(info.value)


def test_limits_are_configurable():
    with pytest.raises(InputError, match="too large"):
        preprocess(_image((50, 60)), CLIP, limits=ImageLimits(max_side=59))
    preprocess(_image((4, 60)), CLIP, limits=ImageLimits(min_side=4))


def test_bad_color_order():
    with pytest.raises(InputError, match="color_order"):
        preprocess(_image((40, 40)), CLIP, "rgba")
