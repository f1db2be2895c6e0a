"""The demo world, its data, its training recipe and the shipped demo model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlm_ros.demo import data, world
from vlm_ros.demo.evaluate import evaluate, scene_image

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "demo"


# ---- world and data ---------------------------------------------------------------------------


def test_same_seed_same_image_bytes():
    a = world.render(world.scene_from_seed(123), 96, 72)
    b = world.render(world.scene_from_seed(123), 96, 72)
    c = world.render(world.scene_from_seed(124), 96, 72)
    assert a.dtype == np.uint8 and a.shape == (72, 96, 3)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_render_frame_hook_matches_scene_for_frame():
    frame = world.render_frame(3, 320, 240)
    assert frame.shape == (240, 320, 3)
    assert np.array_equal(frame, world.render(world.scene_for_frame(3), 320, 240))


def test_splits_never_share_a_scene():
    ranges = {name: data.split_seeds(name, data.SPLIT_SIZE) for name in data.SPLITS}
    names = list(ranges)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert max(ranges[a]) < min(ranges[b]) or max(ranges[b]) < min(ranges[a])
    assert world.FRAME_SEED_BASE > max(max(r) for r in ranges.values())
    with pytest.raises(ValueError):
        data.split_seeds("train", data.SPLIT_SIZE + 1)


def test_answers_follow_the_ground_truth():
    actions = set()
    for sample in data.samples_for(data.split_seeds("val", 150)):
        scene = world.scene_from_seed(sample.seed)
        centre = scene.box_in("centre")
        if sample.kind == "count":
            assert sample.answer == str(len(scene.boxes))
        elif sample.kind == "clear":
            assert sample.answer == ("yes" if centre is None else "no")
        elif sample.kind == "colour":
            assert sample.answer == (centre.colour if centre else "none")
        elif sample.kind == "where":
            box = next(b for b in scene.boxes if f" {b.colour} " in sample.question)
            assert sample.answer == box.lane
        else:
            actions.add(sample.answer)
            left, right = scene.box_in("left"), scene.box_in("right")
            expected = (
                "continue" if centre is None
                else "slow_down" if centre.distance == "far"
                else "turn_left" if left is None
                else "turn_right" if right is None
                else "stop"
            )  # fmt: skip
            assert sample.answer == expected
    assert actions == set(world.ACTIONS)


def test_the_image_shows_the_ground_truth_obstacle():
    """The pixels at the centre of a near centre box are that box's colour (image == truth)."""
    checked = 0
    for seed in data.split_seeds("val", 60):
        scene = world.scene_from_seed(seed)
        box = scene.box_in("centre")
        if box is None or box.distance != "near":
            continue
        image = world.render(scene, 160, 120).astype(int)
        g = world.GEOMETRY["near"]
        y = int((g["bottom"] - g["h"] * 0.4) * 120)
        pixel = image[y - 2 : y + 3, 78:83].reshape(-1, 3).mean(0)
        nearest = min(world.COLOURS, key=lambda c: np.abs(
            np.asarray(world.COLOURS[c]) * scene.light - pixel).sum())  # fmt: skip
        assert nearest == box.colour
        checked += 1
    assert checked >= 5


# ---- training ---------------------------------------------------------------------------------


def _tiny_config():
    from vlm_ros.demo.train import TrainConfig

    return TrainConfig(
        image_size=32,
        patch_size=16,
        vision=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
        ),
        text=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
        ),
        train_scenes=48,
        batch_size=8,
        steps=dict(vision=4, language=4, align=4, instruct=12, probe=4, describe=6),
        lr=dict(vision=3e-3, language=3e-3, align=3e-3, instruct=3e-3, probe=3e-3, describe=3e-3),
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from vlm_ros.demo.train import train

    out = tmp_path_factory.mktemp("demo")
    torch_threads = torch.get_num_threads()
    try:
        summary = train(out, _tiny_config(), quiet=True)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(torch_threads)
    return out, summary


def test_training_smoke_lowers_the_loss_and_writes_a_loadable_checkpoint(smoke_run):
    from vlm_ros.model.checkpoint import load_checkpoint

    out, summary = smoke_run
    assert summary["instruct"]["last"] < summary["instruct"]["first"]
    assert (out / "train_log.jsonl").read_text().count("\n") == sum(_tiny_config().steps.values())
    loaded = load_checkpoint(out)
    assert loaded.spec.name == "llava_phi"
    assert loaded.spec.processing.size == 32 and loaded.spec.processing.pad_to_square


def test_training_is_deterministic_given_the_seed(smoke_run, tmp_path):
    from vlm_ros.demo.train import train

    out, _ = smoke_run
    threads = torch.get_num_threads()
    try:
        train(tmp_path, _tiny_config(), quiet=True)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    first = (out / "model.safetensors").read_bytes()
    assert (tmp_path / "model.safetensors").read_bytes() == first


def test_stage3_from_a_stage2_checkpoint_gives_the_same_bytes(smoke_run, tmp_path):
    """train(after_instruct=...) (`train-demo --after-instruct`): stage 3 run from the
    checkpoint that stages 0a-2 wrote gives the whole run's weights byte for byte (how the
    shipped model's stage 3 was run from the previous shipped model, models/demo/README.md)."""
    from dataclasses import replace

    from vlm_ros.demo.train import train

    out, summary = smoke_run
    cfg = _tiny_config()
    threads = torch.get_num_threads()
    try:
        stage2 = replace(cfg, steps={**cfg.steps, "probe": 0, "describe": 0})
        only2 = train(tmp_path / "stage2", stage2, quiet=True)
        resumed = train(tmp_path / "stage3", cfg, quiet=True, after_instruct=tmp_path / "stage2")
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    assert "describe" not in only2 and summary["describe"] == resumed["describe"]
    first = (out / "model.safetensors").read_bytes()
    assert (tmp_path / "stage2" / "model.safetensors").read_bytes() != first
    assert (tmp_path / "stage3" / "model.safetensors").read_bytes() == first


def test_training_path_matches_the_pipeline(smoke_run):
    """The logits training optimises are the logits the pipeline answers with: same
    preprocessing, prompt, splicing and model (so what is trained is what is served)."""
    from vlm_ros.demo.train import TextCodec, multimodal_logits
    from vlm_ros.infer.pipeline import Assistant
    from vlm_ros.infer.preprocess import preprocess

    out, _ = smoke_run
    assistant = Assistant.load(str(out))
    seed = data.split_seeds("test", 1)[0]
    _, image = scene_image(seed)
    sample = data.Sample(seed, "count", "How many boxes are there?", "2")
    trace = assistant.trace(image, sample.question, max_new_tokens=1)
    codec = TextCodec(assistant.tokenizer, assistant.stop_token_id)
    pixels = preprocess(image, assistant.family.processing)
    with torch.no_grad():
        logits, _, mask = multimodal_logits(assistant.model, codec, pixels, [sample])
    first_answer_row = int(mask[0].nonzero()[0])
    torch.testing.assert_close(
        logits[0, first_answer_row], trace.step_logits[0], atol=1e-4, rtol=1e-4
    )


def _full_batch_logits(model, codec, pixels, samples):
    """The reference: every row runs the whole spliced sequence, system ids included."""
    from vlm_ros.demo.train import batch_tensors

    tokens, attn, _ = batch_tensors([codec.encode(s) for s in samples], codec.stop_id)
    image = model.encode_images(pixels)
    before = model.embed_tokens(torch.tensor([codec.before])).expand(tokens.shape[0], -1, -1)
    embeds = torch.cat([before, image, model.embed_tokens(tokens)], dim=1)
    prefix = before.shape[1] + image.shape[1]
    mask = torch.cat([torch.ones(tokens.shape[0], prefix, dtype=torch.long), attn], dim=1)
    logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
    return logits[:, prefix - 1 : prefix - 1 + tokens.shape[1]]


def test_prefix_once_equals_the_full_batch_pass(smoke_run):
    """Training runs the shared system ids once and repeats their cache over the batch: the
    same logits, and the same gradients (summed over the rows), as the full-batch pass."""
    from vlm_ros.demo.train import TextCodec, batch_tensors, multimodal_logits
    from vlm_ros.infer.pipeline import Assistant
    from vlm_ros.infer.preprocess import preprocess

    out, _ = smoke_run
    assistant = Assistant.load(str(out))
    model = assistant.model
    codec = TextCodec(assistant.tokenizer, assistant.stop_token_id)
    seeds = data.split_seeds("val", 4)
    samples = [data.samples_for([seed], with_captions=True)[i] for i, seed in enumerate(seeds)]
    assert len({len(codec.encode(s)[0]) for s in samples}) > 1  # padded rows are in the batch
    pixels = torch.cat([preprocess(scene_image(s.seed)[1], assistant.family.processing)
                        for s in samples])  # fmt: skip

    tokens, _, mask = batch_tensors([codec.encode(s) for s in samples], codec.stop_id)

    def run(logits_fn):
        model.zero_grad(set_to_none=True)
        logits = logits_fn(model, codec, pixels, samples)
        loss = torch.nn.functional.cross_entropy(logits[mask], tokens[mask])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    with torch.enable_grad():
        once, once_grads = run(lambda *a: multimodal_logits(*a)[0])
        full, full_grads = run(_full_batch_logits)
    torch.testing.assert_close(once, full, atol=1e-5, rtol=1e-5)
    assert set(once_grads) == set(full_grads) and len(once_grads) > 10
    for name, grad in full_grads.items():
        torch.testing.assert_close(once_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # the system ids' embeddings get gradient from every row, as in the full pass
    embed = "language_model.model.embed_tokens.weight"
    assert once_grads[embed][codec.before].abs().sum() > 0


# ---- the shipped model ------------------------------------------------------------------------


CHANCE = {"colour": 1 / 5, "clear": 1 / 2, "where": 1 / 3, "count": 1 / 4, "action": 1 / 5}
# What the shipped model must score on a 30-scene test slice, per type: the target.
# Its full test-split scores (models/demo/eval_demo.json, README) are higher; a broken pipeline
# (pad colour, channel order, splice, prompt) falls towards CHANCE.
MIN_SLICE = 0.9


def test_shipped_demo_model_answers_every_question_type():
    """On unseen test scenes, through the public Assistant API, every question type and the
    action hint are right on at least MIN_SLICE of the slice (chance: CHANCE)."""
    from vlm_ros.infer.pipeline import Assistant

    assistant = Assistant.load("demo")
    assert assistant.family.name == "llava_phi"
    report = evaluate(assistant, n=30)
    assert set(report.total) == set(CHANCE) and min(report.total.values()) >= 20
    low = {k: v for k, v in report.accuracy().items() if v < MIN_SLICE}
    assert not low, (low, report.errors)


def test_shipped_demo_model_is_what_train_demo_makes():
    """The shipped weights were made by the recipe `vlm-ros train-demo` runs by default, in a
    recorded run within 30 minutes, and its recorded scores keep the questions and the action
    hint at >= 99% (issue 19) and the captions at CAPTION_FLOOR."""
    import json
    from dataclasses import asdict

    from vlm_ros.demo.train import TrainConfig

    log = json.loads((SHIPPED / "train_log.json").read_text())
    assert log["config"] == json.loads(json.dumps(asdict(TrainConfig())))
    assert 0 < log["minutes"] <= 30.0, log["minutes"]  # the recorded run: issue 19's budget
    scores = json.loads((SHIPPED / "eval_demo.json").read_text())
    assert scores["scenes"] >= 500
    targeted = {k: v for k, v in scores["accuracy"].items() if k in CHANCE}
    assert set(targeted) == set(CHANCE) and min(targeted.values()) >= 0.99, scores["accuracy"]
    captions = {k: scores["accuracy"][k] for k in CAPTION_FLOOR}
    low = {k: v for k, v in captions.items() if v < CAPTION_FLOOR[k]}
    assert not low, low


# Issue 19's targets for the captions on the full test split (eval_demo.json); the shipped model
# meets them (models/demo/README.md). CAPTION_FLOOR: the bar the recorded scores must meet.
CAPTION_TARGETS = {
    "caption": 0.9,
    "caption_place": 0.98,
    "caption_colour": 0.95,
    "caption_lane": 0.95,
    "caption_distance": 0.95,
}
CAPTION_FLOOR = CAPTION_TARGETS
# What a 40-scene test slice must show through Assistant (a few points under the full split's
# figures: the slice is small). The model before issue 19 scored 30% whole, place 45%,
# distance 78% on the first 20 of these scenes.
CAPTION_SLICE = {"caption": 0.8, "caption_place": 0.95, "caption_colour": 0.95,
                 "caption_lane": 0.95, "caption_distance": 0.9, "caption_path": 0.95}  # fmt: skip


def test_shipped_demo_model_describes_test_scenes():
    """ "Describe the scene." (the demo's periodic scene answer) on unseen test scenes, through
    the public Assistant API: whole captions exact, and the place, every box's colour, lane and
    distance and the path sentence right (caption_parts)."""
    from vlm_ros.infer.pipeline import Assistant

    assistant = Assistant.load("demo")
    report = evaluate(assistant, n=40, captions=True, questions=False)
    assert report.total["caption"] == 40 and report.total["caption_distance"] >= 60
    accuracy = report.accuracy()
    low = {k: accuracy[k] for k, bar in CAPTION_SLICE.items() if accuracy[k] < bar}
    assert not low, (low, report.errors)


def test_caption_parts_score_each_mistake_once():
    """caption_parts, the figures behind the caption targets: a caption with the wrong place
    and one side box's distance wrong fails exactly those parts; one that drops a box fails
    that box's colour, lane and distance."""
    from vlm_ros.demo.evaluate import caption_parts

    scene = world.scene_from_seed(2_000_002)  # a corridor with a doorway, two side boxes
    gold = data.caption(scene)
    assert all(ok for _, ok in caption_parts(scene, gold))
    left, right = sorted(scene.boxes, key=lambda b: world.LANES.index(b.lane))
    assert (left.lane, right.lane) == ("left", "right")
    other = "near" if right.distance == "far" else "far"
    wrong = gold.replace("a corridor with a doorway.", "a room.").replace(
        f"{right.colour} box {right.distance}", f"{right.colour} box {other}"
    )
    failed = [part for part, ok in caption_parts(scene, wrong) if not ok]
    assert failed == ["place", "distance"], wrong
    dropped = gold.replace(f" a {left.colour} box {left.distance} on the left.", "")
    failed = [part for part, ok in caption_parts(scene, dropped) if not ok]
    assert failed == ["colour", "lane", "distance"], dropped


def test_a_swapped_channel_order_shows_as_wrong_colours():
    """By meaning: the same scenes with red and blue swapped (an RGB image declared BGR) make
    the shipped model name the other colour. Random weights could never show this."""
    from vlm_ros.infer.pipeline import Assistant

    assistant = Assistant.load("demo")
    swap = {"red": "blue", "blue": "red"}
    right = swapped = asked = 0
    for seed in data.split_seeds("test", 120):
        scene, image = scene_image(seed)
        truth = data.obstacle_colour(scene)
        if truth not in swap:
            continue
        question = data.PHRASINGS["colour"][0]
        asked += 1
        right += assistant.answer(image, question, max_new_tokens=4).text.strip() == truth
        wrong_order = assistant.answer(image, question, max_new_tokens=4, color_order="bgr")
        swapped += wrong_order.text.strip() == swap[truth]
    assert asked >= 10
    assert right / asked >= 0.9 and swapped / asked >= 0.7, (asked, right, swapped)


def longest_caption_tokens(frames: int = 10_000) -> tuple[int, str]:
    """The most tokens (demo tokenizer, as the answer follows "ASSISTANT:") of any caption of
    the synthetic camera's first ``frames`` scenes, and that caption."""
    from vlm_ros.model.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(Path(__file__).resolve().parents[1] / "models" / "demo")
    captions = {data.caption(world.scene_for_frame(i)) for i in range(frames)}
    counted = {len(tokenizer.encode(" " + c, add_special_tokens=False)): c for c in captions}
    return max(counted.items())


def test_shipped_configs_never_cut_a_demo_caption():
    """config/demo.yaml's max_new_tokens 24 cut 27% of the captions mid-phrase. Every shipped
    profile (and `vlm-ros node --demo`) must leave room for the longest caption plus the
    <|endoftext|> that ends it with stop_reason eos."""
    import yaml

    longest, text = longest_caption_tokens()
    assert longest >= 30 and text.count(" box ") == 3, text  # the world's worst case is in
    need = longest + 1
    assert data.CAPTION_MAX_NEW_TOKENS >= need
    configs = sorted((Path(__file__).resolve().parents[1] / "config").glob("*.yaml"))
    for path in configs:
        params = yaml.safe_load(path.read_text())["/**"]["ros__parameters"]
        assert params["max_new_tokens"] >= need, f"{path.name}: {params['max_new_tokens']} < {need}"


def test_train_demo_arguments_give_the_recipe_or_a_named_change():
    """`vlm-ros train-demo`: no arguments give the shipped recipe (2 threads); --threads and
    --minutes change only what they name (both are part of what makes the weights)."""
    import argparse
    from dataclasses import asdict

    from vlm_ros.commands import train_demo
    from vlm_ros.demo.train import TrainConfig

    parser = argparse.ArgumentParser()
    train_demo.add_arguments(parser)
    assert train_demo.config(parser.parse_args([])) == TrainConfig()
    assert TrainConfig().threads == 2
    one = train_demo.config(parser.parse_args(["--threads", "1", "--seed", "3"]))
    assert asdict(one) == {**asdict(TrainConfig()), "threads": 1, "seed": 3}
    half = train_demo.config(parser.parse_args(["--minutes", "10"]))
    assert half.steps["instruct"] == 2500 and half.threads == 2
