"""Differential privacy of a client's delta (optional, off by default): clip, add Gaussian noise, count.

    clipped, factor = clip_to_norm(delta, C)                    # the whole neck/head delta to L2 norm <= C
    noised = gaussian_noise(clipped, sigma * C, generator)      # + N(0, (sigma C)^2) on every coordinate
    epsilon_spent(sigma, rounds, 1e-5)                          # after `rounds` participations

What is protected, and against whom (local DP). Each client is a Gaussian mechanism on its own
delta, every round it takes part: the delta is clipped to L2 norm C and noised with std sigma x C
per coordinate *on the client*, before top-k sparsification, float16 packing and the upload, so the
server (and anyone on the wire) only ever sees the noised delta. Top-k, its error-feedback
residual (kept on the client: the residual is then a remainder of *noised* deltas), float16 and
everything the server does with the delta are post-processing and cost no privacy. One
participation is one step of sample rate 1 (the client does not subsample itself); the budget of a
client after r participations is that of r compositions, accounted by Opacus's RDP accountant
(``opacus.accountants.RDPAccountant``: a maintained accountant instead of our own RDP algebra).

The neighbouring relation behind ``epsilon_spent`` is the add/remove ("zero-out") one of user-level
DP-FedAvg (McMahan et al. 2018): the client's clipped delta against no delta at all, sensitivity C.
Against *replacing* the client's data by any other data the sensitivity is 2C: the same noise then
gives ``epsilon_spent(sigma / 2, ...)``. The guarantee covers the delta only: the metrics a client
reports (AP per class on its test shard, trained classes, example count) are not privatised.

With the defaults (clip = inf, noise = 0) ``privatise`` returns the delta it was given, untouched
(bit-identical uploads; the tests check it). Noise needs a finite clip (its std is sigma x C).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from models.parts import clip_delta, delta_norm

DP = "dp"  # reply metrics "dp.<name>": what a client reports about its privatised delta
DP_EPSILON = f"{DP}.epsilon"  # epsilon spent so far by this client at the run's dp-delta (noise > 0 only)
DP_CLIP_FACTOR = f"{DP}.clip_factor"  # min(1, C / ||delta||) of this round's delta
DP_NORM = f"{DP}.norm"  # ||delta|| before clipping (what C should be chosen against)
DP_PARTICIPATIONS = f"{DP}.participations"  # rounds this client has released a privatised delta in

NOISE_SEED_OFFSET = 4  # added to the client's work seed (protocol.wire.work_seed: RD uses offsets 0-3)

# Opacus's default orders (1.1 ... 63), smaller and larger ones: with little noise the best order lies
# below 1.1, with much noise and few rounds above 63; every order gives a valid epsilon, so a wider
# grid only tightens the bound.
RDP_ORDERS = ([1.001, 1.002, 1.005, 1.01, 1.02, 1.03, 1.05, 1.07] + [1 + x / 10.0 for x in range(1, 100)]
              + list(range(12, 64)) + [64, 80, 96, 128, 192, 256, 512, 1024])


def is_on(max_norm: float, noise_multiplier: float) -> bool:
    """Whether a run privatises deltas: a finite clip, or noise."""
    return math.isfinite(max_norm) or noise_multiplier > 0


def clip_to_norm(delta: Mapping[str, Tensor], max_norm: float) -> tuple[dict[str, Tensor], float]:
    """``models.parts.clip_delta`` (the clipping the server's merge may apply as well), refusing a
    delta whose norm is not finite: no bound can clip it."""
    norm = delta_norm(delta)
    if not math.isfinite(norm):
        raise ValueError(f"the delta's norm is {norm}: it cannot be clipped")
    return clip_delta(delta, max_norm)


def gaussian_noise(delta: Mapping[str, Tensor], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """The delta plus independent N(0, std^2) noise on every coordinate of its floating-point
    tensors (other tensors pass unchanged). The noise is drawn on the CPU from ``generator`` in the
    tensors' name order, so a seeded generator gives the same noise whatever the dict order; the
    client seeds it from its work seed (``noise_generator``), which makes runs reproducible.
    ``std`` = 0 returns the tensors as they are."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be a finite number >= 0, got {std}")
    out = dict(delta)
    if std == 0:
        return out
    for name in sorted(delta):
        value = delta[name]
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
            out[name] = (value.float() + std * noise.to(value.device)).to(value.dtype)
    return out


def noise_generator(work_seed: int) -> torch.Generator:
    """The generator of a client's noise in one round: its work seed (``protocol.wire.work_seed``,
    distinct per seed, round and client) plus ``NOISE_SEED_OFFSET``."""
    return torch.Generator().manual_seed(work_seed + NOISE_SEED_OFFSET)


def epsilon_spent(noise_multiplier: float, rounds: int, target_delta: float = 1e-5) -> float:
    """Epsilon of ``rounds`` compositions of the Gaussian mechanism with noise std =
    ``noise_multiplier`` x sensitivity, at ``target_delta`` (sample rate 1: a client that takes
    part releases its delta), from Opacus's RDP accountant over ``RDP_ORDERS``. 0 for no round,
    inf without noise."""
    if rounds < 0 or not 0 < target_delta < 1:
        raise ValueError(f"need rounds >= 0 and 0 < target_delta < 1, got {rounds}, {target_delta}")
    if rounds == 0:
        return 0.0
    if not noise_multiplier > 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
    with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha": still a valid bound
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=target_delta, alphas=RDP_ORDERS))


def privatise(delta: Mapping[str, Tensor], max_norm: float, noise_multiplier: float,
              generator: torch.Generator | None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Clip to ``max_norm``, then add N(0, (noise_multiplier x max_norm)^2) per coordinate; returns
    (the delta to upload, metrics {DP_CLIP_FACTOR, DP_NORM}). Off (max_norm = inf, no noise): the
    delta as given, no metrics."""
    if not is_on(max_norm, noise_multiplier):
        return dict(delta), {}
    if noise_multiplier > 0 and not math.isfinite(max_norm):
        raise ValueError("noise needs a finite clip norm: its std is noise_multiplier x max_norm")
    norm = delta_norm(delta)
    clipped, factor = clip_to_norm(delta, max_norm)
    if noise_multiplier > 0:
        if generator is None:
            raise ValueError("noise needs a generator (seeded: runs are reproducible)")
        clipped = gaussian_noise(clipped, noise_multiplier * max_norm, generator)
    return clipped, {DP_CLIP_FACTOR: factor, DP_NORM: norm}
