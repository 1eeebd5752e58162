"""The tutor's operating point, set by the server on the manufacturer's validation set after each merge
(``--calibrate f1``).

Average precision ranks a class's detections; a product reports those scoring above the operating
threshold. A merge can move a class's scores as a whole (an honest claimer's calibration drifts; a false
claim at the weight cap lowers them) without changing their ranking: the tutor's recall at the threshold
then swings by tens of points while its AP holds (README, "A calibrated tutor?"), and neither a fixed nor
a round-relative tolerance on that recall separates an attack from honest drift. Calibration takes the
operating point out of the clients' hands: after the merge the server adds to each class's
classification bias the shift, from a grid, under which that class's F1 at the threshold on the
validation set is highest (eq. 11's F1). A shift raises or lowers every score of its class together,
so the class's ranking and AP stay as they were, up to detections crossing the 0.05 score floor and the
centerness factor in FCOS's score (sqrt(sigmoid(class logit) x sigmoid(centerness))).

``f1-learnt`` calibrates only the classes the tutor learnt from clients: the presumed classes' operating
point is the manufacturer's, and moving their biases after each merge fought the next merge (README, "The
server sets the tutor's operating point").

``f1-offsets`` searches the same shifts for every class but keeps them beside the tutor, as the per-class
score offsets of the tutor as deployed (its operating point), instead of writing them into its biases: the
weights the clients distil from and the merge updates stay those of an uncalibrated run, so a shift can
neither fight the next merge nor reach the edges through Distill C's soft targets, and every gate still
judges the weights. Each round's search starts from the offsets the tutor already has, so it follows a drift
of the merged scores over the rounds (``offset_search``).

The grid reaches 3 logits (and a fine step) from the tutor's offsets; a class whose F1 is still rising at
the grid's end is followed beyond it, one coarse step at a time, up to ``reach`` logits (``extend_search``):
after an honest first round the classes the tutor learns sit more than 3 logits below the threshold
(sheep's and tvmonitor's F1 still rising at +3.25), and a false claim that lowers a class's scores as a
whole leaves the class's ranking, and so its AP, alone and only pushes its best shift past the grid.

How far the choice itself is determined: on a class whose F1 is flat around its best, neighbouring offsets
differ in F1 by less than one validation object, and a merge that moves the class's scores by a hair (an
honest client with more data, a hostile one kept within its bounds) picks the neighbour; the recall at the
threshold then moves by a whole step of the class's curve (16 points for sheep on heldout8: F1 0.394 at both
offsets, recall 44 or 60 %). ``offset_choice_noise`` replays the choice on bootstrap resamples of the
validation images and measures how far the chosen offset's recall wanders: the operating point's own noise,
which a tolerance on recall at the threshold must count beside the paired bootstrap noise of the detections.

The search is a pure function of ``f1_of`` (the validation F1 per class of the tutor with its class
biases moved; ``strategies.validator.CandidateValidator.shifted_figures``), so it is testable without a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from torch import Tensor

from evaluation.ap import precision_recall_f1
from models.parts import CLASS_ROW_PARAMS

# Every class moved together by each coarse shift (13 validations), then each class's best +- the fine step
# (2 more). Logits: 3 moves a score of 0.5 (logit 0, before centerness) to 0.95 or 0.05.
COARSE_SHIFTS = tuple(s / 2 for s in range(-6, 7))
FINE_STEP = 0.25
# A shift must raise a class's validation F1 by at least this over no shift, else its bias stays: the F1 of
# a few dozen validation objects moves by about a point between neighbouring shifts by chance alone.
MIN_F1_GAIN = 0.01
# How far one round's search may go from the tutor's offsets by default (logits): the grid's end, no extension
# (``--calibrate-reach``; at 8 a class score of 0.5, logit 0, would reach 0.9997)
GRID_END = max(COARSE_SHIFTS)

CLASS_BIAS = CLASS_ROW_PARAMS[1]  # head.classification_head.cls_logits.bias [num_classes]


def calibrated_classes(mode: str, validation_classes: Iterable[str], presumed: Iterable[str]) -> list[str]:
    """The classes a calibration ``mode`` moves: every validation class ("f1"), those outside the
    manufacturer's presumed classes ("f1-learnt": the classes the tutor learnt from clients), none ("off")."""
    if mode == "off":
        return []
    if mode in ("f1", "f1-offsets"):
        return list(validation_classes)
    if mode == "f1-learnt":
        kept = set(presumed)
        return [c for c in validation_classes if c not in kept]
    raise ValueError(f"calibration mode must be off, f1, f1-learnt or f1-offsets, got {mode!r}")


def best_shifts(f1_by_class: Mapping[str, Mapping[float, float]], min_gain: float = MIN_F1_GAIN) -> dict[str, float]:
    """Per class, the shift of highest F1 (ties: the smaller shift in size, then the lower); 0 when that F1 is
    not at least ``min_gain`` above the class's F1 at shift 0 (every class's table must hold shift 0)."""
    out = {}
    for name, table in f1_by_class.items():
        if 0.0 not in table:
            raise ValueError(f"{name}: the F1 table has no entry for shift 0")
        best = max(table, key=lambda s: (table[s], -abs(s), -s))
        out[name] = best if table[best] >= table[0.0] + min_gain else 0.0
    return out


def extend_search(f1_of: Callable[[Mapping[str, float]], Mapping[str, float]],
                  table: dict[str, dict[float, float]], end: float, step: float, reach: float) -> None:
    """Beyond the grid's ends (-``end``, +``end``): follows each class whose best F1 lies at an end and rose to
    it, or whose F1 is 0 at every shift (no detection reaches the threshold, so its scores sit far below it
    and only a raise can find them), one ``step`` at a time while its F1 keeps rising (or stays 0 upward), up
    to ``reach``. Classes moving the same way are moved together; ``table`` ({class: {shift: F1}}) gains every
    F1 measured."""
    def rising(t: Mapping[float, float], at: float, sign: float) -> bool:
        if sign > 0 and max(t.values()) == 0.0:
            return True
        inner = at - sign * step
        return inner in t and t[at] > t[inner] and t[at] >= max(t.values())

    for sign in (1.0, -1.0):
        at = end
        going = [c for c, t in table.items() if rising(t, sign * at, sign)]
        while going and at + step <= reach + 1e-9:
            at += step
            f1 = f1_of({c: sign * at for c in going})
            for c in going:
                table[c][sign * at] = float(f1[c])
            going = [c for c in going if rising(table[c], sign * at, sign)]


def search_shifts(f1_of: Callable[[Mapping[str, float]], Mapping[str, float]], classes: Iterable[str],
                  coarse: Iterable[float] = COARSE_SHIFTS, fine: float = FINE_STEP,
                  min_gain: float = MIN_F1_GAIN, reach: float = GRID_END
                  ) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """The calibration search: ``f1_of({class: shift})`` -> {class: F1 at the operating threshold} of the
    tutor whose class biases are moved by those shifts (classes are moved together; a class's F1 depends on
    its own shift only, up to FCOS's per-image top-k and NMS). The coarse grid, then beyond its ends up to
    ``reach`` for the classes still rising there (``extend_search``; a ``reach`` at the grid's end: none),
    then each class's best -+ the fine step. Returns each class's chosen shift (``best_shifts``) and every F1
    measured ({class: {shift: F1}})."""
    classes = list(classes)
    grid = sorted({0.0, *map(float, coarse)})
    table: dict[str, dict[float, float]] = {c: {} for c in classes}
    for shift in grid:
        f1 = f1_of({c: shift for c in classes})
        for c in classes:
            table[c][shift] = float(f1[c])
    if classes and len(grid) > 1 and reach > max(grid[-1], -grid[0]):
        if grid[-1] != -grid[0]:
            raise ValueError(f"the search extends a grid symmetric about 0, got {grid[0]} to {grid[-1]}")
        extend_search(f1_of, table, grid[-1], grid[-1] - grid[-2], reach)
    if fine > 0:
        best = best_shifts(table, min_gain=0.0)
        for step in (-fine, fine):
            wanted = {c: best[c] + step for c in classes if best[c] + step not in table[c]}
            if wanted:
                f1 = f1_of(wanted)
                for c, shift in wanted.items():
                    table[c][shift] = float(f1[c])
    return best_shifts(table, min_gain), table


def shift_class_biases(nh: Mapping[str, Tensor], shifts: Mapping[int, float]) -> dict[str, Tensor]:
    """Neck/head weights whose classification bias of class c is moved by ``shifts[c]`` (a copy; every other
    tensor is shared)."""
    out = dict(nh)
    bias = nh[CLASS_BIAS].clone()
    for c, shift in shifts.items():
        bias[int(c)] += shift
    out[CLASS_BIAS] = bias
    return out


def moved(shifts: Mapping[str, float]) -> dict[str, float]:
    """The classes a calibration moves, with their shifts (what the tutor's history records)."""
    return {c: s for c, s in shifts.items() if s != 0}


def offset_search(f1_of: Callable[[Mapping[str, float]], Mapping[str, float]], classes: Iterable[str],
                  offsets: Mapping[str, float], **search) -> tuple[dict[str, float], dict[str, float],
                                                                   dict[str, dict[float, float]]]:
    """``search_shifts`` around the ``offsets`` a tutor already has (``f1_of`` takes absolute offsets; the
    grid and ``best_shifts``' margin are relative to ``offsets``). Returns (the new offsets of ``classes``,
    each one's change, the F1 table by change)."""
    classes = list(classes)
    start = {c: float(offsets.get(c, 0.0)) for c in classes}
    # (every class at its offset, those the search moves at offset + change)
    change, table = search_shifts(lambda rel: f1_of({**start, **{c: start[c] + s for c, s in rel.items()}}),
                                  classes, **search)
    return {c: start[c] + change[c] for c in classes}, change, table


def offset_choice_noise(counts: Mapping[str, Mapping[float, tuple]], start: Mapping[str, float], samples: int,
                        seed: int, min_gain: float = MIN_F1_GAIN) -> dict[str, dict]:
    """How much a class's recall at the operating threshold moves with the calibration's own choice of offset.

    ``counts``: per class, per offset relative to the chosen one (0 must be present), the per-image counts of
    the tutor's detections at the threshold with the class at that offset (``evaluation.ap.counts_at``: true
    positives, false positives, positives, each [num_images]). ``start``: per class, where that round's search
    started, relative to the chosen offset: within the offsets counted, the choice keeps to it unless a move
    gains ``min_gain`` in F1 (``best_shifts``' rule); elsewhere it is the plain best F1 (ties: nearest the
    chosen one). Each of ``samples`` bootstrap resamples of the images (one resample shared by every class)
    makes the choice on the resample's F1s; the chosen offset's recall is then read on all the images.

    Returns per class: "std" (the standard deviation of that recall over the resamples, a fraction; NaN
    without positives), "chosen" ({relative offset: share of resamples that chose it})."""
    rng = np.random.default_rng(seed)
    classes = {c: dict(sorted(table.items())) for c, table in counts.items()}
    for c, table in classes.items():
        if 0.0 not in table:
            raise ValueError(f"{c}: no counts at the chosen offset (relative offset 0)")
    n = next((len(tp) for table in classes.values() for tp, _, _ in table.values()), 0)  # images
    recall = {c: {o: (float(tp.sum() / pos.sum()) if pos.sum() else math.nan) for o, (tp, _, pos) in table.items()}
              for c, table in classes.items()}
    picks: dict[str, list[float]] = {c: [] for c in classes}
    for _ in range(samples):
        copies = np.bincount(rng.integers(0, n, size=n), minlength=n)
        for c, table in classes.items():
            f1 = {o: precision_recall_f1(int(copies @ tp), int(copies @ fp), int(copies @ pos))[2]
                  for o, (tp, fp, pos) in table.items()}
            origin = float(start.get(c, math.nan))
            if origin in f1:  # the search's own rule about where it started
                picks[c].append(origin + best_shifts({c: {o - origin: v for o, v in f1.items()}}, min_gain)[c])
            else:
                picks[c].append(best_shifts({c: f1}, 0.0)[c])
    out = {}
    for c, chosen in picks.items():
        values = [recall[c][o] for o in chosen]
        std = float(np.std(values, ddof=1)) if len(values) > 1 and all(map(math.isfinite, values)) else math.nan
        shares = {o: chosen.count(o) / len(chosen) for o in sorted(set(chosen))} if chosen else {}
        out[c] = {"std": std, "chosen": shares}
    return out
