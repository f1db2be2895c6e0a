"""The published model families and what differs between them.

Facts from the reference repositories (shared/facts/model-formats.md). Everything that differs
between LLaVA-Phi, Mipha and the two TinyLLaVA layouts lives here, so the rest of the pipeline
reads a FamilySpec and never branches on a family name or, worse, a folder name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

from vlm_ros.config import check_choice

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Phi-2's "<|endoftext|>": every family stops on it, whatever its config's eos says
# (Mipha's and a LLaVA-Phi upload's config say eos 2).
ENDOFTEXT_ID = 50256
IMAGE_TOKEN_INDEX = -200  # placeholder id used by all reference implementations

VisionKind = Literal["clip", "siglip"]
ProcessingMode = Literal["shortest_edge_crop", "resize"]
VISION_KINDS: tuple[VisionKind, ...] = get_args(VisionKind)
PROCESSING_MODES: tuple[ProcessingMode, ...] = get_args(ProcessingMode)


@dataclass(frozen=True)
class ImageProcessing:
    """How a family turns an RGB image into pixel values.

    mode "shortest_edge_crop": CLIPImageProcessor (resize shortest edge to size, bicubic, centre
    crop size x size). mode "resize": SigLIP (direct size x size bicubic resize, no crop).
    pad_to_square: the "pad" image_aspect_ratio: centre the image on a square of pad_color first.
    """

    size: int
    mode: ProcessingMode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_to_square: bool

    def __post_init__(self) -> None:
        check_choice("ImageProcessing.mode", self.mode, PROCESSING_MODES)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        # The references fill with tuple(int(x * 255) for x in image_mean):
        # (122, 116, 104) for CLIP, (127, 127, 127) for SigLIP.
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]


@dataclass(frozen=True)
class FamilySpec:
    """One published family, resolved for one checkpoint (config.json may override defaults)."""

    name: str  # config.json model_type
    vision_kind: VisionKind
    processing: ImageProcessing
    select_layer: int  # hidden_states index of the vision tower (penultimate layer: -2)
    drop_first_token: bool  # CLIP drops CLS; Factory TinyLLaVA drops a real patch (trained so)
    lm_head_bias: bool  # TinyLLaVABench's class redefines lm_head without bias
    dtype_cpu: str = "float32"
    dtype_cuda: str = "bfloat16"
    stop_token_id: int = ENDOFTEXT_ID
    # The reference warns that float16 overflows (inf/nan): an explicit float16 is logged as a
    # warning at load, and non-finite logits are refused at run time for every family.
    fp16_overflows: bool = False

    def __post_init__(self) -> None:
        check_choice("FamilySpec.vision_kind", self.vision_kind, VISION_KINDS)

    def num_image_tokens(self, image_size: int, patch_size: int) -> int:
        """Image embeddings spliced into the prompt: 576 / 729 / 728 for the published models."""
        n = (image_size // patch_size) ** 2 + (1 if self.vision_kind == "clip" else 0)
        return n - 1 if self.drop_first_token else n

    def default_dtype(self, device: str) -> str:
        return self.dtype_cuda if device.startswith("cuda") else self.dtype_cpu

    def with_overrides(self, **kwargs) -> FamilySpec:
        return replace(self, **kwargs)


_CLIP_336 = ImageProcessing(336, "shortest_edge_crop", CLIP_MEAN, CLIP_STD, pad_to_square=True)
_SIGLIP_384 = ImageProcessing(384, "resize", SIGLIP_MEAN, SIGLIP_STD, pad_to_square=True)

# Defaults per model_type; the loader resolves the final spec from config.json
# (image_aspect_ratio, mm_vision_select_layer) and the preprocessor config.
FAMILIES: dict[str, FamilySpec] = {
    # LLaVA-Phi: CLIP ViT-L/14-336 inside the checkpoint, drop CLS -> 576 tokens. Its reference
    # loads fp32 (fp16 gives NaN), so on CUDA we default to bf16 (same exponent range as fp32).
    "llava_phi": FamilySpec(
        "llava_phi", "clip", _CLIP_336, -2, True, True, dtype_cuda="bfloat16", fp16_overflows=True
    ),
    # Mipha: SigLIP-so400m-384 inside, all 729 tokens; checkpoint is bf16.
    "mipha_phi": FamilySpec(
        "mipha_phi", "siglip", _SIGLIP_384, -2, False, True, dtype_cuda="bfloat16"
    ),
    # TinyLLaVA legacy (TinyLLaVABench): SigLIP in a separate directory, 729 tokens, no lm_head
    # bias. Its SigLIP class deletes the last encoder layer and reads hidden_states[-1]: the
    # loader builds that truncated tower, hence -1 here (= -2 of the full SigLIP).
    "tiny_llava_phi": FamilySpec(
        "tiny_llava_phi", "siglip", _SIGLIP_384, -1, False, False, dtype_cuda="float16"
    ),
    # TinyLLaVA Factory: "square" (plain resize), strategy "patch" drops the first SigLIP patch
    # -> 728 tokens.
    "tinyllava": FamilySpec(
        "tinyllava",
        "siglip",
        replace(_SIGLIP_384, pad_to_square=False),
        -2,
        True,
        True,
        dtype_cuda="float16",
    ),
}
