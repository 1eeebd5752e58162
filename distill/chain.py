"""The manufacturer chain: teacher -> Distill A -> tutor -> Distill B -> edge, cached on disk.

Each stage is cached under a hash of everything that determines it (profile, data, classes,
seed, phase settings, and the hash of the stage it distils from). A second run loads it in
seconds; a cache whose manifest, key or file checksum does not match is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from distill.trainer import KDRecipe, Phase, PhaseReport, train
from models.compute import FLOAT32, Compute, computing
from models.io import CorruptWeights, file_sha256, load_weights, save_weights
from models.ladder import Profile, build_model
from models.parts import inherit_neck_head

log = logging.getLogger(__name__)
CHAIN_VERSION = 2  # bump when training code changes what a stage produces


def stage_key(parts: dict) -> str:
    """A short, stable hash of a JSON-able description."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StageResult:
    model: nn.Module
    key: str
    reused: bool
    report: dict  # PhaseReport.summary() of the training that produced it
    path: Path


def cached_stage(cache_dir: Path, stage: str, key_parts: dict, build: Callable[[], nn.Module],
                 fit: Callable[[nn.Module], PhaseReport]) -> StageResult:
    """Loads stage ``stage`` from the cache if its key and checksum match; else builds, fits and stores it."""
    key = stage_key({"stage": stage, "version": CHAIN_VERSION, **key_parts})
    folder = Path(cache_dir) / f"{stage}-{key}"
    weights, manifest_path = folder / "model.safetensors", folder / "manifest.json"
    if manifest_path.exists():
        problem = None
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("key") != key:
                problem = "its key does not match"
            elif not weights.exists() or file_sha256(weights) != manifest.get("sha256"):
                problem = "its weights file is missing or its checksum does not match"
            else:
                model = load_weights(build(), weights)
                log.info("%s: reused cache %s", stage, folder)
                return StageResult(model, key, True, manifest.get("report", {}), weights)
        except (json.JSONDecodeError, CorruptWeights, OSError) as err:
            problem = f"it is unreadable ({err})"
        log.warning("%s: cache %s is not usable because %s; rebuilding", stage, folder, problem)
        manifest_path.unlink(missing_ok=True)
    elif folder.exists():
        log.warning("%s: cache %s is incomplete (no manifest); rebuilding", stage, folder)
    model = build()
    report = fit(model).summary()
    save_weights(model, weights, metadata={"stage": stage, "key": key})
    # The manifest is written last: its presence means the stage finished.
    # Training is seeded, but CPU kernels split work by thread count: the same seed at another
    # thread count gives (slightly) different weights, so the manifest records it.
    manifest = {"key": key, "stage": stage, "sha256": file_sha256(weights), "report": report,
                "key_parts": key_parts, "torch_threads": torch.get_num_threads()}
    manifest_path.write_text(json.dumps(manifest, indent=1, default=str))
    return StageResult(model, key, False, report, weights)


@dataclass
class ChainData:
    """What the manufacturer trains on: public data only, never a client's."""

    teacher_train: Dataset  # labelled with the teacher classes
    presumed_train: Dataset  # labelled with the presumed classes
    fingerprint: str  # hash of the records both sets hold (ids and annotations)


@dataclass
class Chain:
    teacher: nn.Module
    tutor: nn.Module
    edge: nn.Module
    stages: dict[str, StageResult] = field(default_factory=dict)

    def reports(self) -> dict[str, dict]:
        return {name: {**s.report, "reused_cache": s.reused, "key": s.key} for name, s in self.stages.items()}


def chain_phases(profile: Profile, seed: int, recipe: KDRecipe) -> dict[str, Phase]:
    b = profile.budget
    kd = recipe.phase_fields()
    return {
        "teacher": Phase("teacher (labels)", iters=b.teacher_iters, batch_size=b.batch_size, lr=b.lr,
                         optimizer=b.optimizer, seed=seed),
        "distill_a": Phase("Distill A (teacher -> tutor)", iters=b.distill_iters, batch_size=b.batch_size,
                           lr=b.lr, optimizer=b.optimizer, seed=seed + 1, **kd),
        "distill_b": Phase("Distill B (tutor -> edge)", iters=b.distill_iters, batch_size=b.batch_size,
                           lr=b.lr, optimizer=b.optimizer, seed=seed + 2, **kd),
    }


def student_start(profile: Profile, role: str, seed: int, teacher: nn.Module | None) -> nn.Module:
    """A fresh ``role`` model; with a teacher, its neck/head inherited from it where shapes allow."""
    model = build_model(profile, role, seed=seed)
    if teacher is not None:
        copied = inherit_neck_head(model, teacher)
        log.info("%s: inherited %d neck/head tensors from its teacher", role, len(copied))
    return model


def manufacturer_chain(profile: Profile, data: ChainData, teacher_classes: list[str],
                       presumed_classes: list[str], seed: int, cache_dir: str | Path,
                       progress: bool = True, recipe: KDRecipe | None = None,
                       stop_after: str | None = None, device: str | torch.device = "cpu",
                       compute: Compute = FLOAT32) -> Chain:
    """Teacher trained on the teacher classes; tutor (Distill A) and edge (Distill B) on the presumed ones.

    Each stage's key holds only what determines it (its architecture, data, classes, seed, phase and
    the key of the stage it learns from), so changing Distill B does not retrain the teacher.
    ``stop_after="teacher"`` builds (or loads) only the teacher; the other models are then None.
    ``compute``: how the stages train (``models.compute``, "auto" resolved for ``device``); part of
    every stage's key unless it is the float32 default.
    """
    with computing(compute, str(device)) as resolved:
        return _chain(profile, data, teacher_classes, presumed_classes, seed, cache_dir, progress, recipe,
                      stop_after, device, resolved)


def _chain(profile: Profile, data: ChainData, teacher_classes: list[str], presumed_classes: list[str], seed: int,
           cache_dir: str | Path, progress: bool, recipe: KDRecipe | None, stop_after: str | None,
           device: str | torch.device, compute: Compute) -> Chain:
    """``manufacturer_chain`` under its resolved compute setting."""
    recipe = recipe if recipe is not None else KDRecipe()
    phases = chain_phases(profile, seed, recipe)
    base = {"image_size": profile.image_size, "anchor_sizes": profile.anchor_sizes, "data": data.fingerprint,
            "seed": seed}
    if not compute.is_default:  # added after the keys were fixed: the default leaves them as they were
        base["compute"] = compute.to_dict()
    stages: dict[str, StageResult] = {}

    stages["teacher"] = cached_stage(
        cache_dir, "teacher", {**base, "spec": profile.teacher, "classes": sorted(teacher_classes),
                               "phase": phases["teacher"].to_dict()},
        build=lambda: build_model(profile, "teacher", seed=seed).to(device),
        fit=lambda m: train(m, data.teacher_train, phases["teacher"], progress=progress))
    teacher = stages["teacher"].model
    if stop_after == "teacher":
        return Chain(teacher.eval(), None, None, stages)

    stages["distill_a"] = cached_stage(
        cache_dir, "tutor", {**base, "spec": profile.tutor, "from": stages["teacher"].key,
                             "classes": sorted(presumed_classes), "phase": phases["distill_a"].to_dict(),
                             "inherit": recipe.inherit},
        build=lambda: student_start(profile, "tutor", seed + 1, teacher if recipe.inherit else None).to(device),
        fit=lambda m: train(m, data.presumed_train, phases["distill_a"], teacher=teacher, progress=progress))
    tutor = stages["distill_a"].model

    stages["distill_b"] = cached_stage(
        cache_dir, "edge", {**base, "spec": profile.edge, "from": stages["distill_a"].key,
                            "classes": sorted(presumed_classes), "phase": phases["distill_b"].to_dict(),
                            "inherit": recipe.inherit},
        build=lambda: student_start(profile, "edge", seed + 2, tutor if recipe.inherit else None).to(device),
        fit=lambda m: train(m, data.presumed_train, phases["distill_b"], teacher=tutor, progress=progress))
    for model in (teacher, tutor, stages["distill_b"].model):
        model.eval()
    return Chain(teacher, tutor, stages["distill_b"].model, stages)
