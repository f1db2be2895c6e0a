"""engines/native.py's float32 one-row decode kernels against their references: the GEMV
against F.linear in float64, the one-query attention against SDPA over the live slots
(grouped-query heads, head sizes off the vector width, one live slot, the whole cache); the
slots past ``live`` never read; the same result on any thread count; a clear error for inputs
they do not take. The kernels must build here (CI has a C++ compiler and ninja): a failed
build is a failure, not a skip. test_regional_step.py has the decode step on them, and the
fallback to inductor's loops where they do not build or differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm_ros.engines import native


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert native.load() is None


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (8, 7), (37, 100), (96, 1030), (300, 2560)])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_gemv_is_a_linear_layer_on_one_row(rows, cols, bias):
    """Column counts below, at and off the vector width and the four-accumulator stride."""
    weight, x = _randn(rows, cols, seed=rows), _randn(1, cols, seed=cols)
    b = _randn(rows, seed=rows + cols) if bias else None
    got = native.gemv(x, weight, b)
    want = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert got.shape == (1, rows) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-5 * cols**0.5, rtol=1e-5)
    three_d = native.gemv(x.view(1, 1, cols), weight.t().contiguous().t(), b)  # any strides
    assert three_d.shape == (1, 1, rows) and torch.equal(three_d.view(1, rows), got)


def test_gemv_rows_are_the_same_on_any_thread_count():
    """Each output row is one thread's dot product: how the rows are split cannot change it."""
    weight, x = _randn(1000, 640, seed=3), _randn(1, 640, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.gemv(x, weight, None)
        torch.set_num_threads(max(2, threads))
        many = native.gemv(x, weight, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "slots", "live"),
    [(4, 4, 12, 40, 1), (4, 4, 80, 64, 64), (8, 2, 72, 50, 33), (2, 1, 5, 9, 9),
     (32, 32, 80, 1024, 631)],
)  # fmt: skip
def test_attend_one_writes_the_token_then_is_sdpa_over_the_live_slots(
    heads, kv_heads, dim, slots, live
):
    """Phi-2's 32 heads of 80 at a robot's prompt length, grouped-query heads, head sizes off
    the vector width, one live slot, the whole cache: the token's key and value land at its
    slot and nowhere else, and the output is SDPA's over slots 0..position; the slots past
    it hold NaN and change nothing."""
    position = live - 1
    q = _randn(1, heads, 1, dim, seed=1) * 3  # peaked scores: the softmax's max matters
    k, v = _randn(1, kv_heads, 1, dim, seed=4), _randn(1, kv_heads, 1, dim, seed=5)
    keys, values = _randn(1, kv_heads, slots, dim, seed=2), _randn(1, kv_heads, slots, dim, seed=3)
    keys[:, :, live:] = float("nan")
    values[:, :, live:] = float("nan")
    want_keys, want_values = keys.clone(), values.clone()
    want_keys[:, :, position] = k[:, :, 0]
    want_values[:, :, position] = v[:, :, 0]
    want = F.scaled_dot_product_attention(
        q, want_keys[:, :, :live], want_values[:, :, :live], enable_gqa=True
    )
    got = native.attend_one(q, k, v, keys, values, position)
    assert got.shape == want.shape == (1, heads, 1, dim)
    assert torch.allclose(got, want, atol=2e-6, rtol=1e-5), (got - want).abs().max()
    for got_cache, want_cache in ((keys, want_keys), (values, want_values)):
        assert torch.equal(got_cache.nan_to_num(7.0), want_cache.nan_to_num(7.0))
    assert torch.isnan(keys).sum() == want_keys.isnan().sum() == (slots - live) * kv_heads * dim


def test_inputs_the_kernels_do_not_take_are_refused_by_name():
    x, weight = torch.randn(1, 16), torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="float32"):
        native.gemv(x.double(), weight.double(), None)
    with pytest.raises(RuntimeError, match="one row"):
        native.gemv(torch.randn(2, 16), weight, None)
    with pytest.raises(RuntimeError, match="one row"):
        native.gemv(torch.randn(1, 15), weight, None)
    with pytest.raises(RuntimeError, match="bias"):
        native.gemv(x, weight, torch.randn(5))
    q, k, cache = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 10, 8)
    for position in (-1, 10):
        with pytest.raises(RuntimeError, match="position"):
            native.attend_one(q, k, k, cache, cache.clone(), position)
    with pytest.raises(RuntimeError, match="float32"):
        native.attend_one(q.double(), k, k, cache, cache.clone(), 3)
    with pytest.raises(RuntimeError, match="head shapes"):
        small = torch.randn(1, 2, 10, 8)
        native.attend_one(torch.randn(1, 3, 1, 8), k[:, :2], k[:, :2], small, small.clone(), 4)
    strided = torch.randn(1, 4, 10, 16)[..., ::2]
    with pytest.raises(RuntimeError, match="contiguous"):
        native.attend_one(q, k, k, strided, strided.clone()[..., :8], 4)


def test_a_failed_build_says_why(monkeypatch):
    """No compiler (or ninja): load returns the reason, once per process, and logs it."""
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore")

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    why = native.load()
    assert why == (
        "building the native decode kernels failed: RuntimeError: "
        "Ninja is required to load C++ extensions"
    )
    assert native.load() is why  # tried once


UNWRITABLE_CHILD = f"""
import json, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from decode_helpers import greedy, tiny_phi
from vlm_ros.infer.static_decode import StaticDecoder
lm = tiny_phi()
embeds = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
with torch.inference_mode():
    ours = StaticDecoder(lm, 40, cpu_linear="inductor", huge_pages=False)
    library = StaticDecoder(lm, 40, cpu_linear="torch", huge_pages=False)
    runs = [greedy(decoder, embeds, 6)[0] for decoder in (ours, library)]
print(json.dumps({{"native": ours.regions.native, "refused": ours.regions.native_refused,
                  "served": ours.regions.step is not None, "same_tokens": runs[0] == runs[1]}}))
"""


def test_a_build_that_cannot_write_leaves_inductors_loops_serving():
    """A real failure, not a planted one: torch cannot create the build directory (here under
    /proc, which not even root can write; a read-only home on a robot). The decoder still
    serves its regions, on inductor's loops, with the library's tokens, and says why."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR="/proc/vlm_ros_cannot_write_here")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", UNWRITABLE_CHILD], capture_output=True, text=True, timeout=600,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["served"] and not out["native"] and out["same_tokens"], out
    assert out["refused"].startswith("building the native decode kernels failed: "), out
