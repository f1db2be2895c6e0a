"""Tiny checkpoints for tests, written once per test session and shared.

``tiny_checkpoint(family, **options)`` returns the directory of a tiny checkpoint in the exact
published layout of ``family`` (options as model.tiny.write_tiny_checkpoint: seed, safetensors,
sharded, fused_qkv, vocab_size), writing it on first use into one temporary directory removed at
exit. The directories are shared: a test that damages a checkpoint copies it first
(``copy_tiny_checkpoint``). Import from tests as ``from tiny_models import tiny_checkpoint``
(pytest puts test/ on sys.path); ``tiny_models`` is the same as a module-scoped fixture.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest

from vlm_ros.model.tiny import FAMILY_NAMES, write_tiny_checkpoint

FAMILIES = FAMILY_NAMES  # llava_phi, mipha_phi, tiny_llava_phi, tinyllava


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="vlm_ros_tiny_"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def _written(family: str, options: tuple) -> Path:
    name = "-".join([family, *(f"{k}={v}" for k, v in options)])
    return write_tiny_checkpoint(_root() / name, family, **dict(options))


def tiny_checkpoint(family: str, **options) -> Path:
    """A shared tiny checkpoint of ``family`` (do not modify it: see copy_tiny_checkpoint)."""
    return _written(family, tuple(sorted(options.items())))


def copy_tiny_checkpoint(family: str, dest: Path, **options) -> Path:
    """A private copy of a tiny checkpoint, for tests that break it."""
    shutil.copytree(tiny_checkpoint(family, **options), dest)
    return Path(dest)


@pytest.fixture(scope="module")
def tiny_models():
    """``tiny_checkpoint`` as a fixture: ``tiny_models("mipha_phi", sharded=True)``."""
    return tiny_checkpoint
