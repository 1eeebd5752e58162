"""Ways to merge several clients' neck/head deltas into one (pure functions on state dicts).

Every function takes deltas as name -> tensor mappings with identical keys and shapes (the
verification step has already checked them against the tutor) and returns a new dict.

* ``weighted_mean``: the FedAvg rule, sum_i w_i d_i / sum_i w_i.
* ``trimmed_mean``: per coordinate, drop the k largest and k smallest values, average the rest
  (robust to a minority of outliers in either direction).
* ``ties_merge``: TIES-merging (Yadav et al. 2023): trim each delta to its largest-magnitude
  entries, elect one sign per coordinate, average only the entries agreeing with it, so clients
  pulling a weight in opposite directions do not cancel into noise.
* ``multi_krum``: Multi-Krum (Blanchard et al. 2017, with Flower's ``select_multikrum``): keep the
  deltas closest to their nearest neighbours, average those; a few far-off (hostile) deltas are left out whole.
* ``class_aware_merge``: the classification layer's per-class rows are averaged only over the
  clients that trained that class (so a class taught by one client is not divided by the number
  of clients); every other tensor goes through one of the rules above.

Bounding one client's influence before any rule runs (the strategy applies both to accepted deltas):

* ``clip_delta``: norm clipping (Sun et al. 2019, "Can you really backdoor federated learning?"):
  a delta larger than ``max_norm`` is scaled down to it;
* ``cap_weights``: no claimed weight (e.g. num-examples) above ``multiple`` x the round's median
  claim, so one client cannot buy the weighted mean with a made-up count; ``median_cap`` is that
  bound, also used on the round's delta norms (the policy's ``clip_multiple``);
* ``clip_class_rows``: each client's classification rows of class c clipped to a multiple of the
  median row-c norm among the clients that take part in row c (the policy's ``row_multiple``), so a
  small edit aimed at one class cannot hide inside a delta whose overall norm is honest;
* a clipped delta's share (``bound_influence(clip_shares=True)``): a delta the norm clip cut to a
  fraction f of its size counts in every mean as f of itself (its weight x f; in the trimmed mean,
  ``trimmed_mean(shares=...)``), so a clipped delta cannot dilute what honest clients merge beside it;
* a tiny row's share (``row_shares``): a class row sent far below the round's median row of its kind counts in
  that row's mean by its size, so a row shrunk on purpose cannot dilute (nor, ``clip_class_rows(kinds=)``, cut)
  the honest rows of its class; a clipped delta's rows, f of their size, by f once more
  (``bound_influence(clipped_rows_sized=True)``);
* a merged row's size (``restore_row_sizes``, an option): a learned class's merged row scaled up to the mean size
  of the rows it averages (``mean_row_norms``), where their mean would shrink it.
"""

from __future__ import annotations

import math
import operator
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from torch import Tensor

from models.parts import CLASS_ROW_PARAMS, Delta, clip_delta, delta_norm  # noqa: F401 (the merge uses and bounds them)
from protocol.config import AGGREGATION_METHODS


SHARED_METHODS = ("weighted", "trimmed", "ties", "krum")  # what class_aware_merge may use for the shared tensors


def median_cap(values: Sequence[float], multiple: float = 4.0) -> float:
    """``multiple`` x the (low) median of the positive ``values``: a bound set by the round itself.

    Why the round's own median: what a client sends (its delta's norm, its claimed example count)
    is compared with what the others sent. One liar among honest clients cannot move the median;
    the low median (the lower middle value for an even count) keeps a liar from raising its own
    cap when it is one of two. Zero values are left out (they cannot pull the cap to 0). inf when
    ``multiple`` is inf (no cap) or when no value is positive.
    """
    if not multiple >= 1:  # also rejects NaN
        raise ValueError(f"multiple must be >= 1 (inf: no cap), got {multiple}")
    positive = [float(v) for v in values if float(v) > 0]
    if math.isinf(multiple) or not positive:
        return math.inf
    return multiple * statistics.median_low(positive)


def cap_weights(weights: Sequence[float], multiple: float = 4.0) -> tuple[list[float], float]:
    """Each claimed weight capped at ``median_cap(weights, multiple)``.

    Why: weights are what clients say (their num-examples); unchecked, one client claiming 1e12
    examples is the whole weighted mean. Honest rounds, whose claims lie within a few x of each
    other, are unchanged (default8: the largest claim is 1.22x the median). Zero claims do not
    count in the merge either. Returns (capped, cap).
    """
    cap = median_cap(weights, multiple)
    return [min(float(w), cap) for w in weights], cap


def row_norms(delta: Delta, class_row_params: Sequence[str] = CLASS_ROW_PARAMS) -> list[float]:
    """L2 norm of each class's rows (row c of every class-row tensor together): one value per class."""
    rows = torch.stack([delta[name].reshape(delta[name].shape[0], -1).double().pow(2).sum(dim=1)
                        for name in class_row_params]).sum(dim=0)
    return rows.sqrt().tolist()


def clip_class_rows(deltas: Sequence[Delta], members: Sequence[Collection[int]], multiple: float = math.inf,
                    class_row_params: Sequence[str] = CLASS_ROW_PARAMS, weights: Sequence[float] | None = None,
                    setters: Sequence[bool] | None = None, round_floor: bool = False,
                    kinds: Sequence[int] | None = None, reference_floors: Mapping[int, float] | None = None
                    ) -> tuple[list[dict[str, Tensor]], list[dict[int, float]]]:
    """Each delta's rows of class c clipped to ``median_cap`` of the row-c norms of the deltas that take
    part in row c (``members[i]``: the classes delta i's rows count for, e.g. its earned claims).

    Why per row: the norm clip bounds a delta as a whole, and an honest delta's norm (0.15-0.3 here) leaves
    room for an edit of one class's bias that lowers every score of that class. Row c's influence is
    bounded by what the round's other contributors to row c changed it by; a row with one contributor
    is bounded by nothing but itself (the claim rule decides whether it counts). Rows a delta does not
    take part in are left as they are (they do not reach a class-aware merge). With ``weights`` (the merge's, after
    the cap) what is bounded is each delta's influence on the row, its weight x its row-c norm, against the
    median influence of row c's contributors: a row at 4 x the median norm sent with 4 x the median weight
    otherwise moves the merged row 16 x as much as a median client's. ``setters[i]`` False: delta i is bounded
    by row c's median but does not set it (unless no contributor to row c is a setter): ``bound_influence``
    leaves out the deltas the norm clip cut, whose rows are a fraction of what they sent, so that one of two
    contributors cannot pull the other's bound down to a few times its own remnant. ``round_floor``: row c's
    bound is never below ``multiple`` x the median over every row of the round (each setter's row of each class it
    takes part in), so that a contributor who sends a deliberately tiny row of a class it shares with few others
    cannot set that row's median and cut the others' rows to a few times its own. ``kinds`` (one label per class,
    e.g. 0 for the classes the tutor already knows and 1 for those it learns from clients): row c's bound is never
    below ``multiple`` x the median of the round's rows of c's kind (``kind_medians``): the same guard as
    ``round_floor``, but new-class rows, which move ~5 x more than known-class rows, are measured against their own
    kind (against every row, an honest new-class row beside a tiny one is still cut to about half).
    ``reference_floors`` (class id -> a row norm): in the row's own median a row smaller than its class's floor counts
    as that size (``bound_influence(tiny_rows=True)``: 1/``multiple`` of its kind's median, the size from which a row
    counts whole), so a tiny row cannot pull the bound down to a few times itself, and the bound stays set by the
    row's own contributors (at most ``multiple`` x the floor from a raised row). Returns (clipped deltas,
    per delta {class: factor} for every row scaled down); the inputs are not modified. With ``multiple``
    inf, or when the class-row tensors are absent, the deltas are returned as they are.
    """
    sets = [set(m) for m in members]
    if len(sets) != len(deltas):
        raise ValueError(f"members has {len(sets)} entries for {len(deltas)} deltas")
    median_cap([], multiple)  # validates multiple
    factors: list[dict[int, float]] = [{} for _ in deltas]
    if math.isinf(multiple) or not deltas or not all(name in deltas[0] for name in class_row_params):
        return [dict(d) for d in deltas], factors
    norms = [row_norms(d, class_row_params) for d in deltas]
    floors = reference_floors or {}
    raised = [[max(n, float(floors.get(c, 0.0))) for c, n in enumerate(row)] for row in norms]
    if weights is not None:
        if len(weights) != len(deltas):
            raise ValueError(f"{len(weights)} weights for {len(deltas)} deltas")
        norms = [[float(w) * n for n in row] for w, row in zip(weights, norms)]
        raised = [[float(w) * n for n in row] for w, row in zip(weights, raised)]
    if setters is not None and len(setters) != len(deltas):
        raise ValueError(f"{len(setters)} setters for {len(deltas)} deltas")
    out = [dict(d) for d in deltas]
    takers, references = _row_takers(sets, setters, len(norms[0]))
    floor = (median_cap([norms[i][c] for c, reference in references.items() for i in reference], multiple)
             if round_floor else 0.0)
    floor = 0.0 if math.isinf(floor) else floor  # no positive row in the round: no floor
    kind_floor = kind_medians(norms, references, kinds) if kinds is not None else {}
    for c, reference in references.items():
        cap = max(median_cap([raised[i][c] for i in reference], multiple), floor, multiple * kind_floor.get(c, 0.0))
        for i in takers[c]:
            if norms[i][c] > cap:
                factors[i][c] = cap / norms[i][c]
                for name in class_row_params:
                    if out[i][name] is deltas[i][name]:
                        out[i][name] = deltas[i][name].clone()
                    out[i][name][c] *= factors[i][c]
    return out, factors


def _row_takers(sets: Sequence[set[int]], setters: Sequence[bool] | None, classes: int
                ) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Per class, the deltas whose rows take part in it and those that set its references (the setters among them,
    or all of them when none is a setter)."""
    takers = {c: [i for i, s in enumerate(sets) if c in s] for c in range(classes)}
    return takers, {c: [i for i in ts if setters is None or setters[i]] or ts for c, ts in takers.items()}


def kind_medians(norms: Sequence[Sequence[float]], references: Mapping[int, Sequence[int]],
                 kinds: Sequence[int]) -> dict[int, float]:
    """Per class c, the (low) median of the rows of every class of c's kind that the round merges: ``norms[i][c]``
    is delta i's row-c size, ``references[c]`` the deltas whose row c sets the references. 0.0 where the kind has
    no positive row."""
    if len(kinds) != len(norms[0]):
        raise ValueError(f"{len(kinds)} kinds for {len(norms[0])} classes")
    medians = {}
    for kind in set(kinds):
        same = [norms[i][c] for c, reference in references.items() if kinds[c] == kind for i in reference]
        medians[kind] = median_cap(same, 1.0)
    return {c: 0.0 if math.isinf(medians[kinds[c]]) else medians[kinds[c]] for c in references}


def row_shares(deltas: Sequence[Delta], members: Sequence[Collection[int]], floors: Mapping[int, float],
               class_row_params: Sequence[str] = CLASS_ROW_PARAMS) -> list[dict[int, float]]:
    """How much of one row each delta's row c counts as in row c's mean: min(1, its row-c norm / ``floors[c]``),
    ``floors`` from ``tiny_row_floors`` (1/K of the round's median row of c's kind); one entry per row below 1 (per
    delta, class id -> share).

    Why: the row clip bounds a row from above; a row far below its peers passes it, and a weighted mean still
    counts it whole, so a client that sends its rows at 1 % with its weight at the cap dilutes every row it shares
    (a class held by it and one honest client keeps about a third of the honest row: the bench's ``tiny_claim``).
    Counted by its size below the floor, a row sent at 1 % counts as a few percent of one. Honest rows mostly count
    whole (default8's smallest sat at a third of its kind's median), but not always (heldout8: a client's
    first-round cat row at 15 % of the learned median counted as 58 % of a row). The reference is the round's median
    row of the kind, not the row's own contributors' (two of them, one tiny, have no median to trust)."""
    if len(members) != len(deltas):
        raise ValueError(f"members has {len(members)} entries for {len(deltas)} deltas")
    shares: list[dict[int, float]] = [{} for _ in deltas]
    if not floors:
        return shares
    for i, (delta, classes) in enumerate(zip(deltas, members)):
        norms = row_norms(delta, class_row_params)
        shares[i] = {c: norms[c] / floors[c] for c in sorted(classes) if norms[c] < floors[c]}
    return shares


def tiny_row_floors(deltas: Sequence[Delta], members: Sequence[Collection[int]], multiple: float,
                    kinds: Sequence[int] | None = None, setters: Sequence[bool] | None = None,
                    class_row_params: Sequence[str] = CLASS_ROW_PARAMS) -> dict[int, float]:
    """Per class, the row size from which a row counts whole in ``row_shares``: 1/``multiple`` of the (low) median
    row of the class's kind in the round (``kind_medians``; ``setters`` as in ``clip_class_rows``; {} when the bound
    is off, ``multiple`` inf, or the rows are absent)."""
    if math.isinf(multiple) or not deltas or not all(name in deltas[0] for name in class_row_params):
        return {}
    norms = [row_norms(d, class_row_params) for d in deltas]
    _, references = _row_takers([set(m) for m in members], setters, len(norms[0]))
    kinds = list(kinds) if kinds is not None else [0] * len(norms[0])
    return {c: m / multiple for c, m in kind_medians(norms, references, kinds).items()}


@dataclass
class Bounded:
    """``bound_influence``'s result: the deltas as merged and what bounding did to each (for its decision)."""

    deltas: list[dict[str, Tensor]]
    clip_factors: list[float]  # the norm clip's factor per delta (1.0: not clipped)
    row_factors: list[dict[int, float]]  # per delta, class id -> its row clip's factor (clipped rows only)
    capped: list[float]  # the claimed weights, capped
    weight_cap: float
    shares: list[float]  # how much of one delta each counts as in the merge's means (1.0: whole)
    weights: list[float]  # the weights the merge uses: capped x share
    row_shares: list[dict[int, float]]  # per delta, class id -> how much of a row its row counts as (below 1 only)


def norm_cap(norms: Sequence[float], clip_norm: float = math.inf, clip_multiple: float = math.inf) -> float:
    """The norm the merge clips each accepted delta to: min(``clip_norm``, ``clip_multiple`` x the round's
    median norm) (inf: no clip)."""
    return min(clip_norm, median_cap(norms, clip_multiple))


def bound_influence(deltas: Sequence[Delta], norms: Sequence[float], weights: Sequence[float],
                    members: Sequence[Collection[int]], *, clip_norm: float = math.inf,
                    clip_multiple: float = math.inf, row_multiple: float = math.inf,
                    weight_multiple: float = math.inf, row_influence: bool = False,
                    clip_shares: bool = False, row_floor: bool = False,
                    row_kinds: Sequence[int] | None = None, kind_floor: bool = False,
                    tiny_rows: bool = False, clipped_rows_sized: bool = False) -> Bounded:
    """Every bound on what one accepted delta can do to the merge, in order:

    1. its norm clipped to min(``clip_norm``, ``clip_multiple`` x the round's median norm) (``clip_delta``);
    2. its claimed weight capped at ``weight_multiple`` x the round's median claim (``cap_weights``);
       with ``clip_shares`` its weight in the merge is that x its clip factor, its share;
    3. its rows of each class clipped to ``row_multiple`` x the median change of that row among the deltas
       it is merged with (``members[i]``: the classes delta i's rows take part in; ``clip_class_rows``); the
       median is that of the deltas step 1 left whole, where row c has any; with ``row_floor`` the bound is at
       least ``row_multiple`` x the median over every row of the round; with ``kind_floor`` at least
       ``row_multiple`` x the median row of its kind (``row_kinds``, one label per class; ``clip_class_rows(kinds=)``);
    4. with ``tiny_rows``, each row sent at less than 1/``row_multiple`` of its kind's median row counts in its
       row's mean as that fraction of a row (``row_shares``; the rows as sent: the clip share already counts
       what the norm clip cut), and in step 3's median as a row of that size (``tiny_row_floors``);
    5. with ``clipped_rows_sized`` (and ``clip_shares``), a delta the norm clip cut to f counts in each class row's
       mean as f x its other row share: its weight there is its share f of a delta, and its rows are f of their
       size, so a row's say goes with its size as in step 4 (f^2 of a whole row's, where the shared layers
       count it as f). An honest delta the clip leaves whole is merged as before.

    ``row_influence``: step 3 bounds each delta's weight in the merge (step 2) x its row norm instead
    (``clip_class_rows`` with weights).

    Why the share: clipping shrinks a delta, but a mean that still counts it whole lets it dilute every
    row and layer it shares with honest clients (a hostile delta clipped to a fifth beside one honest
    client of a class, both at the same weight, leaves the class's row at 0.6 of the honest one). Counted
    as the share the clip kept, a delta the clip barely touched counts almost whole and one cut to 2 %
    almost not at all; an unclipped delta (every honest one measured here) is merged exactly as without it.
    """
    cap = norm_cap(norms, clip_norm, clip_multiple)
    clipped, clip_factors = [], []
    for delta in deltas:
        delta, factor = clip_delta(delta, cap)
        clipped.append(delta)
        clip_factors.append(factor)
    capped, weight_cap = cap_weights(weights, weight_multiple)
    shares = list(clip_factors) if clip_shares else [1.0] * len(deltas)
    used = [w * share for w, share in zip(capped, shares)]
    setters = [factor == 1.0 for factor in clip_factors]
    floors = tiny_row_floors(deltas, members, row_multiple, row_kinds, setters) if tiny_rows else {}
    small = row_shares(deltas, members, floors)
    if clipped_rows_sized and clip_shares:
        small = [{c: share.get(c, 1.0) * factor for c in sorted(classes)} if factor < 1.0 else share
                 for share, factor, classes in zip(small, clip_factors, members)]
    clipped, row_factors = clip_class_rows(clipped, members, row_multiple, weights=used if row_influence else None,
                                           setters=setters, round_floor=row_floor,
                                           kinds=row_kinds if kind_floor else None, reference_floors=floors or None)
    return Bounded(clipped, clip_factors, row_factors, capped, weight_cap, shares, used, small)


def _check_deltas(deltas: Sequence[Delta]) -> list[str]:
    if not deltas:
        raise ValueError("nothing to aggregate: no deltas given")
    keys = list(deltas[0])
    for i, delta in enumerate(deltas[1:], start=1):
        if set(delta) != set(keys):
            raise ValueError(f"delta {i} has different keys from delta 0")
        for name in keys:
            if delta[name].shape != deltas[0][name].shape:
                raise ValueError(f"delta {i}: {name} has shape {tuple(delta[name].shape)}, "
                                 f"delta 0 has {tuple(deltas[0][name].shape)}")
    return keys


def _normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} deltas")
    if any(not math.isfinite(float(w)) or float(w) < 0 for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights sum to {total}; at least one must be positive")
    return [float(w) / total for w in weights]


def weighted_mean(deltas: Sequence[Delta], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """sum_i w_i * d_i / sum_i w_i (equal weights when ``weights`` is None)."""
    keys = _check_deltas(deltas)
    factors = _normalised_weights(weights, len(deltas))
    return {name: sum(f * d[name] for f, d in zip(factors, deltas)) for name in keys}


def trimmed_mean(deltas: Sequence[Delta], trim_fraction: float = 0.2,
                 shares: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Coordinate-wise mean after dropping floor(trim_fraction * n) values at each end
    (Flower's ``trim_mean``, the rule of its FedTrimmedAvg).

    ``shares``: how much of one delta each counts as (``bound_influence``'s clip shares); when they
    differ, ``share_trimmed_mean``, which equals this rule when they are all equal.
    """
    keys = _check_deltas(deltas)
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must lie in [0, 0.5), got {trim_fraction}")
    if shares is not None and len(set(_normalised_weights(shares, len(deltas)))) > 1:
        return share_trimmed_mean(deltas, shares, trim_fraction)
    out = {}
    for name in keys:
        stacked = torch.stack([d[name].detach().cpu() for d in deltas]).numpy()
        out[name] = torch.from_numpy(np.asarray(trim_mean(stacked, trim_fraction), dtype=stacked.dtype))
    return out


def share_trimmed_mean(deltas: Sequence[Delta], shares: Sequence[float], trim_fraction: float = 0.2
                       ) -> dict[str, Tensor]:
    """The trimmed mean with each delta counted as ``shares[i]`` of one (a weighted trimmed mean).

    The shares are scaled to sum to n (the number of deltas), so n equal shares are n whole deltas.
    Per coordinate the values are sorted and laid end to end, each as long as its share; the
    floor(trim_fraction * n) units of length at each end are cut (a value may be cut in part) and the
    rest is averaged by length. Equal shares give ``trimmed_mean`` (up to rounding); a delta of share
    0.02 lies in the kept middle as 2 % of a value instead of a whole one.
    """
    keys = _check_deltas(deltas)
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must lie in [0, 0.5), got {trim_fraction}")
    n = len(deltas)
    length = torch.tensor(_normalised_weights(shares, n), dtype=torch.float64) * n
    cut = int(trim_fraction * n)
    out = {}
    for name in keys:
        stacked = torch.stack([d[name].detach().cpu().double().reshape(-1) for d in deltas])  # [n, m]
        values, order = stacked.sort(dim=0)
        end = length[order].cumsum(dim=0)  # where each sorted value's stretch ends
        start = end - length[order]
        kept = (end.clamp(max=n - cut) - start.clamp(min=cut)).clamp(min=0)
        merged = (kept * values).sum(dim=0) / kept.sum(dim=0)
        out[name] = merged.reshape(deltas[0][name].shape).to(deltas[0][name].dtype)
    return out


def multi_krum(deltas: Sequence[Delta], weights: Sequence[float] | None = None, num_malicious: int | None = None,
               num_selected: int | None = None) -> dict[str, Tensor]:
    """Multi-Krum: score each delta by the summed squared distance to its n - f - 2 nearest others
    (f = ``num_malicious``; default the most Krum tolerates, the largest f with n > 2f + 2), keep
    the ``num_selected`` lowest scores (default n - f; 1 is plain Krum) and return their weighted mean.

    Why: a hostile delta far from every honest one scores high and is left out whole, where a mean
    would take a share of it. It fits the shared neck/head tensors, which every client moves
    alike; on the class rows, clients that learn different classes are far apart by design (use
    it as ``class_aware_merge``'s shared rule).
    """
    keys = _check_deltas(deltas)
    n = len(deltas)
    if num_malicious is None:
        num_malicious = max(0, (n - 3) // 2)
    if not 0 <= num_malicious < n:
        raise ValueError(f"num_malicious must lie in [0, {n}), got {num_malicious}")
    count = n - num_malicious if num_selected is None else num_selected
    if not 1 <= count <= n:
        raise ValueError(f"num_selected must lie in [1, {n}], got {count}")
    contents = [RecordDict({"delta": ArrayRecord({k: d[k].detach().cpu().contiguous() for k in keys})})
                for d in deltas]
    selected = select_multikrum(contents, num_malicious, count)
    chosen = [i for i, content in enumerate(contents) if any(content is s for s in selected)]
    kept_weights = None if weights is None else [weights[i] for i in chosen]
    return weighted_mean([deltas[i] for i in chosen], kept_weights)


def _top_magnitude_mask(delta: Delta, keep_fraction: float) -> dict[str, Tensor]:
    """True for the ``keep_fraction`` share of entries with the largest |value|, over the whole delta."""
    flat = torch.cat([t.reshape(-1).abs() for t in delta.values()])
    keep = max(1, int(round(keep_fraction * flat.numel())))
    if keep >= flat.numel():
        return {name: torch.ones_like(t, dtype=torch.bool) for name, t in delta.items()}
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True  # exactly `keep` entries, ties or not
    masks, start = {}, 0
    for name, t in delta.items():
        masks[name] = chosen[start:start + t.numel()].reshape(t.shape)
        start += t.numel()
    return masks


def ties_merge(deltas: Sequence[Delta], weights: Sequence[float] | None = None,
               keep_fraction: float = 0.2) -> dict[str, Tensor]:
    """TIES-merging: trim, elect sign, disjoint (weighted) mean.

    1. trim: each delta keeps its top ``keep_fraction`` entries by magnitude (over all its
       tensors together); the rest become 0;
    2. elect: per coordinate the sign of sum_i w_i * trimmed_i, i.e. the side with the larger
       (weighted) total magnitude;
    3. merge: weighted mean over the deltas whose trimmed entry is non-zero and has the elected
       sign; a coordinate nobody agrees on stays 0.
    With equal weights this is the paper's rule.
    """
    keys = _check_deltas(deltas)
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must lie in (0, 1], got {keep_fraction}")
    factors = _normalised_weights(weights, len(deltas))
    trimmed = []
    for delta in deltas:
        masks = _top_magnitude_mask(delta, keep_fraction)
        trimmed.append({name: torch.where(masks[name], delta[name], torch.zeros_like(delta[name]))
                        for name in keys})
    out = {}
    for name in keys:
        stacked = torch.stack([t[name] for t in trimmed])
        w = torch.tensor(factors, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
        elected = torch.sign((w * stacked).sum(dim=0))
        agree = (torch.sign(stacked) == elected) & (stacked != 0)
        weight_sum = (w * agree).sum(dim=0)
        merged = (w * stacked * agree).sum(dim=0) / weight_sum.clamp_min(torch.finfo(stacked.dtype).tiny)
        out[name] = torch.where(weight_sum > 0, merged, torch.zeros_like(merged))
    return out


def _class_sets(client_classes: Sequence[Collection[int]], n: int) -> list[set[int]]:
    if len(client_classes) != n:
        raise ValueError(f"client_classes has {len(client_classes)} entries for {n} deltas; "
                         "give one collection of class indices per delta")
    sets = []
    for i, classes in enumerate(client_classes):
        try:
            sets.append({operator.index(c) for c in classes})
        except TypeError as error:
            raise ValueError(f"client_classes[{i}] must hold integer class indices, got {classes!r}") from error
    return sets


def row_mean_factors(weights: Sequence[float] | None, client_classes: Sequence[Collection[int]], classes: int,
                     row_shares: Sequence[Mapping[int, float]] | None = None) -> dict[int, dict[int, float]]:
    """Per class c, the factor of each delta in row c's mean in ``class_aware_merge`` (delta index -> factor, summing
    to 1): its weight x its row share (``row_shares``), over the deltas whose ``client_classes`` hold c. A class with
    no such delta of positive weight is absent."""
    factors = _normalised_weights(weights, len(client_classes))
    sets = _class_sets(client_classes, len(client_classes))
    if row_shares is not None and len(row_shares) != len(sets):
        raise ValueError(f"{len(row_shares)} row shares for {len(sets)} deltas")
    out = {}
    for c in range(classes):
        raw = {i: factors[i] * (float(row_shares[i].get(c, 1.0)) if row_shares is not None else 1.0)
               for i, s in enumerate(sets) if c in s}
        total = sum(raw.values())
        if total > 0:
            out[c] = {i: f / total for i, f in raw.items()}
    return out


def mean_rows(deltas: Sequence[Delta], row_factors: Mapping[int, Mapping[int, float]],
              class_row_params: Sequence[str] = CLASS_ROW_PARAMS) -> dict[str, Tensor]:
    """The class-row tensors of the class-aware merge: row c = sum_i a_i r_i^c with ``row_factors[c]``
    (``row_mean_factors``); a class without factors is 0."""
    out = {}
    for name in class_row_params:
        merged = torch.zeros_like(deltas[0][name])
        for c, members in row_factors.items():
            merged[c] = sum(a * deltas[i][name][c] for i, a in members.items())
        out[name] = merged
    return out


def mean_row_norms(deltas: Sequence[Delta], row_factors: Mapping[int, Mapping[int, float]],
                   class_row_params: Sequence[str] = CLASS_ROW_PARAMS) -> dict[int, float]:
    """Per class c of ``row_factors`` (``row_mean_factors``), the mean size of the rows row c is averaged from,
    sum_i a_i ||r_i^c||, with the same factors a_i: the size the merged row would have if its rows agreed in
    direction. The merged row's own size is at most this (triangle inequality); the gap is what averaging
    rows that point different ways cancels."""
    norms = [row_norms(d, class_row_params) for d in deltas]
    return {c: sum(a * norms[i][c] for i, a in factors.items()) for c, factors in row_factors.items()}


def size_setting_factors(row_factors: Mapping[int, Mapping[int, float]],
                         row_shares: Sequence[Mapping[int, float]] | None) -> dict[int, dict[int, float]]:
    """``row_factors`` (``row_mean_factors``) restricted, per class, to the rows that count whole (no entry in
    ``row_shares``) and renormalised; a class whose rows all count partly keeps its factors. Why: a row counted
    as a fraction of a row (``row_shares``: sent far below its kind's median) is one the merge does not trust
    to set the class's size, so a tiny row at the weight cap lowers neither the mean nor the size it is restored
    to."""
    out = {}
    for c, factors in row_factors.items():
        whole = {i: a for i, a in factors.items() if row_shares is None or c not in row_shares[i]}
        total = sum(whole.values())
        out[c] = {i: a / total for i, a in whole.items()} if total > 0 else dict(factors)
    return out


def restore_row_sizes(merged: Mapping[str, Tensor], targets: Mapping[int, float],
                      class_row_params: Sequence[str] = CLASS_ROW_PARAMS) -> tuple[dict[str, Tensor], dict[int, float]]:
    """Each merged class row c of ``targets`` scaled up to ``targets[c]`` (``mean_row_norms``): the rows of a class
    a few clients teach keep the size their teachers gave them, where a mean would shrink it by their
    disagreement in direction (the server-side step size of FedExP, Jhunjhunwala et al. 2023, taken per class row
    and never below 1). Returns (the merge with those rows scaled, class -> the factor, for rows scaled by more
    than 1 only). A zero merged row stays zero."""
    sizes = row_norms(merged, class_row_params)
    factors = {c: target / sizes[c] for c, target in targets.items() if sizes[c] > 0 and target > sizes[c]}
    out = dict(merged)
    if factors:
        scale = torch.ones(len(sizes), dtype=torch.float64)
        for c, f in factors.items():
            scale[c] = f
        for name in class_row_params:
            shape = (-1,) + (1,) * (merged[name].dim() - 1)
            out[name] = (merged[name].double() * scale.view(shape)).to(merged[name].dtype)
    return out, factors


def class_aware_merge(deltas: Sequence[Delta], weights: Sequence[float] | None,
                      client_classes: Sequence[Collection[int]], shared: str = "trimmed", scale: float = 1.0,
                      class_row_params: Sequence[str] = CLASS_ROW_PARAMS, shares: Sequence[float] | None = None,
                      row_shares: Sequence[Mapping[int, float]] | None = None, restore_rows: Collection[int] = (),
                      **shared_options) -> dict[str, Tensor]:
    """Merge that keeps each class's knowledge at full strength.

    Clients teach different classes. Under a plain mean, a class taught by one client out of n
    arrives divided by n, and the other clients' drift on its row (they never saw the class, so
    it is not knowledge) is mixed in. So:

    * class-row tensors (``class_row_params``; shape [num_classes, ...], row c = class c): row c
      of the result is the weighted mean of row c over the clients whose ``client_classes``
      contain c, their weights renormalised over that group; a row no client trained (or only
      clients of weight 0 trained) is 0;
    * every other ("shared") tensor, e.g. the FPN and the regression head that all classes use:
      ``aggregate(..., method=shared, **shared_options)`` with ``shared`` one of ``SHARED_METHODS``
      ("weighted", "trimmed", "ties", "krum");
    * the whole result is multiplied by ``scale`` (task arithmetic's lambda, chosen by the caller
      on held-out data; 1.0 leaves the merge as is);
    * ``shares`` (``bound_influence``'s clip shares) reach the shared rule when it is "trimmed", which
      ignores weights (the other rules see them in ``weights``);
    * ``row_shares[i]`` (``bound_influence``'s, class id -> share) scales delta i's weight in row c's mean only;
    * each class of ``restore_rows`` keeps the mean size of its rows that count whole (``size_setting_factors``,
      ``restore_row_sizes``; empty: the plain mean).

    ``client_classes[i]`` is the set of class indices delta i was trained on (its labels). If any
    of ``class_row_params`` is absent from the deltas (another head), every tensor is shared.
    Returns new tensors; the deltas are not modified.
    """
    keys = _check_deltas(deltas)
    if shared not in SHARED_METHODS:
        raise ValueError(f"shared must be one of {', '.join(SHARED_METHODS)}, got {shared!r}")
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"scale must be finite and positive, got {scale}")
    classes = _class_sets(client_classes, len(deltas))
    if row_shares is not None and len(row_shares) != len(deltas):
        raise ValueError(f"{len(row_shares)} row shares for {len(deltas)} deltas")
    _normalised_weights(weights, len(deltas))  # checked here whether or not the deltas have class rows
    row_keys = list(class_row_params) if all(name in keys for name in class_row_params) else []
    out: dict[str, Tensor] = {}
    for name in row_keys:
        rows = deltas[0][name].shape[0] if deltas[0][name].dim() else 0
        for i, cs in enumerate(classes):
            bad = sorted(c for c in cs if not 0 <= c < rows)
            if bad:
                raise ValueError(f"client_classes[{i}] has class indices {bad} outside [0, {rows}) "
                                 f"for {name} of shape {tuple(deltas[0][name].shape)}")
    if row_keys:
        row_factors = row_mean_factors(weights, classes, deltas[0][row_keys[0]].shape[0], row_shares)
        out.update(mean_rows(deltas, row_factors, row_keys))
        if restore_rows:
            sizing = size_setting_factors({c: f for c, f in row_factors.items() if c in set(restore_rows)},
                                          row_shares)
            targets = mean_row_norms(deltas, sizing, class_row_params)
            out.update(restore_row_sizes({name: out[name] for name in row_keys}, targets, class_row_params)[0])
    shared_keys = [name for name in keys if name not in row_keys]
    if shared_keys:
        restricted = [{name: d[name] for name in shared_keys} for d in deltas]
        if shared == "trimmed" and shares is not None:
            shared_options = {**shared_options, "shares": shares}
        out.update(aggregate(restricted, weights, shared, **shared_options))
    return {name: out[name] * scale for name in keys}


def aggregate(deltas: Sequence[Delta], weights: Sequence[float] | None, method: str = "weighted",
              **options) -> dict[str, Tensor]:
    """Dispatches to one rule by name: "weighted" | "trimmed" (trim_fraction, shares) | "ties" (keep_fraction)
    | "krum" (num_malicious, num_selected) | "class_aware" (client_classes, required; shared, scale
    and the shared rule's options).

    ``weights`` are ignored by "trimmed" (a rank statistic has no natural weighting).
    """
    if method == "weighted":
        return weighted_mean(deltas, weights, **options)
    if method == "trimmed":
        return trimmed_mean(deltas, **options)
    if method == "ties":
        return ties_merge(deltas, weights, **options)
    if method == "krum":
        return multi_krum(deltas, weights, **options)
    if method == "class_aware":
        if "client_classes" not in options:
            raise ValueError("aggregation method 'class_aware' needs client_classes: "
                             "one collection of trained class indices per delta")
        return class_aware_merge(deltas, weights, **options)
    raise ValueError(f"unknown aggregation method {method!r}; expected one of {', '.join(AGGREGATION_METHODS)}")
