"""Packed arrays on the wire: every ArrayRecord of a message travels as one safetensors blob.

Flower's Deployment Runtime moves each Array of a message as its own object, one request each (at
most two at a time on a 2-core machine), so an edge of 278 tensors took 7-8 s to arrive where its
0.5 MB need a fraction of that. Packing a record into one Array of safetensors bytes (names,
dtypes, shapes and values; no pickle, so a hostile client cannot make the server run code) leaves
one object per record. It is lossless: the strategies and the ClientApp see the same ArrayRecords
as before, and the bytes the run records count are counted on those (``protocol.wire.content_bytes``).

    strategies.exchange.PackedGrid   the ServerApp's side: packs what it pushes, unpacks what it pulls
    clients.app.packed_transport     the ClientApp's side (a Flower mod): unpacks what it receives,
                                     packs its reply

The same code runs in the simulation, so both runtimes move the same messages.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, Message, RecordDict
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

PACKED = "@safetensors"  # the one key of a packed ArrayRecord
PACKED_STYPE = "safetensors"  # the Array's serialisation type
ORDER = "order"  # safetensors metadata: the record's keys in their order (safetensors sorts them)


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED] and record[PACKED].stype == PACKED_STYPE


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """One Array of safetensors bytes holding every tensor of ``record``, in its key order."""
    if is_packed(record):
        return record
    state = {key: value.contiguous() for key, value in record.to_torch_state_dict().items()}
    blob = safetensors_save(state, metadata={ORDER: json.dumps(list(state))})
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})


class UnreadableRecord(ValueError):
    """A packed record whose bytes are not a safetensors blob of the promised keys."""


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord ``pack_record`` packed (a record that is not packed comes back as it is)."""
    if not is_packed(record):
        return record
    blob = record[PACKED].data
    try:
        state = safetensors_load(blob)
        order = json.loads(_metadata(blob).get(ORDER, "[]"))
    except (SafetensorError, ValueError, TypeError) as err:
        raise UnreadableRecord(f"not a safetensors blob: {err}") from None
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(state):
        raise UnreadableRecord("its key order does not name its tensors")
    return ArrayRecord({key: state[key] for key in order})


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob's header (8-byte little-endian length, then JSON)."""
    length = int.from_bytes(blob[:8], "little")
    if length > len(blob) - 8:
        raise ValueError("header longer than the blob")
    return json.loads(blob[8:8 + length]).get("__metadata__") or {}


def pack_content(content: RecordDict, memo: dict[int, ArrayRecord] | None = None) -> RecordDict:
    """Every ArrayRecord packed. ``memo`` (id of a record -> its packed record) packs a record that
    several messages share once: the server sends one tutor object to every node that needs it in full
    (46 MB, 0.19 s to pack in the cpu profile). The caller keeps the records alive while it uses the memo."""
    memo = {} if memo is None else memo
    out = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            if id(record) not in memo:
                memo[id(record)] = pack_record(record)
            record = memo[id(record)]
        out[name] = record
    return RecordDict(out)


def unpack_content(content: RecordDict) -> RecordDict:
    """Every record unpacked; a record that cannot be read arrives empty (the receiver's checks then
    see a record without its tensors: ``strategies.verify.structural_check`` rejects such a delta)."""
    out = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            try:
                record = unpack_record(record)
            except UnreadableRecord:
                record = ArrayRecord()
        out[name] = record
    return RecordDict(out)


def packed(message: Message, memo: dict[int, ArrayRecord] | None = None) -> Message:
    if message.has_content():
        message.content = pack_content(message.content, memo)
    return message


def unpacked(message: Message) -> Message:
    if message.has_content():
        message.content = unpack_content(message.content)
    return message
