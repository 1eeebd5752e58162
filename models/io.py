"""Weights on disk as safetensors: loading never executes code (unlike pickle-based torch.save)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


class CorruptWeights(ValueError):
    """A weights file is unreadable or does not fit the model it is loaded into."""


def save_weights(model_or_state: nn.Module | Mapping[str, Tensor], path: str | Path,
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Writes a full state dict atomically (temp file + rename, so a crash never leaves half a file)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=dict(metadata or {}))
    tmp.replace(path)
    return path


def read_weights(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CorruptWeights(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptWeights(f"weights file {path} is unreadable: {err}") from err


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Loads a full state dict into ``model``; any missing/unexpected key or shape is an error."""
    state = read_weights(path)
    own = model.state_dict()
    if set(state) != set(own):
        missing = sorted(set(own) - set(state))[:3]
        unexpected = sorted(set(state) - set(own))[:3]
        raise CorruptWeights(f"{path} does not fit this model (missing {missing}, unexpected {unexpected})")
    for name, value in state.items():
        if value.shape != own[name].shape:
            raise CorruptWeights(f"{path}: {name} has shape {tuple(value.shape)}, model expects {tuple(own[name].shape)}")
    model.load_state_dict(state)
    return model


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_fingerprint(state: Mapping[str, Tensor]) -> str:
    """A hash of tensors' names and values: which weights a cached result was computed with."""
    digest = hashlib.sha1()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def body_fingerprint(model: nn.Module) -> str:
    """A hash of a detector's backbone body's weights and buffers: which body cached outputs came from."""
    return state_fingerprint(model.backbone.body.state_dict())
