"""Round-level checkpoints of a federated method's server side, so a killed run resumes at the next round.

After every round a strategy hands over its state as tensors (models, the RNG) and a JSON-able
``meta`` (round, which clients hold what, the tutor's history, Python's RNG); ``save_checkpoint``
writes them into ``<run>/checkpoints/``:

    <method>.safetensors   the tensors, written first (temporary name + rename)
    <method>.json          the manifest, written last, with the tensors' SHA-256

so a checkpoint exists only once both are whole, and a torn tensors file is detected on load.
The clients keep their own state on disk (``clients.store``); together they give a resumed run the
records an uninterrupted run with the same seed gives (``tests/test_resume.py``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.io import CorruptWeights, file_sha256, read_weights, save_weights

RNG_TORCH = "rng.torch"  # tensor key of torch's CPU generator state


def save_checkpoint(folder: Path, method: str, server_round: int, tensors: Mapping[str, Tensor],
                    meta: Mapping[str, Any]) -> Path:
    """Writes ``method``'s state after ``server_round`` (with both RNG states) atomically; returns the manifest."""
    folder = Path(folder)
    weights = save_weights({**tensors, RNG_TORCH: torch.get_rng_state()}, folder / f"{method}.safetensors")
    state = random.getstate()
    manifest = {"method": method, "round": server_round, "sha256": file_sha256(weights),
                "python_rng": [state[0], list(state[1]), state[2]], **meta}
    path = folder / f"{method}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(manifest))
    partial.replace(path)
    return path


def load_checkpoint(folder: Path, method: str) -> tuple[int, dict[str, Tensor], dict] | None:
    """(round, tensors, meta) of ``method``'s checkpoint, with both RNGs set back as they were then;
    None without one. A tensors file that does not match its manifest is a ``CorruptWeights``."""
    path = Path(folder) / f"{method}.json"
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    weights = Path(folder) / f"{method}.safetensors"
    if not weights.exists() or file_sha256(weights) != meta["sha256"]:
        raise CorruptWeights(f"checkpoint {weights} is missing or does not match its manifest; start a new run")
    tensors = read_weights(weights)
    torch.set_rng_state(tensors.pop(RNG_TORCH))
    version, values, gauss = meta["python_rng"]
    random.setstate((version, tuple(values), gauss))
    return int(meta["round"]), tensors, meta


def checkpoint_round(folder: Path, method: str) -> int:
    """The last round ``method`` checkpointed in ``folder`` (0: none)."""
    path = Path(folder) / f"{method}.json"
    return int(json.loads(path.read_text())["round"]) if path.exists() else 0


def prefixed(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    start = prefix + "."
    return {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}
