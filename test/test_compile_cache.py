"""inductor's cache is kept where a reboot does not clear it (engines/compile_cache.py): the
user's choice stands; else the XDG cache directory, where it is writable; else torch's default."""

from __future__ import annotations

import os

from vlm_ros.engines import compile_cache


def test_the_users_directory_stands(tmp_path):
    chosen = str(tmp_path / "mine")
    environ = {compile_cache.ENV: chosen, "HOME": str(tmp_path)}
    assert compile_cache.use_persistent_cache(environ) == chosen
    assert environ[compile_cache.ENV] == chosen and not (tmp_path / ".cache").exists()


def test_the_xdg_cache_directory_else_home_cache(tmp_path):
    environ = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    where = compile_cache.use_persistent_cache(environ)
    assert where == str(tmp_path / "xdg" / "vlm_ros" / "inductor") == environ[compile_cache.ENV]
    assert os.path.isdir(where) and os.listdir(where) == []  # the write probe is gone
    environ = {"HOME": str(tmp_path / "home")}
    assert compile_cache.use_persistent_cache(environ) == str(
        tmp_path / "home" / ".cache" / "vlm_ros" / "inductor"
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
    """A StaticDecoder built with no choice made points inductor at the persistent directory."""
    import torch
    from decode_helpers import tiny_phi

    from vlm_ros.infer.static_decode import StaticDecoder

    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with torch.inference_mode():
        StaticDecoder(tiny_phi(), 16, huge_pages=False)
    assert os.environ[compile_cache.ENV] == str(tmp_path / "vlm_ros" / "inductor")
