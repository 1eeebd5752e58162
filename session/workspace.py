"""Everything a run needs before the federation starts: data on disk, the scenario, shards and data
sets (``Workspace``), the manufacturer chain it trains or finds cached (``Workspace.chain``), and the
server's view of all of it with the run configuration (``Session``).

Shared by both Flower apps, ``python -m sim.run`` and the experiment scripts, so all of them see
the same data for a seed. This package sits above ``data/``, ``distill/`` and ``protocol/``: the data
layer reads and cuts data, the distillation layer trains, and only the session puts them together.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import ConcatDataset, Dataset

from data.scenario import ClientSpec, Scenario, Shards, load_scenario, make_shards, select_clients
from data.synth import ensure_synthetic_voc
from data.voc import VOC_CLASSES, DataError, VOCDetection, VOCRecord, read_voc
from distill.chain import Chain, ChainData, manufacturer_chain
from distill.trainer import resolve_device
from evaluation.ap import per_class_ap
from models.compute import FLOAT32, Compute, computing
from models.ladder import Profile, get_profile
from protocol.config import RunConfig

log = logging.getLogger(__name__)
DEFAULT_CACHE = Path(".cache")


def records_fingerprint(records: list[VOCRecord]) -> str:
    """Hash of image ids and annotations: what a cached model trained on them depends on."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(repr((r.image_id, r.width, r.height, r.objects)).encode())
    return digest.hexdigest()[:16]


@dataclass
class Workspace:
    profile: Profile
    scenario: Scenario
    clients: list[ClientSpec]
    records: list[VOCRecord]
    shards: Shards
    data_root: Path
    seed: int
    cache_dir: Path
    data: str = "synth"  # "synth" (generated into cache_dir/data) or "voc" (read from data_root)
    device: str = "cpu"  # where models train and evaluate (see distill.trainer.resolve_device)
    compute: Compute = FLOAT32  # how the models compute (models.compute), the chain's training included

    def dataset(self, records: list[VOCRecord], classes) -> VOCDetection:
        return VOCDetection(records, classes=sorted(classes), image_size=self.profile.image_size)

    # -- the manufacturer's public data -------------------------------------------------
    def chain_data(self) -> ChainData:
        s = self.scenario
        teacher_records, presumed_records = self.shards.teacher_train, self.shards.presumed_train
        return ChainData(
            teacher_train=self.dataset(teacher_records, s.teacher_classes),
            presumed_train=self.dataset(presumed_records, s.presumed_classes),
            fingerprint=records_fingerprint(teacher_records) + records_fingerprint(presumed_records))

    def chain(self, progress: bool = True, stop_after: str | None = None) -> Chain:
        s = self.scenario
        return manufacturer_chain(self.profile, self.chain_data(), s.teacher_classes, s.presumed_classes,
                                  self.seed, self.cache_dir / "chain", progress=progress, stop_after=stop_after,
                                  device=self.device, compute=self.compute)

    def chain_validation_map(self, chain: Chain) -> dict[str, float]:
        """Each chain model's mAP (percent) on the manufacturer's validation set, over the classes it was
        trained on (teacher: the teacher classes; tutor and edge: the presumed ones)."""
        s = self.scenario
        rows = {}
        for role, classes in (("teacher", s.teacher_classes), ("tutor", s.presumed_classes),
                              ("edge", s.presumed_classes)):
            _, summary = per_class_ap(getattr(chain, role), self.dataset(self.shards.manufacturer_val, classes),
                                      classes)
            rows[role] = round(100 * summary["mAP"], 2)
        return rows

    def validation_set(self) -> VOCDetection:
        """The manufacturer's own validation images (never a client's), over the teacher classes."""
        return self.dataset(self.shards.manufacturer_val, self.scenario.teacher_classes)

    # -- one client's data ----------------------------------------------------------------
    def client_presumed(self, i: int) -> Dataset:
        """What tutor 1 sees: the public presumed-class images handed to the client."""
        return self.dataset(self.shards.clients[i].presumed, self.scenario.presumed_classes)

    def client_train(self, i: int) -> Dataset:
        """What tutor 2, Distill C and direct training see: kept presumed images + private images."""
        spec = self.clients[i]
        return ConcatDataset([self.dataset(self.shards.clients[i].presumed_kept, spec.kept),
                              self.dataset(self.shards.clients[i].private, spec.train_classes)])

    def client_test(self, i: int) -> VOCDetection:
        """Held-out images of client i, labelled with every class the scenario involves for it."""
        return self.dataset(self.shards.clients[i].test, self.eval_classes())

    def eval_classes(self) -> list[str]:
        """What every client is evaluated on: presumed classes (kept and dropped) and every client's
        private classes (own and others', the latter seen through the test shard's spread probes),
        in VOC order. One key set for all clients: Flower's metric aggregation needs identical keys,
        and a class without positives in a client's shard is NaN there."""
        wanted = set(self.scenario.presumed_classes) | {c for spec in self.clients for c in spec.private}
        return [c for c in VOC_CLASSES if c in wanted]


def prepare(profile: str | Profile, scenario: str | Path, num_clients: int | None = None, seed: int = 0,
            data: str = "synth", voc_root: str | Path | None = None,
            cache_dir: str | Path = DEFAULT_CACHE, device: str | None = "cpu",
            compute: Compute = FLOAT32) -> Workspace:
    """Generates (or reuses) the data, loads the scenario and cuts the shards."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    scen = load_scenario(scenario)
    cache_dir = Path(cache_dir)
    if data == "synth":
        ds = scen.data_settings(profile.name)
        root = ensure_synthetic_voc(cache_dir / "data", profile.name, ds.num_images, ds.image_size, ds.seed,
                                    ds.classes)
        records = read_voc(root)
    elif data == "voc":
        if voc_root is None:
            raise DataError("--data voc needs --voc-root PATH (a VOCdevkit or VOC20xx folder)")
        root = Path(voc_root)
        records = read_voc(root)
    else:
        raise DataError(f"unknown data source {data!r}; expected 'synth' or 'voc'")
    clients = select_clients(scen, num_clients if num_clients is not None else len(scen.clients))
    shards = make_shards(records, scen, seed, num_clients=len(clients))
    return Workspace(profile, scen, clients, records, shards, root, seed, cache_dir, data,
                     str(resolve_device(device)), compute)


@functools.lru_cache(maxsize=4)
def cached_workspace(profile: str, scenario: str, num_clients: int, seed: int, data: str, voc_root: str,
                     cache_dir: str, device: str, compute: Compute = FLOAT32) -> Workspace:
    """``prepare`` memoised per process: a Ray actor serves several partitions from one workspace
    (data is read-only; per-client state lives in Flower's ``context.state``)."""
    return prepare(profile, scenario, num_clients=num_clients, seed=seed, data=data, voc_root=voc_root or None,
                   cache_dir=cache_dir, device=device, compute=compute)


def workspace_of(config: RunConfig, num_clients: int | None = None) -> Workspace:
    """The run configuration's workspace (``cached_workspace``: memoised per process)."""
    return cached_workspace(config.profile, config.scenario, num_clients or config.num_clients, config.seed,
                            config.data, config.voc_root, config.cache_dir, config.device, config.compute())


@dataclass
class Session:
    """What the server holds for a run: its configuration, data and the manufacturer's models."""

    config: RunConfig
    workspace: Workspace
    chain: Chain

    @classmethod
    def open(cls, config: RunConfig, progress: bool = False) -> "Session":
        workspace = workspace_of(config)
        chain = workspace.chain(progress=progress)
        for model in (chain.teacher, chain.tutor, chain.edge):
            model.cpu()  # the federation (Ray actors, wire format) works on CPU tensors
        return cls(config, workspace, chain)

    def details(self) -> dict:
        """What config.json adds to the configuration for a reader: resolved settings and shards."""
        return {"profile_spec": self.workspace.profile.to_dict(),
                "client_training": self.config.client_training().to_dict(), "client_specs": self.client_specs(),
                "shards": self.workspace.shards.sizes()}

    def client_specs(self) -> list[dict]:
        protected = list(self.workspace.scenario.protected_classes)
        return [{"client": i, "name": c.name, "private": list(c.private), "kept": list(c.kept),
                 "dropped": list(c.dropped), "protected": [p for p in protected if p in c.kept]}
                for i, c in enumerate(self.workspace.clients)]

    def stage_rows(self) -> dict[str, dict]:
        """The manufacturer's models on its own validation set (Table III's first rows)."""
        s, ws = self.workspace.scenario, self.workspace
        rows = {}
        with computing(self.config.compute()):
            for label, model, classes in [("Large (teacher)", self.chain.teacher, s.teacher_classes),
                                          ("Tutor after Distill A", self.chain.tutor, s.presumed_classes),
                                          ("Edge after Distill B", self.chain.edge, s.presumed_classes)]:
                _, rows[label] = per_class_ap(model, ws.dataset(ws.shards.manufacturer_val, classes), classes,
                                              score_thresh=self.config.operating_threshold)
        return rows
