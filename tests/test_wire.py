"""How a delta travels: precision, top-k sparsification with error feedback, malformed payloads."""

from __future__ import annotations

import pytest
import torch

from protocol.wire import MalformedDelta, pack_delta, top_k, unpack_delta


def make_delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"head.w": torch.randn(256, 64, generator=g), "head.b": torch.randn(256, generator=g)}


SHAPES = {k: v.shape for k, v in make_delta().items()}


def test_top_k_keeps_the_largest_entries_and_the_residual_holds_the_rest():
    delta = make_delta()
    sent, residual = top_k(delta, 0.1)
    for name, value in delta.items():
        kept = sent[name] != 0
        assert int(kept.sum()) == max(1, -(-value.numel() // 10))  # ceil(10 %)
        assert value.abs()[kept].min() >= value.abs()[~kept].max()  # the largest magnitudes
        assert torch.equal(sent[name] + residual[name], value)  # error feedback loses nothing


def test_a_sparse_delta_is_read_back_exactly_and_is_smaller():
    sent, _ = top_k(make_delta(), 0.1)
    sparse = pack_delta(sent, "float32", sparse=True)
    assert sparse.count_bytes() < 0.35 * pack_delta(sent, "float32").count_bytes()
    back = unpack_delta(sparse, SHAPES)
    assert set(back) == set(sent) and all(torch.equal(back[k], sent[k]) for k in sent)
    half = unpack_delta(pack_delta(sent, "float16", sparse=True), SHAPES)
    assert all(v.dtype == torch.float32 for v in half.values())
    assert all(torch.allclose(half[k], sent[k], rtol=1e-3, atol=1e-3) for k in sent)


@pytest.mark.parametrize("tamper, reason", [
    (lambda a: a.pop("head.w@values"), "indices without values"),
    (lambda a: a.pop("head.w@index"), "values without indices"),
    (lambda a: a.__setitem__("head.w@index", a["head.w@index"] + 256 * 64), "outside"),
    (lambda a: a.__setitem__("head.w@index", torch.tensor([[0, 1]], dtype=torch.int32)), "indices for"),
    (lambda a: a.__setitem__("backbone.x@index", torch.tensor([0], dtype=torch.int32)), "indices without values"),
])
def test_a_malformed_sparse_delta_is_refused_with_a_reason(tamper, reason):
    from flwr.app import ArrayRecord

    sent, _ = top_k(make_delta(), 0.1)
    arrays = dict(pack_delta(sent, sparse=True).to_torch_state_dict())
    tamper(arrays)
    with pytest.raises(MalformedDelta, match=reason):
        unpack_delta(ArrayRecord(arrays), SHAPES)


def test_a_sparse_tensor_that_is_not_the_tutors_is_refused():
    from flwr.app import ArrayRecord

    arrays = {"backbone.x@index": torch.tensor([0], dtype=torch.int32), "backbone.x@values": torch.tensor([1.0])}
    with pytest.raises(MalformedDelta, match="not one of the tutor"):
        unpack_delta(ArrayRecord(arrays), SHAPES)


# -- the packed transport: one array per record ------------------------------------------------------

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict  # noqa: E402

from protocol.transport import PACKED, UnreadableRecord, pack_content, pack_record, unpack_content, unpack_record  # noqa: E402


def mixed_state() -> dict[str, torch.Tensor]:
    """Names out of sorted order, every dtype a model or a delta carries (Flower holds no bfloat16)."""
    g = torch.Generator().manual_seed(1)
    return {"z.weight": torch.randn(3, 2, generator=g), "a.steps": torch.tensor(7, dtype=torch.int64),
            "m.half": torch.randn(4, generator=g).half(),
            "c@index": torch.tensor([0, 5], dtype=torch.int32), "t.view": torch.randn(4, 4, generator=g).t()}


def test_a_packed_record_is_one_array_and_reads_back_exactly_in_its_order():
    state = mixed_state()
    record = ArrayRecord({k: v.contiguous() for k, v in state.items()})
    sent = pack_record(record)
    assert list(sent.keys()) == [PACKED]
    back = unpack_record(sent).to_torch_state_dict()
    assert list(back) == list(state)  # safetensors sorts its keys; the order travels beside them
    for name, value in state.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value)
    assert unpack_record(record) is record and pack_record(sent) is sent  # nothing to do


def test_a_message_content_packs_its_array_records_and_nothing_else():
    content = RecordDict({"edge": ArrayRecord({"w": torch.ones(2)}), "config": ConfigRecord({"round": 3})})
    sent = pack_content(content)
    assert list(sent["edge"].keys()) == [PACKED] and sent["config"]["round"] == 3
    back = unpack_content(sent)
    assert torch.equal(back["edge"].to_torch_state_dict()["w"], torch.ones(2)) and back["config"]["round"] == 3


def test_a_record_several_messages_share_is_packed_once(monkeypatch):
    """The packed grid packs a record that every message holds (the tutor to every new node) once,
    and each message still carries its own content."""
    from flwr.supercore.task_identity import TaskIdentity

    import protocol.transport as transport
    from strategies.exchange import PackedGrid

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # messages outside a Flower run
        monkeypatch.setattr(TaskIdentity, name, value)

    calls = []
    real = transport.pack_record
    monkeypatch.setattr(transport, "pack_record", lambda record: calls.append(1) or real(record))
    shared, own = ArrayRecord({"w": torch.ones(3)}), [ArrayRecord({"b": torch.full((2,), float(i))}) for i in range(3)]

    class Grid:
        def push_messages(self, messages):
            self.pushed = list(messages)
            return [str(i) for i in range(len(self.pushed))]

    grid = Grid()
    messages = [Message(content=RecordDict({"tutor": shared, "mine": own[i]}), message_type="train", dst_node_id=i + 1)
                for i in range(3)]
    PackedGrid(grid).push_messages(messages)
    assert len(calls) == 1 + 3  # the shared record once, each message's own once
    for i, message in enumerate(grid.pushed):
        back = unpack_content(message.content)
        assert torch.equal(back["tutor"].to_torch_state_dict()["w"], torch.ones(3))
        assert torch.equal(back["mine"].to_torch_state_dict()["b"], torch.full((2,), float(i)))


@pytest.mark.parametrize("tamper", ["garbage", "cut", "order"])
def test_an_unreadable_packed_record_is_refused_and_arrives_empty(tamper):
    blob = pack_record(ArrayRecord({"w": torch.ones(8), "b": torch.zeros(2)}))[PACKED].data
    if tamper == "garbage":
        blob = b"\xff" * 64
    elif tamper == "cut":
        blob = blob[:-8]
    else:  # a key order that names another tensor (same length: the header stays readable)
        blob = blob.replace(b'[\\"w\\", \\"b\\"]', b'[\\"x\\", \\"b\\"]')
        assert b'\\"x\\"' in blob
    record = ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(blob),), stype="safetensors", data=blob)})
    with pytest.raises(UnreadableRecord):
        unpack_record(record)
    assert len(unpack_content(RecordDict({"delta": record}))["delta"]) == 0  # the structural check then refuses it
