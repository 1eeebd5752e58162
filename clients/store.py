"""A client's state on disk, so that a run killed between rounds can resume where it stopped.

A DiReDi client keeps things between rounds that the server never sees: its own re-distilled edge,
the tutor's backbone body (sent once), its top-k residual. Flower keeps them in ``context.state``,
which lives as long as the simulation does. With a state folder in the run configuration
(``STATE_DIR``, set by ``sim.run``), each client also writes its state after every message it
handles, one file per round it took part in:

    <state dir>/<method>/client-<partition>/round-<r>.state   its records after round r
    <state dir>/<method>/bodies/<fingerprint>.state           a tutor body, stored once for all
    <state dir>/<method>/client-<partition>/body-memo.safetensors
                                                              Tutor 2's body outputs, from its "train"
                                                              message to its "train.distill" message
    <state dir>/<method>/client-<partition>/body-cache/*.safetensors
                                                              with ``body_cache="run"``: the tutor body's
                                                              outputs of every message, one file each

A resumed run starts with empty ``context.state``; a client then loads the newest file of a round
before the current one (a round the server checkpointed: the files of the round that was cut short
are newer and ignored). The body is the same 44 MB for every client, so it is kept once per body
(by the hash of its weights) and referenced by the client files. With a state folder a client keeps
only that reference in ``context.state`` as well (``store_body`` / ``read_body``): Flower's simulation
ships a node's ``context`` to the actor and back with every message, and a 44 MB body there made every
message carry it (a burst of 32 "query" messages took an actor's memory from 1.44 to 1.80 GB). Every
file is written to a temporary name first and renamed, so a killed run never leaves half a file.
"""

from __future__ import annotations

import os
import re
import uuid
from collections import OrderedDict
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common import serde
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from distill.body_memo import BodyMemo, split_name
from models.io import state_fingerprint

BODY_SUFFIX = ".tutor-body"  # context.state keys of the tutor's backbone body (``clients.app._tutor``)
_BODY_REF = "body-fingerprint"
_ROUND_FILE = re.compile(r"round-(\d+)\.state")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")  # unique: clients write side by side
    partial.write_bytes(data)
    os.replace(partial, path)


def _encode(records: RecordDict) -> bytes:
    return serde.recorddict_to_proto(records).SerializeToString()


def _decode(data: bytes) -> RecordDict:
    proto = serde.ProtoRecordDict()
    proto.ParseFromString(data)
    return serde.recorddict_from_proto(proto)


def _client_dir(root: Path, method: str, partition: int) -> Path:
    return Path(root) / method / f"client-{partition}"


def _rounds(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _ROUND_FILE.fullmatch(p.name)))


_BODIES: dict[str, dict] = {}  # per process: the most recently read body (fingerprint -> tensors)


def _body_path(root: Path, method: str, fingerprint: str) -> Path:
    return Path(root) / method / "bodies" / f"{fingerprint}.state"


def store_body(root: Path, method: str, body: ArrayRecord) -> ConfigRecord:
    """Writes a tutor body once (by the hash of its weights) and returns the reference a client keeps
    in its ``context.state`` instead of the 44 MB body itself (``read_body`` reads it back)."""
    fingerprint = state_fingerprint(body.to_torch_state_dict())
    path = _body_path(root, method, fingerprint)
    if not path.exists():
        _write_atomic(path, _encode(RecordDict({"body": body})))
    return ConfigRecord({_BODY_REF: fingerprint})


def is_body_reference(record) -> bool:
    return isinstance(record, ConfigRecord) and _BODY_REF in record


def read_body(root: Path, method: str, reference: ConfigRecord) -> dict:
    """The tensors of a body ``store_body`` wrote; the latest one stays in memory for this process
    (the actor's next client reads the same body)."""
    fingerprint = str(reference[_BODY_REF])
    if fingerprint not in _BODIES:
        _BODIES.clear()
        _BODIES[fingerprint] = _decode(_body_path(root, method, fingerprint).read_bytes())["body"].to_torch_state_dict()
    return _BODIES[fingerprint]


def _memo_path(root: Path, method: str, partition: int) -> Path:
    return _client_dir(root, method, partition) / "body-memo.safetensors"


def save_body_memo(root: Path, method: str, partition: int, memo: BodyMemo) -> None:
    """Keeps Tutor 2's body outputs (22 MB in the cpu profile) on the client's disk until its Distill C
    (``take_body_memo``): held in memory, an actor would carry one per client it trained in the round."""
    data = safetensors_bytes(memo.to_tensors(), metadata={"body_key": memo.body_key})
    _write_atomic(_memo_path(root, method, partition), data)


def take_body_memo(root: Path, method: str, partition: int) -> BodyMemo | None:
    """The body outputs ``save_body_memo`` kept for this client (the file is removed), or None. One left
    from an earlier round is still right: its outputs are found by their input's bytes and body."""
    path = _memo_path(root, method, partition)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        body_key = f.metadata()["body_key"]
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    path.unlink()
    return BodyMemo.from_tensors(body_key, tensors)


def _cache_dir(root: Path, method: str, partition: int) -> Path:
    return _client_dir(root, method, partition) / "body-cache"


def save_body_outputs(root: Path, method: str, partition: int, memo: BodyMemo) -> None:
    """Adds what ``memo`` recorded in this message to the client's body cache (``body_cache="run"``), as
    a file of its own: nothing written earlier is rewritten."""
    if memo.outputs:
        data = safetensors_bytes(memo.to_tensors(), metadata={"body_key": memo.body_key})
        _write_atomic(_cache_dir(root, method, partition) / f"{uuid.uuid4().hex}.safetensors", data)


def open_body_cache(root: Path, method: str, partition: int, body_key: str) -> BodyMemo:
    """A recording memo for the body ``body_key`` that also serves what earlier messages of this client
    saved (``save_body_outputs``). Files are read lazily, one image's tensors when asked, so an actor
    holds only the images it uses; files of another body are deleted (the tutor's body changed)."""
    index: dict[str, tuple[object, list[str]]] = {}  # image key -> (its file, its levels)
    folder = _cache_dir(root, method, partition)
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        handle = safe_open(str(path), framework="pt")
        if handle.metadata().get("body_key") != body_key:
            del handle
            path.unlink()
            continue
        for name in handle.keys():
            key, level = split_name(name)
            index.setdefault(key, (handle, []))[1].append(level)

    def earlier(key: str):
        if key not in index:
            return None
        handle, levels = index[key]
        return OrderedDict((level, handle.get_tensor(f"{key}|{level}")) for level in sorted(levels))

    return BodyMemo(body_key, recording=True, earlier=earlier)


def save_client_state(state: RecordDict, root: Path, method: str, partition: int, server_round: int) -> Path:
    """Writes ``state``'s records of ``method`` (keys "<method>.*") as the client's state after
    ``server_round``; keeps that file and the newest one of an earlier round (the round a resume
    may go back to), deletes older ones."""
    prefix = f"{method}."
    mine = RecordDict()
    for key, record in state.items():
        if not key.startswith(prefix):
            continue
        if key.endswith(BODY_SUFFIX) and isinstance(record, ArrayRecord):
            mine[key] = store_body(root, method, record)
        else:  # a body reference included
            mine[key] = record
    folder = _client_dir(root, method, partition)
    path = folder / f"round-{server_round}.state"
    _write_atomic(path, _encode(mine))
    earlier = [r for r in _rounds(folder) if r < server_round]
    for old in earlier[:-1]:
        (folder / f"round-{old}.state").unlink(missing_ok=True)
    return path


def load_client_state(root: Path, method: str, partition: int, before_round: int) -> RecordDict | None:
    """The client's records of ``method`` after the newest round before ``before_round`` it wrote
    (None when there is none); its tutor body stays a reference (``read_body``)."""
    folder = _client_dir(root, method, partition)
    rounds = [r for r in _rounds(folder) if r < before_round]
    if not rounds:
        return None
    return _decode((folder / f"round-{rounds[-1]}.state").read_bytes())
