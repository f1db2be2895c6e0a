"""How compiled vision stages are named: the one module the ONNX Runtime and TensorRT backends
share (besides onnx_export, which both run). A name says which stage a file was made for, so a
cached export or engine is found again, and never reused for another stage."""

from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Short sha256 over the vision stage's parameters (names, shapes and a strided sample of
    values): identifies which weights an export was made from, without hashing every byte."""
    digest = hashlib.sha256()
    stage_prefixes = ("vision_tower.", "projector.")
    for name, tensor in model.state_dict().items():
        if not name.startswith(stage_prefixes):
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def structure_fingerprint(model: torch.nn.Module) -> str:
    """Short sha256 over the vision stage's parameter names and shapes (and nothing that
    depends on dtype): names a TensorRT engine, whose weights are then verified by a probe."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith(("vision_tower.", "projector.")):
            digest.update(f"{name}{tuple(tensor.shape)};".encode())
    spec = getattr(model, "spec", None)
    layer, drop = getattr(spec, "select_layer", None), getattr(spec, "drop_first_token", None)
    digest.update(f"select={layer};drop={drop}".encode())
    return digest.hexdigest()[:16]
