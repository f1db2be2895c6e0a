"""Train the embedded demo model: stand-in pretraining, then the papers' two-stage recipe.

No pretrained CLIP or Phi exist offline, so their pretraining is replaced by honest stand-ins:
    0a. vision tower: supervised on scene ground truth (per lane: box colour x distance or none)
        through a throw-away linear head on the penultimate layer's patch features (the ones the
        LLaVA family reads);
    0b. decoder: a language model on the world's text (questions, answers, captions).
Then, as LLaVA-Phi / TinyLLaVA / Mipha:
    1.  feature alignment: ONLY the projector trains, on captions (tower and decoder frozen);
    2.  instruction tuning: projector + decoder + vision tower train on QA and action answers
        (Mipha and TinyLLaVA found unfreezing the tower helps small models).
Then, for the demo's scene answer:
    3.  captions: a fresh probe head on the tower's features (3a, tower frozen), then everything
        on half captions, half QA and actions, plus the probe's loss (3b), so that the place
        and each box's distance, which no question asks about, are in every image token.
Training runs through the pipeline's own code: VlmModel (the class the loader builds),
preprocess.preprocess (pad to square on the family's colour, resize, crop, normalise),
prompt.prompt_ids (the one template, split at <image>) and answers as " answer<|endoftext|>"
after "ASSISTANT:" (what ranking.py scores). The result is written in the LLaVA-Phi layout with
tiny.py's key naming, and loads with checkpoint.load_checkpoint like a published checkpoint.

Deterministic given the seed and the thread count: torch.manual_seed, deterministic algorithms,
fixed step counts, data order from a seeded numpy Generator, single-threaded data generation.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import CLIPVisionConfig, DynamicCache, PhiConfig

from vlm_ros.demo import data, world
from vlm_ros.demo.tokenizer import ENDOFTEXT, train_tokenizer
from vlm_ros.infer import prompt
from vlm_ros.infer.preprocess import preprocess
from vlm_ros.model.checkpoint import load_tokenizer
from vlm_ros.model.compat import cache_kwarg
from vlm_ros.model.families import CLIP_MEAN, CLIP_STD, FAMILIES, ImageProcessing
from vlm_ros.model.network import VlmModel
from vlm_ros.model.tiny import (
    _LLAVA_BODY,
    _mm_projector,
    _phi_fields,
    _published_state,
    _rename,
    _vision_fields,
    _write_weights,
)

# Camera sizes scenes are rendered at for training (the pipeline pads any size to square).
RENDER_SIZES = ((96, 72), (128, 96), (160, 120), (320, 240))
LANE_CLASSES = 1 + len(world.COLOURS) * 2  # none, or (colour, distance)
STAGE3 = ("probe", "describe")  # the caption stage's two parts (TrainConfig's comment)
PLACE_TARGETS = 2  # corridor (side walls), doorway: two yes/no targets (place_head)


@dataclass(frozen=True)
class TrainConfig:
    """Sizes and schedule. Defaults are the shipped model (about 20-30 min on a 2-core CPU)."""

    seed: int = 0
    # Both cores of the 2-core machine kind: an instruction step took 0.21 s against 0.32 s on
    # one thread (Intel Xeon, quiet, a micro-benchmark). The same thread count gives the same
    # weights whatever the core count. On a CPU another job keeps busy, two OpenMP threads
    # spin-wait for each other (once measured 5-8x slower than one): there use
    # `train-demo --threads 1`, which gives other, equally reproducible, weights.
    threads: int = 2
    image_size: int = 64
    patch_size: int = 16  # 4 x 4 patches -> 16 image tokens (CLS dropped): short sequences
    vision: dict = field(
        default_factory=lambda: dict(
            hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4
        )
    )
    # gelu_pytorch_tanh: Phi's tanh GELU (gelu_new) as one fused kernel, forward and backward;
    # gelu_new's eight elementwise ops took a fifth of a training step.
    text: dict = field(
        default_factory=lambda: dict(
            hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            hidden_act="gelu_pytorch_tanh",
        )
    )  # fmt: skip
    train_scenes: int = 10000
    val_scenes: int = 200
    batch_size: int = 32
    steps: dict = field(
        default_factory=lambda: dict(
            vision=2000, language=300, align=300, instruct=5000, probe=300, describe=3000
        )
    )
    lr: dict = field(
        default_factory=lambda: dict(
            vision=2e-3, language=2e-3, align=2e-3, instruct=1e-3, probe=2e-3, describe=1e-3
        )
    )
    # Scale of the decoder's token embeddings at init (Phi's default is 0.02). Image embeddings
    # are brought to the same scale before alignment (match_projector), so image and text
    # tokens enter the residual stream on an equal footing instead of 600x apart.
    embed_std: float = 1.0
    match_projector: bool = True
    # Learning-rate multiplier of the vision tower in instruction tuning (the rest: 1).
    tower_lr_scale: float = 1.0
    # Ask "where" about every box of a training scene (data.questions' every_box), and repeat
    # each question type ``repeat[kind]`` times in the instruction mix: binding a colour named
    # in the question to a lane (left/right confusions with three boxes) and counting are the
    # skills the small decoder learns last, so they get more examples.
    every_box: bool = True
    repeat: dict = field(default_factory=lambda: {"where": 2})
    # Stage 0a also predicts each colour's lane (LaneHead).
    colour_head: bool = True
    # Stage 0a's extra targets (off in the shipped recipe, whose stages 0a-2 are unchanged
    # since the first captions-only model; stage 3's probe head has them): with
    # colour_distance each colour's target is its lane x near/far, with place_head the place
    # (corridor? doorway?) is a target too.
    colour_distance: bool = False
    place_head: bool = False
    # Share of stage 2's steps that train on captions (the rest: questions and actions).
    caption_share: float = 0.1
    # Stage 3, captions ("Describe the scene.", the demo's periodic scene answer). After stage 2
    # the captions named boxes and lanes right but guessed the place (no question asks it; the
    # tower was never taught it) and often a side box's distance (named right after the colour,
    # "a blue box far on the left": the decoder must read it by colour). 3a fits a fresh probe
    # head (every patch predicts lanes, each colour's lane x distance, corridor? doorway?) on
    # the frozen tower; 3b trains everything on describe_caption_share captions + questions and
    # actions, with the probe's loss (x probe_weight) keeping those facts in every image token.
    # It draws from its own generator (seed, 3) and seeds torch before the probe, so it can
    # also run from a saved stage-2 checkpoint (train(after_instruct=...)).
    describe_caption_share: float = 0.6
    probe_weight: float = 1.0

    def scaled(self, factor: float) -> TrainConfig:
        """The same recipe with every stage's step count times ``factor`` (--minutes)."""
        steps = {k: max(1, int(round(v * factor))) for k, v in self.steps.items()}
        return TrainConfig(**{**asdict(self), "steps": steps})


# ---- setup -----------------------------------------------------------------------------------


def set_determinism(seed: int, threads: int) -> None:
    """Same seed + same thread count -> same weights."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def processing(cfg: TrainConfig) -> ImageProcessing:
    """LLaVA-Phi's CLIP processing at the demo's size: pad to square on (122, 116, 104)."""
    return ImageProcessing(cfg.image_size, "shortest_edge_crop", CLIP_MEAN, CLIP_STD, True)


def build_model(cfg: TrainConfig, vocab: int) -> VlmModel:
    vision = CLIPVisionConfig(
        **cfg.vision,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=64,
        attention_dropout=0.0,
    )
    text = PhiConfig(**phi_fields(cfg, vocab))
    return VlmModel(FAMILIES["llava_phi"], vision, text)


def phi_fields(cfg: TrainConfig, vocab: int) -> dict:
    fields = {**_phi_fields(vocab, bos=1, eos=2), **cfg.text, "resid_pdrop": 0.0}
    fields["max_position_embeddings"] = 512
    del fields["rope_scaling"]
    return fields


# ---- data ------------------------------------------------------------------------------------


@dataclass
class Images:
    """Preprocessed pixels [N, 3, S, S] of scenes (row i = seeds[i]) and lane labels [N, 3]."""

    seeds: list[int]
    pixels: torch.Tensor
    lanes: torch.Tensor
    colours: torch.Tensor  # [N, 4]: per colour, 0 = absent, else 1 + its lane's index
    far: torch.Tensor  # [N, 4]: per colour, 1 when its box is far (0 when absent or near)
    place: torch.Tensor  # [N, 2]: corridor, doorway (0/1)

    @functools.cached_property
    def _index(self) -> dict[int, int]:
        return {s: i for i, s in enumerate(self.seeds)}

    def rows(self, seeds: list[int]) -> torch.Tensor:
        return torch.tensor([self._index[s] for s in seeds])


def lane_label(scene: world.Scene, lane: str) -> int:
    box = scene.box_in(lane)
    if box is None:
        return 0
    return 1 + list(world.COLOURS).index(box.colour) * 2 + (box.distance == "far")


def colour_label(scene: world.Scene, colour: str) -> int:
    box = next((b for b in scene.boxes if b.colour == colour), None)
    return 0 if box is None else 1 + world.LANES.index(box.lane)


def far_label(scene: world.Scene, colour: str) -> int:
    box = next((b for b in scene.boxes if b.colour == colour), None)
    return int(box is not None and box.distance == "far")


def place_label(scene: world.Scene) -> list[int]:
    return [int(scene.corridor), int(scene.doorway is not None)]


def render_images(seeds: range, proc: ImageProcessing, progress=None) -> Images:
    """Render each scene at a seed-chosen camera size and preprocess it like the pipeline."""
    pixels, lanes, colours, far, place = [], [], [], [], []
    for seed in seeds:
        scene = world.scene_from_seed(seed)
        width, height = RENDER_SIZES[seed % len(RENDER_SIZES)]
        pixels.append(preprocess(world.render(scene, width, height), proc)[0])
        lanes.append([lane_label(scene, lane) for lane in world.LANES])
        colours.append([colour_label(scene, colour) for colour in world.COLOURS])
        far.append([far_label(scene, colour) for colour in world.COLOURS])
        place.append(place_label(scene))
        if progress is not None:
            progress.update(1)
    return Images(
        list(seeds),
        torch.stack(pixels),
        torch.tensor(lanes),
        torch.tensor(colours),
        torch.tensor(far),
        torch.tensor(place),
    )


class TextCodec:
    """Sample -> (ids after the image placeholder incl. the answer, loss mask) via prompt.py."""

    def __init__(self, tokenizer, stop_id: int):
        self.tokenizer, self.stop_id = tokenizer, stop_id
        before, _ = prompt.split_at_image(prompt.prompt_ids(tokenizer, "x"))
        self.before = before  # identical for every question: the system text and "USER: "
        # (question, answer) -> encode's result: tokenizing 32 prompts took ~25 ms of a
        # ~200 ms training step, for the same few thousand texts over and over
        self._encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def encode(self, sample: data.Sample) -> tuple[list[int], list[int]]:
        key = (sample.question, sample.answer)
        if key not in self._encoded:
            self._encoded[key] = self._encode(sample)
        return self._encoded[key]

    def _encode(self, sample: data.Sample) -> tuple[list[int], list[int]]:
        before, after = prompt.split_at_image(prompt.prompt_ids(self.tokenizer, sample.question))
        assert before == self.before
        answer = prompt.encode_text(self.tokenizer, prompt.ANSWER_PREFIX + sample.answer)
        answer.append(self.stop_id)
        return after + answer, [0] * len(after) + [1] * len(answer)


def batch_tensors(encoded: list[tuple[list[int], list[int]]], pad: int):
    """Right-pad -> tokens, attention mask, loss mask: [B, T] each."""
    steps = max(len(ids) for ids, _ in encoded)
    rows = [(ids, mask, steps - len(ids)) for ids, mask in encoded]
    tokens = torch.tensor([ids + [pad] * n for ids, _, n in rows])
    attn = torch.tensor([[1] * len(ids) + [0] * n for ids, _, n in rows])
    loss = torch.tensor([mask + [0] * n for _, mask, n in rows], dtype=torch.bool)
    return tokens, attn, loss


# ---- forward passes --------------------------------------------------------------------------


def multimodal_logits(model: VlmModel, codec: TextCodec, pixels, samples, features=None):
    """Teacher-forced logits of every answer-side token. Inputs are spliced as
    decode.splice_image does: the system ids, the N image embeddings in place of the
    placeholder, then question and answer ids. -> (logits [B, T, V] where row t predicts
    tokens[:, t], tokens [B, T], loss mask [B, T]). ``features``: model.image_features(pixels)
    when the caller has them already (stage 3's probe reads the same features).

    The system ids are the same for every sample and come first, so under causal attention
    their keys and values do not depend on the sample: they are computed once (batch 1) and
    repeated over the batch, as a prefix cache; their gradient is the sum over the batch's
    rows, as in a full-batch pass. A third to a half of a step's tokens, computed once
    instead of B times (test_prefix_once_equals_the_full_batch_pass)."""
    tokens, attn, loss_mask = batch_tensors([codec.encode(s) for s in samples], codec.stop_id)
    batch = tokens.shape[0]
    # [B, N, hidden]: encode_images, i.e. the projector on the tower's features
    image = model.encode_images(pixels) if features is None else model.projector(features)
    before = model.embed_tokens(torch.tensor([codec.before]))  # [1, P, hidden]
    lm = model.language_model
    cache = DynamicCache(config=lm.config)
    lm(inputs_embeds=before, use_cache=True, **cache_kwarg(cache))  # fills the cache
    cache.batch_repeat_interleave(batch)
    embeds = torch.cat([image, model.embed_tokens(tokens)], dim=1)  # [B, N + T, hidden]
    prefix = before.shape[1] + image.shape[1]
    mask = torch.cat([torch.ones(batch, prefix, dtype=torch.long), attn], dim=1)
    logits = lm(inputs_embeds=embeds, attention_mask=mask, **cache_kwarg(cache)).logits
    # [B, N + T, V]: row r is sequence position P + r
    # position p predicts token p + 1: the rows predicting tokens[:, t] are N - 1 + t
    rows = image.shape[1] - 1
    return logits[:, rows : rows + tokens.shape[1]], tokens, loss_mask


def multimodal_loss(
    model: VlmModel, codec: TextCodec, pixels, samples, features=None
) -> torch.Tensor:
    """Cross-entropy over the answer tokens (" answer<|endoftext|>") only."""
    predicting, tokens, loss_mask = multimodal_logits(model, codec, pixels, samples, features)
    return F.cross_entropy(predicting[loss_mask], tokens[loss_mask])


def language_loss(model: VlmModel, tokenizer, stop_id: int, lines: list[str]) -> torch.Tensor:
    """Next-token loss on plain world text (each line ends with <|endoftext|>)."""
    encoded = [prompt.encode_text(tokenizer, line) + [stop_id] for line in lines]
    tokens, attn, _ = batch_tensors([(ids, ids) for ids in encoded], stop_id)
    logits = model.language_model(input_ids=tokens, attention_mask=attn).logits
    target = tokens[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1))


class LaneHead(nn.Module):
    """Stand-in pretraining head: patch features [B, N, d] -> per patch, logits of each target
    group: every lane's content [B, N, 3, classes], every colour's lane (absent/left/centre/
    right, or with ``colour_distance`` absent or lane x near/far) [B, N, 4, 4 or 7], and with
    ``place`` corridor? and doorway? [B, N, 2, 2].

    One Linear shared by every patch, and every patch predicts the whole scene. This makes the
    tower put the scene's content into each token in a position-independent form. The decoder
    (rotary positions only, and a question of varying length between the image and the answer)
    can then read it by content. With a flattened per-position head, it had to know which token
    index is which, and it learned that slowly (the first shipped model: 36-80% per type). The
    colour -> lane targets (``colours``) carry the same ground truth indexed by colour, the form
    "where is the red box?" reads; without them the decoder confused left and right.
    """

    def __init__(
        self, hidden: int, colours: bool = True, colour_distance: bool = False, place: bool = False
    ):
        super().__init__()
        lanes = len(world.LANES)
        self.groups = {"lanes": (lanes, LANE_CLASSES)}  # name -> (targets, classes)
        if colours:
            self.groups["colours"] = (len(world.COLOURS), 1 + lanes * (1 + colour_distance))
        if place:
            self.groups["place"] = (PLACE_TARGETS, 2)
        self.linear = nn.Linear(hidden, sum(n * c for n, c in self.groups.values()))

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start, logits = self.linear(feats), 0, {}
        for name, (targets, classes) in self.groups.items():
            chunk = out[..., start : start + targets * classes]
            logits[name] = chunk.unflatten(-1, (targets, classes))
            start += targets * classes
        return logits

    def labels(self, images: Images, rows) -> dict[str, torch.Tensor]:
        """Each group's labels [B, targets] of the scenes ``rows``."""
        labels = {"lanes": images.lanes[rows]}
        if "colours" in self.groups:
            lane = images.colours[rows]  # 0 absent, else 1 + lane
            with_distance = self.groups["colours"][1] > 1 + len(world.LANES)
            far = images.far[rows]
            labels["colours"] = (lane - 1) * 2 + 1 + far if with_distance else lane
            labels["colours"] = labels["colours"].clamp(min=0)
        if "place" in self.groups:
            labels["place"] = images.place[rows]
        return labels


def _per_patch_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    target = labels[:, None, :].expand(-1, logits.shape[1], -1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def lane_loss(head: LaneHead, feats: torch.Tensor, images: Images, rows) -> torch.Tensor:
    """Cross-entropy of every patch's prediction of the scene (lanes, colours, place)."""
    logits, labels = head(feats), head.labels(images, rows)
    return sum(_per_patch_ce(logits[name], labels[name]) for name in head.groups)


@torch.no_grad()
def head_accuracy(model: VlmModel, head: LaneHead, images: Images) -> dict[str, float]:
    """Per target group, the fraction of (scene, target) labels the head gets right from the
    patches' mean logits ("lanes": each lane's content)."""
    logits = head(model.image_features(images.pixels))
    labels = head.labels(images, torch.arange(len(images.seeds)))
    return {
        name: round(float((logits[name].mean(dim=1).argmax(-1) == labels[name]).float().mean()), 4)
        for name in head.groups
    }


# ---- stages ----------------------------------------------------------------------------------


def only_trainable(model: VlmModel, *parts: str) -> list[nn.Parameter]:
    """Freeze everything but the named submodules; return their parameters."""
    for name, param in model.named_parameters():
        param.requires_grad = name.split(".")[0] in parts
    return [p for p in model.parameters() if p.requires_grad]


def schedule(step: int, total: int, warmup: int = 20) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class Log:
    """Loss log (JSON lines) + a tqdm bar for the whole run."""

    def __init__(self, path: Path, total: int, quiet: bool = False):
        self.file = path.open("w")
        self.bar = tqdm(total=total, disable=quiet, unit="step", dynamic_ncols=True)
        self.start = time.monotonic()

    def step(self, stage: str, step: int, loss: float, lr: float) -> None:
        row = {
            "stage": stage,
            "step": step,
            "loss": round(loss, 5),
            "lr": lr,
            "elapsed_s": round(time.monotonic() - self.start, 1),
        }
        self.file.write(json.dumps(row) + "\n")
        self.bar.set_description(f"{stage} loss {loss:.3f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.file.close()


def run_stage(
    name, model, params, steps, lr, rng, loss_fn, log: Log, extra=(), lr_scale=None
) -> list[float]:
    """AdamW over ``params`` (+ extra modules' parameters) for ``steps``; returns the losses.
    ``lr_scale`` maps a top-level submodule name to a learning-rate multiplier."""
    params = list(params) + [p for m in extra for p in m.parameters()]
    lr_scale = lr_scale or {}
    if lr_scale:
        part_of = {id(p): n.split(".")[0] for n, p in model.named_parameters()}
        multipliers = sorted({lr_scale.get(part_of.get(id(p)), 1.0) for p in params})
        groups = [
            {"params": [p for p in params if lr_scale.get(part_of.get(id(p)), 1.0) == m], "mult": m}
            for m in multipliers
        ]
    else:
        groups = [{"params": params, "mult": 1.0}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    losses = []
    model.train()
    for step in range(steps):
        scale = schedule(step, steps)
        for group in opt.param_groups:
            group["lr"] = lr * scale * group["mult"]
        loss = loss_fn(rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        log.step(name, step, losses[-1], lr * scale)
    model.eval()
    return losses


# ---- the whole recipe ------------------------------------------------------------------------


def train(
    out: str | Path,
    cfg: TrainConfig = TrainConfig(),
    quiet: bool = False,
    after_instruct: str | Path | None = None,
) -> dict:
    """Run every stage and write a loadable LLaVA-Phi-layout checkpoint into ``out``.

    Returns a summary (first/last losses per stage, timings) also written to train_log.json.
    Stages 0a-2 run in this order, each drawing from the one seeded generator: the order is
    part of what makes a run reproducible. Stage 3 draws from its own (seed, 3) generator and
    seeds torch itself, so ``after_instruct`` (a checkpoint that stages 0a-2 of the same
    config wrote) can stand in for stages 0a-2: the same weights either way.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    set_determinism(cfg.seed, cfg.threads)
    started = time.monotonic()
    stages = STAGE3 if after_instruct else tuple(cfg.steps)
    run = _prepare(out, cfg, quiet, sum(cfg.steps[name] for name in stages))
    if after_instruct is None:
        _pretrain_vision(run)
        _pretrain_language(run)
        _align(run)
        _instruct(run)
    else:
        load_stage2(run.model, after_instruct)
        run.summary["after_instruct"] = str(after_instruct)
    if any(cfg.steps.get(name, 0) for name in STAGE3):  # 0 steps: stop after stage 2
        _describe(run)
    run.log.close()
    save_checkpoint(run.model, cfg, out)
    run.summary["minutes"] = round((time.monotonic() - started) / 60, 2)
    run.summary["config"] = asdict(cfg)
    (out / "train_log.json").write_text(json.dumps(run.summary, indent=2) + "\n")
    return run.summary


@dataclass
class _Run:
    """One training run's state, shared by the stages: the model and tokenizer, the rendered
    training scenes and their samples, the one seeded generator, the log and the summary."""

    cfg: TrainConfig
    model: VlmModel
    tokenizer: object
    stop_id: int
    codec: TextCodec
    proc: ImageProcessing
    seeds: range
    images: Images
    samples: list[data.Sample]
    rng: np.random.Generator
    log: Log
    summary: dict = field(default_factory=dict)

    @property
    def captions(self) -> list[data.Sample]:
        return [s for s in self.samples if s.kind == "caption"]

    @property
    def instruct(self) -> list[data.Sample]:
        """Question/action samples, each kind repeated as cfg.repeat says."""
        plain = [s for s in self.samples if s.kind != "caption"]
        return [s for s in plain for _ in range(self.cfg.repeat.get(s.kind, 1))]

    def pick(self, pool: list) -> list:
        return [pool[int(i)] for i in self.rng.integers(len(pool), size=self.cfg.batch_size)]

    def with_pixels(self, batch: list[data.Sample]) -> tuple[torch.Tensor, list[data.Sample]]:
        return self.images.pixels[self.images.rows([s.seed for s in batch])], batch

    def stage(self, name: str, parts: tuple[str, ...], loss_fn, extra=(), lr_scale=None) -> None:
        """Train ``parts`` of the model on ``loss_fn`` for the stage's steps; record its ends."""
        params = only_trainable(self.model, *parts)
        steps, lr = self.cfg.steps[name], self.cfg.lr[name]
        losses = run_stage(
            name, self.model, params, steps, lr, self.rng, loss_fn, self.log, extra, lr_scale
        )
        self.summary[name] = _ends(losses)


def _prepare(out: Path, cfg: TrainConfig, quiet: bool, total_steps: int) -> _Run:
    """Tokenizer, model, rendered training scenes and their samples (in the seeded order)."""
    train_tokenizer(out)
    tokenizer = load_tokenizer(out)
    stop_id = tokenizer.get_vocab()[ENDOFTEXT]
    model = build_model(cfg, vocab=-(-len(tokenizer) // 64) * 64)
    if cfg.embed_std:
        nn.init.normal_(model.language_model.get_input_embeddings().weight, std=cfg.embed_std)
    proc = processing(cfg)
    seeds = data.split_seeds("train", cfg.train_scenes)
    images = render_images(seeds, proc)
    samples = data.samples_for(seeds, with_captions=True, every_box=cfg.every_box)
    rng = np.random.default_rng(cfg.seed)
    log = Log(out / "train_log.jsonl", total_steps, quiet)
    codec = TextCodec(tokenizer, stop_id)
    return _Run(cfg, model, tokenizer, stop_id, codec, proc, seeds, images, samples, rng, log)


def _pretrain_vision(run: _Run) -> None:
    """0a. vision tower stand-in pretraining (supervised lane contents)."""
    model, images, rng, bs = run.model, run.images, run.rng, run.cfg.batch_size
    cfg = run.cfg
    head = LaneHead(
        model.vision_config.hidden_size, cfg.colour_head, cfg.colour_distance, cfg.place_head
    )

    def vision_loss(_):
        rows = torch.from_numpy(rng.integers(len(run.seeds), size=bs))
        return lane_loss(head, model.image_features(images.pixels[rows]), images, rows)

    run.stage("vision", ("vision_tower",), vision_loss, (head,))
    val_images = render_images(data.split_seeds("val", run.cfg.val_scenes), run.proc)
    accuracy = head_accuracy(model, head, val_images)
    run.summary["vision_val_lane_accuracy"] = accuracy["lanes"]
    run.summary["vision_val_accuracy"] = accuracy


def _pretrain_language(run: _Run) -> None:
    """0b. decoder stand-in pretraining (language model on world text)."""
    lines = [s.question + " " + s.answer for s in run.samples]
    size = run.cfg.batch_size

    def text_loss(_):
        batch = [lines[int(i)] for i in run.rng.integers(len(lines), size=size)]
        return language_loss(run.model, run.tokenizer, run.stop_id, batch)

    run.stage("language", ("language_model",), text_loss)


def _align(run: _Run) -> None:
    """1. alignment: projector only, captions. First bring the projector's output to the
    scale of the token embeddings (a LayerNorm-friendly init of its last layer)."""
    if run.cfg.match_projector:
        gain = match_projector_scale(run.model, run.images.pixels[:256])
        run.summary["projector_gain"] = gain
    captions = run.captions
    run.stage(
        "align",
        ("projector",),
        lambda _: multimodal_loss(run.model, run.codec, *run.with_pixels(run.pick(captions))),
    )


def _instruct(run: _Run) -> None:
    """2. instruction tuning: everything, QA + actions + captions (cfg.caption_share)."""
    captions, instruct = run.captions, run.instruct

    def mixed_loss(_):
        share = run.cfg.caption_share
        batch = run.pick(instruct) if run.rng.random() > share else run.pick(captions)
        return multimodal_loss(run.model, run.codec, *run.with_pixels(batch))

    everything = ("projector", "language_model", "vision_tower")
    run.stage("instruct", everything, mixed_loss, lr_scale={"vision_tower": run.cfg.tower_lr_scale})


def _describe(run: _Run) -> None:
    """3. captions: 3a fits a fresh probe head on the frozen tower's features (lanes, each
    colour's lane x distance, corridor? doorway?); 3b trains everything on captions + questions
    and actions, plus the probe's loss on the same image features."""
    cfg, model, images = run.cfg, run.model, run.images
    run.rng = np.random.default_rng([cfg.seed, 3])  # stage 3's own: see train(after_instruct)
    torch.manual_seed(cfg.seed + 3)
    head = LaneHead(model.vision_config.hidden_size, True, colour_distance=True, place=True)

    def probe_loss(_):
        rows = torch.from_numpy(run.rng.integers(len(run.seeds), size=cfg.batch_size))
        with torch.no_grad():
            feats = model.image_features(images.pixels[rows])
        return lane_loss(head, feats, images, rows)

    run.stage("probe", (), probe_loss, (head,))
    captions, instruct = run.captions, run.instruct

    def describe_loss(_):
        share = cfg.describe_caption_share
        batch = run.pick(instruct) if run.rng.random() > share else run.pick(captions)
        rows = images.rows([s.seed for s in batch])
        feats = model.image_features(images.pixels[rows])
        answer = multimodal_loss(model, run.codec, images.pixels[rows], batch, feats)
        return answer + cfg.probe_weight * lane_loss(head, feats, images, rows)

    everything = ("projector", "language_model", "vision_tower")
    run.stage("describe", everything, describe_loss, (head,))
    val_images = render_images(data.split_seeds("val", cfg.val_scenes), run.proc)
    run.summary["probe_val_accuracy"] = head_accuracy(model, head, val_images)


def load_stage2(model: VlmModel, checkpoint: str | Path) -> None:
    """Load the weights of a checkpoint that stages 0a-2 wrote (save_checkpoint) into
    ``model``: float32, every tensor, exactly."""
    from vlm_ros.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(Path(checkpoint))
    state = loaded.model.state_dict()
    own = model.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ValueError(f"{checkpoint}: not a checkpoint of this recipe's model")
    model.load_state_dict(state)


@torch.no_grad()
def match_projector_scale(model: VlmModel, pixels: torch.Tensor) -> float:
    """Scale the projector's last Linear so projected image embeddings have the std of the
    decoder's token embeddings. -> the gain applied."""
    image_std = float(model.encode_images(pixels).std())
    text_std = float(model.language_model.get_input_embeddings().weight.std())
    gain = text_std / image_std
    last = model.projector[2]
    last.weight.mul_(gain)
    last.bias.mul_(gain)
    return round(gain, 6)


def _ends(losses: list[float]) -> dict:
    k = max(1, len(losses) // 10)
    return {
        "steps": len(losses),
        "first": round(float(np.mean(losses[:k])), 4),
        "last": round(float(np.mean(losses[-k:])), 4),
    }


# ---- writing the checkpoint (LLaVA-Phi layout) -----------------------------------------------


def save_checkpoint(model: VlmModel, cfg: TrainConfig, out: Path) -> None:
    """model.safetensors with LLaVA-Phi's key names (tiny.py's naming), config.json nested as
    LLaVA-Phi's, and the CLIP preprocessor config at the demo's size."""
    keys = {"vision_tower.": "model.vision_tower.", **_LLAVA_BODY}
    state = _rename(_published_state(model), keys)
    _write_weights(out, state, safetensors=True, sharded=False)
    text = model.text_config
    projector = {
        **_mm_projector(),
        "mm_hidden_size": model.vision_config.hidden_size,
        "hidden_size": text.hidden_size,
    }
    config = {
        **phi_fields(cfg, text.vocab_size),
        "rope_scaling": None,
        "architectures": ["LlavaPhiForCausalLM"],
        "model_type": "llava_phi",
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
        "image_aspect_ratio": "pad",
        "freeze_vision_tower": False,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "tokenizer_model_max_length": 512,
        "tokenizer_padding_side": "right",
        "vision_config": {
            "vision_tower": {
                **_vision_fields(model.vision_config),
                "mm_vision_select_feature": "patch",
                "mm_vision_select_layer": -2,
            },
            "mm_projector": projector,
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_preprocessor(out, cfg.image_size)


def write_preprocessor(out: Path, size: int) -> None:
    """CLIPImageProcessor fields as CLIP-336's file, at ``size``."""
    doc = {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "image_processor_type": "CLIPImageProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": size},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(doc, indent=2) + "\n")
