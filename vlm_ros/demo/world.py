"""A seeded synthetic robot-camera world: scenes with ground truth, and their rendering.

A scene is what a forward-looking robot camera sees in a corridor or a room: floor, back wall
(sometimes with a doorway), side walls, up to three coloured boxes — at most one per lane (left,
centre, right), each near or far — some muted floor clutter, and lighting changes plus sensor
noise. Everything the demo model is asked about is in the ``Scene`` ground truth, and
``render(scene, width, height)`` draws it at any resolution, so the same scene can be shown to
the model (any camera size; the pipeline pads to square) and published by the synthetic camera.

Hooks for the ROS side: the synthetic camera (vlm_ros.ros.synthetic_camera) holds scene
``scene_for_frame(k)`` for a few seconds, drawing it with ``render(scene, w, h, view)`` (each view
with fresh noise and a small shift); ``render_frame(index, width, height)`` renders
``scene_for_frame(index)`` itself, whose ground truth tests can query with vlm_ros.demo.data.
Determinism: a scene depends only on its seed (numpy Generator), rendering only on the scene
(and the view).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 75, 210),
    "yellow": (225, 200, 40),
}
LANES = ("left", "centre", "right")
ACTIONS = ("continue", "slow_down", "stop", "turn_left", "turn_right")
HORIZON = 0.45  # image row (fraction of height) where the floor meets the back wall
# Box geometry in image fractions per distance: lane centres x, width, height, bottom y.
# Far boxes sit nearer the vanishing point (perspective), so lanes converge.
GEOMETRY = {
    "near": {"x": (0.2, 0.5, 0.8), "w": 0.2, "h": 0.27, "bottom": 0.93},
    "far": {"x": (0.33, 0.5, 0.67), "w": 0.1, "h": 0.13, "bottom": 0.62},
}
CLUTTER_COLOURS = ((110, 100, 90), (90, 80, 70), (140, 135, 125), (75, 75, 80))
# The synthetic camera's frames come from this seed range (disjoint from training: see data.py).
FRAME_SEED_BASE = 9_000_000
# A held scene seen again (render's ``view`` > 0) moves by at most this fraction of the image
# size (whole pixels): a robot creeping or vibrating. The shipped demo model's action stayed
# right on 99.6-100% of such views of 250 camera scenes (1.5% with a rescale: 87-89%).
VIEW_SHIFT = 0.01


@dataclass(frozen=True)
class Box:
    colour: str  # a key of COLOURS
    lane: str  # "left" | "centre" | "right"
    distance: str  # "near" | "far"
    jitter: tuple[float, float]  # (dx, size scale - 1): small per-box variation


@dataclass(frozen=True)
class Scene:
    """Ground truth of one camera frame (and everything needed to draw it again)."""

    seed: int
    boxes: tuple[Box, ...]
    corridor: bool  # side walls (corridor) or an open room
    doorway: float | None  # x centre of a doorway in the back wall, or None
    wall: tuple[int, int, int]
    floor: tuple[int, int, int]
    clutter: tuple[tuple[float, float, float, int], ...]  # (x, y, size, colour index)
    light: float  # global brightness factor
    gradient: float  # left-to-right lighting slope
    noise: float  # sensor noise std (grey levels)

    def box_in(self, lane: str) -> Box | None:
        return next((b for b in self.boxes if b.lane == lane), None)


# ---- sampling ---------------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator, seed: int = -1, action: str | None = None) -> Scene:
    """A random scene. The correct action (see data.action_for) is drawn first, uniformly, and
    the lanes are filled to match, so all five actions are equally common; ``action`` forces it."""
    action = action or ACTIONS[int(rng.integers(len(ACTIONS)))]
    occupancy = _lanes_for(action, rng)  # lane -> "near" | "far" | None
    colours = list(rng.permutation(list(COLOURS)))
    boxes = tuple(
        Box(
            colours.pop(),
            lane,
            dist,
            (float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.1, 0.1))),
        )
        for lane, dist in occupancy.items()
        if dist is not None
    )
    return Scene(
        seed=seed,
        boxes=boxes,
        corridor=bool(rng.random() < 0.6),
        doorway=float(rng.uniform(0.25, 0.75)) if rng.random() < 0.5 else None,
        wall=_shade(rng, (170, 170, 160), 25),
        floor=_shade(rng, (120, 110, 100), 20),
        clutter=tuple(
            (
                float(rng.uniform(0.05, 0.95)),
                float(rng.uniform(HORIZON + 0.05, 0.98)),
                float(rng.uniform(0.01, 0.03)),
                int(rng.integers(len(CLUTTER_COLOURS))),
            )
            for _ in range(int(rng.integers(0, 6)))
        ),
        light=float(rng.uniform(0.7, 1.2)),
        gradient=float(rng.uniform(-0.15, 0.15)),
        noise=float(rng.uniform(2.0, 8.0)),
    )


def scene_from_seed(seed: int) -> Scene:
    """The scene of ``seed``: the only way the splits, the camera and the tests make scenes."""
    return sample_scene(np.random.default_rng(seed), seed)


def _lanes_for(action: str, rng: np.random.Generator) -> dict[str, str | None]:
    """Lane occupancy that makes ``action`` correct under data.action_for's rule."""

    def side() -> str | None:  # a side lane: empty, or a box near or far
        return (None, "near", "far")[int(rng.integers(3))]

    def filled() -> str:
        return ("near", "far")[int(rng.integers(2))]

    left, right = side(), side()
    if action == "continue":
        centre = None
    elif action == "slow_down":
        centre = "far"
    else:
        centre = "near"
        if action == "turn_left":
            left = None
        elif action == "turn_right":
            left, right = filled(), None
        else:  # stop
            left, right = filled(), filled()
    return {"left": left, "centre": centre, "right": right}


def _shade(
    rng: np.random.Generator, base: tuple[int, int, int], spread: int
) -> tuple[int, int, int]:
    offset = int(rng.integers(-spread, spread + 1))
    return tuple(int(np.clip(c + offset + rng.integers(-6, 7), 0, 255)) for c in base)  # type: ignore[return-value]


# ---- rendering --------------------------------------------------------------------------------


def render(scene: Scene, width: int = 96, height: int = 72, view: int = 0) -> np.ndarray:
    """Draw ``scene`` -> HxWx3 RGB uint8. Deterministic: noise comes from the scene's seed.
    ``view`` > 0 is the same scene seen again by a camera that holds it (the synthetic camera):
    fresh sensor noise and a shift of up to VIEW_SHIFT of the image size, seeded by
    (seed, view); view 0 is the scene's own image, as the training and test splits see it."""
    if view > 0:
        return _view(scene, width, height, view)
    return _lighting(_draw(scene, width, height), scene, scene.seed + 7_919)


def _draw(scene: Scene, width: int, height: int) -> np.ndarray:
    """The scene's geometry and colours, before lighting and noise -> HxWx3 float32."""
    canvas = np.empty((height, width, 3), dtype=np.float32)
    horizon = int(round(HORIZON * height))
    canvas[:horizon] = scene.wall
    canvas[horizon:] = scene.floor
    if scene.doorway is not None:
        _rect(canvas, scene.doorway - 0.07, 0.12, scene.doorway + 0.07, HORIZON, (70, 55, 45))
    if scene.corridor:
        _side_walls(canvas, scene.wall)
    for x, y, size, index in scene.clutter:
        _rect(canvas, x - size, y - size, x + size, y + size, CLUTTER_COLOURS[index])
    # far boxes first, so a near box in front covers them
    for box in sorted(scene.boxes, key=lambda b: b.distance != "far"):
        _box(canvas, box)
    return canvas


def _view(scene: Scene, width: int, height: int, view: int) -> np.ndarray:
    """The scene's drawing moved by whole pixels (up to VIEW_SHIFT of the size; the edges
    repeated into the gap) and lit with noise of its own: the same ground truth, other pixels."""
    rng = np.random.default_rng((scene.seed, view))
    margin = max(1, int(round(VIEW_SHIFT * max(width, height))))
    dx, dy = (int(d) for d in rng.integers(-margin, margin + 1, 2))
    padded = np.pad(_draw(scene, width, height), ((margin,) * 2, (margin,) * 2, (0, 0)), "edge")
    canvas = padded[margin + dy : margin + dy + height, margin + dx : margin + dx + width]
    return _lighting(canvas, scene, int(rng.integers(1 << 31)))


def render_frame(index: int, width: int, height: int) -> np.ndarray:
    """The synthetic camera's hook: frame ``index`` shows ``scene_for_frame(index)``."""
    return render(scene_for_frame(index), width, height)


def scene_for_frame(index: int) -> Scene:
    """Ground truth of camera frame ``index``; a new scene every frame, none from training."""
    return scene_from_seed(FRAME_SEED_BASE + index)


def _px(fraction: float, size: int) -> int:
    return int(round(min(max(fraction, 0.0), 1.0) * size))


def _rect(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour) -> None:
    h, w = canvas.shape[:2]
    canvas[_px(y0, h) : _px(y1, h), _px(x0, w) : _px(x1, w)] = colour


def _side_walls(canvas: np.ndarray, wall: tuple[int, int, int]) -> None:
    """Corridor walls: triangles from the image edges towards the vanishing point, shaded."""
    h, w = canvas.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    u, v = (xs + 0.5) / w, (ys + 0.5) / h
    reach = 0.12 * np.clip(1.0 - np.abs(v - HORIZON) / 0.6, 0.0, 1.0) + 0.02  # wall width
    side = (u < reach) | (u > 1.0 - reach)
    canvas[side] = np.asarray(wall, dtype=np.float32) * 0.75


def _box(canvas: np.ndarray, box: Box) -> None:
    """A box: front face in its colour, a lighter top strip, a dark shadow below."""
    g = GEOMETRY[box.distance]
    scale = 1.0 + box.jitter[1]
    cx = g["x"][LANES.index(box.lane)] + box.jitter[0]
    half, height = g["w"] * scale / 2, g["h"] * scale
    bottom = g["bottom"]
    top = bottom - height
    colour = np.asarray(COLOURS[box.colour], dtype=np.float32)
    _rect(canvas, cx - half, bottom, cx + half, bottom + 0.02, (40, 38, 36))
    _rect(canvas, cx - half, top, cx + half, bottom, colour)
    _rect(canvas, cx - half, top, cx + half, top + height * 0.2, np.minimum(colour * 1.25, 255))


def _lighting(canvas: np.ndarray, scene: Scene, noise_seed: int) -> np.ndarray:
    """Global brightness, a left-right gradient and Gaussian sensor noise -> uint8."""
    h, w = canvas.shape[:2]
    ramp = 1.0 + scene.gradient * (np.linspace(-1.0, 1.0, w, dtype=np.float32))
    lit = canvas * scene.light * ramp[None, :, None]
    noise = np.random.default_rng(noise_seed).normal(0.0, scene.noise, lit.shape)
    return np.clip(lit + noise, 0, 255).astype(np.uint8)
