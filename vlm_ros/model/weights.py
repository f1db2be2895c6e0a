"""Reading checkpoint tensors lazily, whatever file layout they were published in.

A checkpoint directory holds one of: ``model.safetensors``; sharded safetensors with
``model.safetensors.index.json``; ``pytorch_model.bin``; sharded ``.bin`` with
``pytorch_model.bin.index.json``. ``WeightFiles`` lists every tensor's name and shape without
reading its data (safetensors headers; ``.bin`` files memory-mapped), so the loader can check a
checkpoint against the model before it allocates anything, and then reads each tensor once,
straight into the model (a full-size Phi-2 is 5.5 GB: it must not be held twice).

Every unreadable file (truncated, garbage, missing shard) is a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from vlm_ros.errors import CheckpointError, NoWeightsError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
LAYOUTS = (SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX)


class WeightFiles:
    """Name -> shape of every tensor of a checkpoint; ``load(name)`` reads one tensor."""

    def __init__(self, files: Iterable[Path]):
        self.files = list(files)
        self._owner: dict[str, _File] = {}
        for path in self.files:
            opened = _open(path)
            for name in opened.names():
                self._owner[name] = opened

    def names(self) -> list[str]:
        return list(self._owner)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._owner[name].shape(name)

    def load(self, name: str) -> torch.Tensor:
        return self._owner[name].load(name)

    def __contains__(self, name: object) -> bool:
        return name in self._owner


def find_weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, preferring safetensors (as transformers does)."""
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (BIN_INDEX, BIN)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index_name).is_file():
            return _shards_from_index(directory / index_name)
    raise NoWeightsError(
        f"no weights in {directory}: expected one of {', '.join(LAYOUTS)} "
        f"(found: {', '.join(sorted(p.name for p in directory.iterdir())) or 'nothing'})"
    )


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable shard index {index_path}: {exc}") from exc
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"shard index {index_path} names missing files: {', '.join(missing)}")
    return [index_path.parent / s for s in shards]


class _File:
    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class _SafetensorsFile(_File):
    """Header read at open; tensor data read on demand (``safe_open`` memory-maps the file)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self._names = list(self._handle.keys())
        except Exception as exc:  # SafetensorError is not importable under one name in all versions
            raise CheckpointError(f"corrupt or truncated safetensors file {path}: {exc}") from exc

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())

    def load(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name} from {self.path}: {exc}") from exc


class _BinFile(_File):
    """``torch.load(weights_only=True)``: no code from the file runs. Zip-format files (every
    torch >= 1.6 save) are memory-mapped, so their tensors are not read until used."""

    def __init__(self, path: Path):
        self.path = path
        mmap = zipfile.is_zipfile(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:  # the unpickler raises anything from EOFError to IndexError
            raise CheckpointError(f"corrupt or unreadable .bin file {path}: {exc}") from exc
        tensors = isinstance(state, dict) and all(
            isinstance(v, torch.Tensor) for v in state.values()
        )
        if not tensors:
            raise CheckpointError(f"{path} is not a state dict of tensors")
        self._state = state

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def load(self, name: str) -> torch.Tensor:
        return self._state[name]


def _open(path: Path) -> _File:
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    if path.suffix == ".bin":
        return _BinFile(path)
    raise CheckpointError(f"unsupported weight file {path} (expected .safetensors or .bin)")


def open_weights(directory: Path) -> WeightFiles:
    return WeightFiles(find_weight_files(directory))
