"""The wire contract's checks (vlm_ros/serving/wire.py) and the replica's logic
(model_server.py), without Ray: what a client can get wrong is refused with the contract's
status and code, and the replica answers exactly like the local Assistant."""

from __future__ import annotations

import base64
import hashlib
import io
import threading

import numpy as np
import pytest
from PIL import Image

from vlm_ros.config import GenerationConfig, RuntimeConfig
from vlm_ros.demo import world
from vlm_ros.infer.pipeline import Assistant
from vlm_ros.serving import wire
from vlm_ros.serving.model_server import ModelServer

LIMITS = wire.WireLimits(max_image_bytes=64 * 1024, max_pixels=100_000)


def encoded(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def body(question="Describe the scene.", data: bytes | None = None, mime="image/png", **extra):
    data = encoded(world.render(world.scene_from_seed(5))) if data is None else data
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": "demo", "messages": [{"role": "user", "content": content}], **extra}


def refusal(b: dict) -> wire.WireError:
    with pytest.raises(wire.WireError) as info:
        wire.parse_chat(b, "demo", LIMITS, 0.0)
    assert "\n" not in info.value.message
    return info.value


def test_a_good_body_parses():
    job = wire.parse_chat(
        body(max_tokens=7, temperature=0.5, stop="x", seed=3), "demo", LIMITS, 1.0
    )
    assert (job.max_tokens, job.temperature, job.stop, job.seed, job.stream) == (
        7,
        0.5,
        ("x",),
        3,
        False,
    )
    gen = job.generation(GenerationConfig())
    assert gen.do_sample and gen.temperature == 0.5 and gen.max_new_tokens == 7
    greedy = wire.parse_chat(body(), "demo", LIMITS, 1.0).generation(GenerationConfig())
    assert not greedy.do_sample and greedy.max_new_tokens == 64


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"model": "other"}, 404, "model_not_found"),
        ({"max_tokens": 0}, 400, "invalid_request"),
        ({"max_tokens": True}, 400, "invalid_request"),
        ({"max_tokens": 10**6}, 400, "invalid_request"),
        ({"temperature": -1}, 400, "invalid_request"),
        ({"stop": ["", "a"]}, 400, "invalid_request"),
        ({"stream": "yes"}, 400, "invalid_request"),
        ({"messages": []}, 400, "invalid_request"),
        ({"messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request"),
        ({"vlm_ros": {"deadline_ms": -5}}, 400, "invalid_request"),
    ],
)
def test_bad_fields_are_refused(change, status, code):
    err = refusal({**body(), **change})
    assert (err.status, err.code) == (status, code)
    assert err.body()["error"]["code"] == code


def test_bad_images_are_refused_before_decoding():
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    assert refusal(body(data=encoded(noise))).status == 413  # bytes
    err = refusal(body(data=encoded(np.zeros((400, 400, 3), np.uint8))))  # pixels
    assert (err.status, err.code) == (413, "image_too_large") and "160000 pixels" in err.message
    assert refusal(body(data=b"GIF89a....")).code == "invalid_image"
    assert refusal(body(mime="image/gif")).status == 400
    assert refusal(body(data=encoded(np.zeros((4, 4, 3), np.uint8)))).status == 400  # too small
    bad_b64 = body()
    bad_b64["messages"][0]["content"][1]["image_url"]["url"] = "data:image/png;base64,@@@"
    assert "base64" in refusal(bad_b64).message
    remote = body()
    remote["messages"][0]["content"][1]["image_url"]["url"] = "http://example.invalid/x.png"
    assert "data URL" in refusal(remote).message
    assert "empty" in refusal(body(question="  ")).message


def test_jpeg_and_png_decode_like_the_cli():
    from vlm_ros.ros import imaging

    image = world.render(world.scene_from_seed(9))
    for fmt in ("PNG", "JPEG"):
        data = encoded(image, fmt)
        assert np.array_equal(
            wire.decode_image(data, LIMITS), imaging.decode(io.BytesIO(data), "test")
        )
    truncated = encoded(image)[:200]
    with pytest.raises(wire.WireError, match="cannot decode"):
        wire.decode_image(truncated, LIMITS)


def test_stop_strings_are_held_back_and_cut():
    stops = wire.StopText(("box", "\n\n"))
    assert not stops.push("a green bo")
    assert stops.safe("a green bo") == "a green "  # "bo" may become "box"
    assert stops.push("a green box near")
    assert stops.hit == "a green " and stops.safe("anything") == "a green "
    assert wire.StopText(()).safe("all of it") == "all of it"


def test_api_key():
    digest = hashlib.sha256(b"s3cret").hexdigest()
    wire.check_auth("Bearer s3cret", digest)
    wire.check_auth(None, None)
    for header in (None, "Bearer nope", "Basic s3cret", "s3cret"):
        with pytest.raises(wire.WireError) as info:
            wire.check_auth(header, digest)
        assert info.value.status == 401


def test_overload_error_carries_retry_after():
    err = wire.WireError(503, "busy", "overloaded", "server_error", 1.2)
    assert err.headers() == {"Retry-After": "2"}
    assert wire.WireError.from_dict(err.as_dict()).as_dict() == err.as_dict()


@pytest.fixture(scope="module")
def replica():
    server = ModelServer(Assistant.load("demo", RuntimeConfig(threads=1)), LIMITS)
    yield server
    server.close()


def test_replica_answers_streams_and_refuses(replica):
    image = world.render(world.scene_from_seed(5))
    job = wire.parse_chat(body(max_tokens=48), "demo", LIMITS, 0.0)
    want = replica.assistant.answer(image, "Describe the scene.", max_new_tokens=48)
    got = replica.answer(job)
    assert got["token_ids"] == list(want.token_ids) and got["text"] == want.text
    events: list[dict] = []
    replica.stream(job, events.append, threading.Event())
    assert "started" in events[0] and events[-1]["done"]["token_ids"] == list(want.token_ids)
    texts = [e["text"] for e in events if "text" in e]
    assert len(texts) > 3 and all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    # a deadline that passed in the queue: 504, and nothing decoded
    late = wire.parse_chat(body(vlm_ros={"deadline_ms": 1}), "demo", LIMITS, 0.0)
    assert replica.answer(late)["error"]["status"] == 504
    overflow = wire.parse_chat(body(max_tokens=4000), "demo", LIMITS, 0.0)
    assert replica.answer(overflow)["error"]["code"] == "context_length_exceeded"
    ranked = replica.rank(
        wire.parse_rank({**body(), "candidates": ["stop", "go"]}, "demo", LIMITS, 0.0)
    )
    assert abs(sum(ranked["probabilities"]) - 1) < 1e-6
    assert replica.rank(wire.RankJob("q", job.image, ("",)))["error"]["status"] == 400


def test_ray_is_imported_only_by_the_serving_app():
    """The command module, the wire contract and the replica logic load without Ray (the
    optional serve extra): only serving/ray_app.py imports it."""
    import subprocess
    import sys

    code = ("import sys, vlm_ros.cli, vlm_ros.commands.serve, vlm_ros.serving.wire, "
            "vlm_ros.serving.model_server; print(sorted(m for m in ('ray', 'fastapi') "
            "if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
