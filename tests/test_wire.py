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
