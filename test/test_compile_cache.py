"""inductor's cache is kept where a reboot does not clear it (engines/compile_cache.py): the
user's choice stands; else the XDG cache directory, where it is writable, one directory per CPU
kind; else torch's default."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from vlm_ros.engines import compile_cache


def test_the_users_directory_stands(tmp_path):
    chosen = str(tmp_path / "mine")
    environ = {compile_cache.ENV: chosen, "HOME": str(tmp_path)}
    assert compile_cache.use_persistent_cache(environ) == chosen
    assert environ[compile_cache.ENV] == chosen and not (tmp_path / ".cache").exists()


def test_torchs_own_default_in_the_variable_is_not_a_choice(tmp_path):
    """torch writes /tmp/torchinductor_<user> into the variable when torch._dynamo is
    imported (transformers imports it), so every compile went to /tmp, shared between CPU
    kinds and cleared at boot: that is replaced."""
    environ = {compile_cache.ENV: compile_cache.torch_default(), "HOME": str(tmp_path)}
    where = compile_cache.use_persistent_cache(environ)
    assert where == str(tmp_path / ".cache" / "vlm_ros" / "inductor" / compile_cache.cpu_kind())
    assert environ[compile_cache.ENV] == where


def test_another_cpu_kinds_directory_inherited_is_not_a_choice(tmp_path):
    """A process that set the variable passes it to its children; a child running other
    kernels (ATEN_CPU_CAPABILITY=avx2) must not take its parent's directory for a choice. A
    directory of the user's beside ours (another parent) and this kind's own stand."""
    mine = tmp_path / ".cache" / "vlm_ros" / "inductor" / compile_cache.cpu_kind()
    inherited = mine.parent / "x86_64-avx512-0123456789"
    environ = {compile_cache.ENV: str(inherited), "HOME": str(tmp_path)}
    assert compile_cache.use_persistent_cache(environ) == str(mine)
    assert environ[compile_cache.ENV] == str(mine) and not inherited.exists()
    environ = {compile_cache.ENV: str(mine), "HOME": str(tmp_path)}
    assert compile_cache.use_persistent_cache(environ) == str(mine)
    elsewhere = str(tmp_path / "inductor" / "x86_64-avx512-0123456789")
    environ = {compile_cache.ENV: elsewhere, "HOME": str(tmp_path)}
    assert compile_cache.use_persistent_cache(environ) == elsewhere
    # the parent's under another cache home (its XDG_CACHE_HOME): this kind's beside it
    other = tmp_path / "other" / "vlm_ros" / "inductor"
    environ = {compile_cache.ENV: str(other / "x86_64-avx512-0123456789"), "HOME": str(tmp_path)}
    assert compile_cache.use_persistent_cache(environ) == str(other / compile_cache.cpu_kind())


def test_the_xdg_cache_directory_else_home_cache(tmp_path):
    environ = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    kind = compile_cache.cpu_kind()
    where = compile_cache.use_persistent_cache(environ)
    assert where == str(tmp_path / "xdg" / "vlm_ros" / "inductor" / kind)
    assert where == environ[compile_cache.ENV]
    assert os.path.isdir(where) and os.listdir(where) == []  # the write probe is gone
    environ = {"HOME": str(tmp_path / "home")}
    assert compile_cache.use_persistent_cache(environ) == str(
        tmp_path / "home" / ".cache" / "vlm_ros" / "inductor" / kind
    )


def test_an_unwritable_place_leaves_torchs_default(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    environ = {"XDG_CACHE_HOME": str(blocker)}
    with caplog.at_level("INFO"):
        assert compile_cache.use_persistent_cache(environ) is None
    assert compile_cache.ENV not in environ
    assert "not writable" in caplog.text


def test_the_decoder_sets_it_before_compiling(monkeypatch, tmp_path):
    """A StaticDecoder built with no choice made points inductor at the persistent directory,
    in a process where torch._dynamo (imported by transformers) wrote torch's default into
    the variable."""
    import torch
    from decode_helpers import tiny_phi

    from vlm_ros.infer.static_decode import StaticDecoder

    monkeypatch.setenv(compile_cache.ENV, compile_cache.torch_default())  # restored after
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with torch.inference_mode():
        StaticDecoder(tiny_phi(), 16, huge_pages=False)
    want = tmp_path / "vlm_ros" / "inductor" / compile_cache.cpu_kind()
    assert os.environ[compile_cache.ENV] == str(want)


def test_the_cpu_kind_names_the_kernels_and_the_cpu(tmp_path):
    """Another instruction set or another CPU model: another directory; the same: the same."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx2\n\nflags\t: ignored\n")
    assert compile_cache.cpu_flags(info) == "avx2 fpu sse2"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd crc32\n")
    assert compile_cache.cpu_flags(arm) == "asimd crc32 fp"
    assert compile_cache.cpu_flags(tmp_path / "absent") == ""
    one = compile_cache.cpu_kind("avx2 fpu sse2")
    assert one == compile_cache.cpu_kind("avx2 fpu sse2") != compile_cache.cpu_kind("avx2 sse2")
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert f"-{capability}-" in one and "/" not in one


# A LayerNorm and a GEMV compiled by inductor, checked against eager code: what the decode
# step's regions are made of (infer/regional_step.py).
PROBE = """
import json, os, torch
from vlm_ros.engines import compile_cache
from vlm_ros.engines.cpu_kernels import gemv_by_reduction
torch.set_num_threads(2)
where = compile_cache.use_persistent_cache()
torch.manual_seed(0)
x, w = torch.randn(1, 800), torch.randn(512, 800)
def f(x, w):
    return torch.nn.functional.layer_norm(x, (800,)) + gemv_by_reduction(x, w)[:, :1]
with torch.inference_mode():
    got = torch.compile(f, fullgraph=True, dynamic=False)(x, w)
    want = torch.nn.functional.layer_norm(x, (800,)) + (x @ w.T)[:, :1]
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "dir": where,
                  "error": float((got - want).abs().max())}))
"""


def _probe(env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_code_compiled_for_one_instruction_set_is_not_loaded_for_another(tmp_path):
    """torch 2.13's FX graph cache does not key on the vector instruction set: on this AVX-512
    host, the probe compiled with torch's AVX-512 kernels and then, from the same directory,
    with ATEN_CPU_CAPABILITY=avx2 (what an AVX2-only CPU runs, or a cache carried there)
    returned NaN. With the default directory per CPU kind, each compiles its own and both
    are right. On a host whose torch runs AVX2 kernels already, the two probes are the same
    kind and share a directory (nothing to tell apart)."""
    if platform.machine() not in ("x86_64", "AMD64") or " avx2" not in compile_cache.cpu_flags():
        pytest.skip(f"needs an x86-64 CPU with AVX2 (this is {platform.machine()})")
    env = {
        k: v for k, v in os.environ.items() if k not in (compile_cache.ENV, "ATEN_CPU_CAPABILITY")
    }
    env["XDG_CACHE_HOME"] = str(tmp_path)
    native = _probe(env)
    limited = _probe(dict(env, ATEN_CPU_CAPABILITY="avx2"))
    assert limited["capability"] == "AVX2"
    assert native["error"] < 1e-4 and limited["error"] < 1e-4, (native, limited)
    assert (native["dir"] != limited["dir"]) == (native["capability"] != "AVX2")
