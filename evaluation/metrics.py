"""Knowledge gain, unintended forgetting, released knowledge and spread per client and method.

Pure python / numpy: no torch, no Flower.  The federation code hands us one *record* per
(method, round, client)::

    {"method": "diredi", "round": 1, "client": 0,
     "ap_before": {class: ap or NaN}, "ap_after": {class: ap or NaN},
     "bytes_up": int, "bytes_down": int, "seconds": {phase: float},  # wall; "cpu_seconds": the same in CPU
     "peak_rss_mb": float, "accepted": bool | None,
     # optional: "after": {"precision": p, "recall": r, "f1": f}  (or the same keys at top level)
    }

and one *spec* per client::

    {"client": 0, "private": [...], "kept": [...], "dropped": [...], "protected": [...]}

AP values are in [0, 1].  NaN means "the class has no positives in this test shard": such a class
is skipped wherever it appears, and a metric over no (remaining) classes is NaN.

Evaluation timeline of one client under one method
--------------------------------------------------
``ap_before`` of round 1 is the original edge (before any federated work), ``ap_after`` of round r
is the client's model after round r.  The timeline used for forgetting is, in round order,
``[ap_before(1), ap_after(1), ap_before(2), ap_after(2), ...]`` (a later ``ap_before`` is usually a
repeat of the previous ``ap_after``; repeating a value cannot change a maximum).

Definitions (all "change" = now - start, with start = ap_before of the first round and now =
ap_after of the last round)
----------------------------------------------------------------------------------------------
* knowledge gain:        mean AP change over the client's private (new) classes.
* unintended forgetting: Chaudhry et al. 2018, per class ``f_j = max_{l < k} a_{l,j} - a_{k,j}``
  (best earlier evaluation minus the latest one), clamped at 0, averaged over a class set: the
  client's kept presumed classes, and separately the protected classes.
* released knowledge:    mean AP change over the client's dropped presumed classes (negative means
  the client's model let go of them, which is wanted).
* knowledge spread:      mean AP change over other clients' private classes that this client does
  not hold privately (positive means knowledge travelled through the federation).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from evaluation.ap import nan_mean
from protocol.config import METHODS


# Optional end-of-round detection metrics a record may carry (see `record_after_metric`).
DETECTION_METRICS = ("precision", "recall", "f1")

NAN = float("nan")

ApMap = Mapping[str, float]


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def is_missing(value: Any) -> bool:
    """True for None and for a non-finite float (NaN AP = class absent from the shard)."""
    if value is None:
        return True
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def method_sort_key(method: str) -> tuple[int, str]:
    """Known methods first in paper order, then any other method alphabetically."""
    if method in METHODS:
        return (METHODS.index(method), method)
    return (len(METHODS), method)


def flatten_class_names(groups: Any) -> list[str]:
    """Unique class names, first-seen order, from a flat list of names, a list of per-client
    lists, or a mapping client -> list."""
    if groups is None:
        return []
    if isinstance(groups, str):
        return [groups]
    if isinstance(groups, Mapping):
        groups = list(groups.values())
    names: list[str] = []
    for item in groups:
        for name in flatten_class_names(item):
            if name not in names:
                names.append(name)
    return names


# ----------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------


def ap_change(ap_start: ApMap, ap_now: ApMap, name: str) -> float:
    """AP_now - AP_start for one class; NaN when either side is missing."""
    start, now = ap_start.get(name), ap_now.get(name)
    if is_missing(start) or is_missing(now):
        return NAN
    return float(now) - float(start)


def mean_ap_change(ap_start: ApMap, ap_now: ApMap, classes: Iterable[str]) -> float:
    """Mean of `ap_change` over `classes`, skipping classes whose change is NaN."""
    return nan_mean(ap_change(ap_start, ap_now, name) for name in classes)


def knowledge_gain(ap_start: ApMap, ap_now: ApMap, private: Iterable[str]) -> float:
    """Mean AP change over the client's private (new) classes."""
    return mean_ap_change(ap_start, ap_now, private)


def objects_weighted_gain(ap_start: ApMap, ap_now: ApMap, private: Iterable[str], objects: Mapping[str, float]) -> float:
    """``knowledge_gain`` with each private class weighted by its objects in the client's test shard
    (``objects``): a class with a handful of objects moves its AP by tens of points from round to round and
    would weigh as much as one with eighty. Classes alike where a count is missing or not positive."""
    changes = {c: ap_change(ap_start, ap_now, c) for c in private}
    changes = {c: v for c, v in changes.items() if not math.isnan(v)}
    weights = [objects.get(c, NAN) for c in changes]
    if not changes:
        return NAN
    if not all(w > 0 for w in weights):  # NaN compares False: a missing count
        return nan_mean(changes.values())
    return float(sum(w * v for w, v in zip(weights, changes.values())) / sum(weights))


def shard_objects(record: Mapping) -> dict[str, float]:
    """A record's objects per class in the client's test shard (its ``after`` evaluation's ``npos.<class>``)."""
    after = record.get("after") if isinstance(record.get("after"), Mapping) else {}
    return {key[len("npos."):]: float(value) for key, value in after.items() if key.startswith("npos.")
            and not is_missing(value)}


def released_knowledge(ap_start: ApMap, ap_now: ApMap, dropped: Iterable[str]) -> float:
    """Mean AP change over the client's dropped classes (negative = knowledge released)."""
    return mean_ap_change(ap_start, ap_now, dropped)


def knowledge_spread(ap_start: ApMap, ap_now: ApMap, other_private: Iterable[str]) -> float:
    """Mean AP change over other clients' private classes (the caller excludes the client's own;
    `other_private_classes` builds that list)."""
    return mean_ap_change(ap_start, ap_now, other_private)


def other_private_classes(all_private: Any, own_private: Iterable[str]) -> list[str]:
    """Every client's private classes minus this client's own private classes."""
    own = set(own_private)
    return [name for name in flatten_class_names(all_private) if name not in own]


def class_forgetting(ap_history: Sequence[Any]) -> float:
    """Chaudhry et al. 2018 forgetting of one class: max over earlier evaluations minus the latest.

    `ap_history` is the class's AP in evaluation order.  Missing (NaN/None) earlier entries are
    skipped; a missing latest entry, or no earlier entry, gives NaN.  The raw difference is negative
    when the latest AP is the best so far (the model improved); it is clamped at 0 so that
    improvement on one class cannot cancel forgetting of another in the class mean.
    """
    if len(ap_history) < 2 or is_missing(ap_history[-1]):
        return NAN
    earlier = [float(v) for v in ap_history[:-1] if not is_missing(v)]
    if not earlier:
        return NAN
    return max(0.0, max(earlier) - float(ap_history[-1]))


def worst_drop(ap_start: ApMap, history: Sequence[ApMap], classes: Iterable[str]) -> float:
    """Mean over ``classes`` of the largest drop below the start over every evaluation in ``history``
    (clamped at 0): how far below the model it started from (the manufacturer's edge) a class has ever
    been. Unlike ``class_forgetting`` it does not compare against the best round, so a model that
    swings above its start is not charged for coming back down to it."""
    def one(name: str) -> float:
        start = ap_start.get(name)
        drops = [] if is_missing(start) else [float(start) - float(ap[name]) for ap in history
                                               if not is_missing(ap.get(name))]
        return max(0.0, max(drops)) if drops else NAN

    return nan_mean(one(name) for name in classes)


def unintended_forgetting(history: Sequence[ApMap], classes: Iterable[str]) -> float:
    """Mean of `class_forgetting` over `classes`; `history` is the list of per-class AP maps in
    evaluation order (the latest last).  Classes with NaN forgetting are skipped."""
    return nan_mean(class_forgetting([ap.get(name) for ap in history]) for name in classes)


def mean_average_precision(ap: ApMap) -> float:
    """mAP over the evaluated (non-missing) classes of one AP map."""
    return nan_mean(ap.values())


# ----------------------------------------------------------------------------------------------
# Records -> per-client summaries
# ----------------------------------------------------------------------------------------------


def sorted_by_round(records: Iterable[Mapping]) -> list[Mapping]:
    return sorted(records, key=lambda r: int(r["round"]))


def evaluated(record: Mapping) -> bool:
    """Whether the round's final edge was evaluated (``RunConfig.eval_every``: the rounds between
    evaluations have records with costs and no AP)."""
    return bool(record.get("ap_after"))


def evaluation_history(records: Iterable[Mapping]) -> list[ApMap]:
    """AP maps in evaluation order: ap_before then ap_after of each round, rounds ascending."""
    history: list[ApMap] = []
    for record in sorted_by_round(records):
        history.append(record.get("ap_before") or {})
        history.append(record.get("ap_after") or {})
    return history


def record_after_metric(record: Mapping, key: str) -> float:
    """An optional end-of-round detection metric (precision / recall / f1 / ...): looked up in the
    record's ``after`` dict (alias ``metrics_after``), then at the record's top level; NaN if absent."""
    for nested in ("after", "metrics_after"):
        values = record.get(nested)
        if isinstance(values, Mapping) and key in values:
            return NAN if is_missing(values[key]) else float(values[key])
    value = record.get(key)
    return NAN if is_missing(value) else float(value)


def operating_point(summary: Mapping | None, classes: Iterable[str]) -> dict[str, float]:
    """Precision, recall and F1 (eq. 11) at the deployment score threshold, micro-averaged over
    ``classes``, from an evaluation summary's per-class counts ("tp.<class>", "fp.<class>",
    "npos.<class>": ``evaluation.ap.per_class_ap``). Classes the summary does not count, or without
    positives, are left out; NaN everywhere when none is left (or the summary has no counts)."""
    summary = summary or {}
    tp = fp = npos = 0.0
    counted = False
    for name in classes:
        keys = (f"tp.{name}", f"fp.{name}", f"npos.{name}")
        if not all(k in summary and not is_missing(summary[k]) for k in keys) or float(summary[keys[2]]) <= 0:
            continue
        counted = True
        tp, fp, npos = tp + float(summary[keys[0]]), fp + float(summary[keys[1]]), npos + float(summary[keys[2]])
    if not counted:
        return {"precision": NAN, "recall": NAN, "f1": NAN}
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / npos
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def sum_seconds_per_phase(records: Iterable[Mapping]) -> dict[str, float]:
    """Seconds per phase summed over records (phases sorted by name)."""
    totals: dict[str, float] = {}
    for record in records:
        for phase, seconds in (record.get("seconds") or {}).items():
            if not is_missing(seconds):
                totals[phase] = totals.get(phase, 0.0) + float(seconds)
    return dict(sorted(totals.items()))


def spec_classes(spec: Mapping, key: str) -> list[str]:
    return list(spec.get(key) or [])


def client_summary(records: Sequence[Mapping], spec: Mapping, all_private: Any) -> dict:
    """Summary of one client under one method from its per-round records (any order).

    Returns a dict: method, client, rounds, gain, gain_objects, forgetting_kept, forgetting_protected, released,
    spread, map_start (original edge), map_final, precision / recall / f1 (last round, NaN if the
    records do not carry them), bytes_up / bytes_down (mean per round), seconds ({phase: sum}),
    seconds_total, peak_rss_mb (max), accepted_rounds / rejected_rounds (counts of
    ``accepted`` True / False; None is neither).
    """
    if not records:
        raise ValueError("client_summary needs at least one record")
    ordered = sorted_by_round(records)
    first, last = ordered[0], ordered[-1]
    ap_start: ApMap = first.get("ap_before") or {}
    ap_now: ApMap = last.get("ap_after") or {}
    history = evaluation_history(ordered)
    private = spec_classes(spec, "private")
    seconds = sum_seconds_per_phase(ordered)
    accepted = [r.get("accepted") for r in ordered]
    return {
        "method": str(first.get("method")),
        "client": int(first.get("client", spec.get("client", -1))),
        "rounds": len(ordered),
        "gain": knowledge_gain(ap_start, ap_now, private),
        "gain_objects": objects_weighted_gain(ap_start, ap_now, private, shard_objects(last)),
        "forgetting_kept": unintended_forgetting(history, spec_classes(spec, "kept")),
        "forgetting_protected": unintended_forgetting(history, spec_classes(spec, "protected")),
        "released": released_knowledge(ap_start, ap_now, spec_classes(spec, "dropped")),
        "spread": knowledge_spread(ap_start, ap_now, other_private_classes(all_private, private)),
        "map_start": mean_average_precision(ap_start),
        "map_final": mean_average_precision(ap_now),
        **{key: record_after_metric(last, key) for key in DETECTION_METRICS},
        "bytes_up": nan_mean(r.get("bytes_up") for r in ordered),
        "bytes_down": nan_mean(r.get("bytes_down") for r in ordered),
        "seconds": seconds,
        "seconds_total": float(sum(seconds.values())),
        "peak_rss_mb": max((float(r["peak_rss_mb"]) for r in ordered
                            if not is_missing(r.get("peak_rss_mb"))), default=NAN),
        "accepted_rounds": sum(1 for a in accepted if a is True),
        "rejected_rounds": sum(1 for a in accepted if a is False),
    }


def specs_by_client(specs: Any) -> dict[int, Mapping]:
    """Index client specs by client id; accepts a list of spec dicts or a mapping id -> spec."""
    if isinstance(specs, Mapping):
        return {int(k): v for k, v in specs.items()}
    return {int(spec["client"]): spec for spec in specs}


def group_records(records: Iterable[Mapping]) -> dict[tuple[str, int], list[Mapping]]:
    """Records grouped by (method, client), keys in report order (method order, then client)."""
    groups: dict[tuple[str, int], list[Mapping]] = {}
    for record in records:
        groups.setdefault((str(record["method"]), int(record["client"])), []).append(record)
    return {key: groups[key] for key in sorted(groups, key=lambda k: (method_sort_key(k[0]), k[1]))}


def method_table(records: Iterable[Mapping], specs: Any, all_private: Any) -> list[dict]:
    """One `client_summary` per (method, client), sorted by method (paper order) then client.

    A client without a spec gets an empty one (its class-set metrics are then NaN)."""
    by_client = specs_by_client(specs)
    return [
        client_summary(group, by_client.get(client, {"client": client}), all_private)
        for (_, client), group in group_records(records).items()
    ]


def methods_in(rows: Iterable[Mapping]) -> list[str]:
    """Distinct methods of rows/records in report order."""
    return sorted({str(row["method"]) for row in rows}, key=method_sort_key)


def mean_seconds_per_phase(rows: Sequence[Mapping]) -> dict[str, float]:
    """Per phase, the mean over rows of each row's summed seconds (missing phase = not counted)."""
    phases = sorted({phase for row in rows for phase in (row.get("seconds") or {})})
    return {phase: nan_mean((row.get("seconds") or {}).get(phase) for row in rows) for phase in phases}


def method_means(table: Sequence[Mapping]) -> list[dict]:
    """Per method (report order), the NaN-skipping mean over its clients of every numeric field of
    `method_table` rows; ``clients`` is the number of clients, ``seconds`` the mean per phase and
    ``peak_rss_mb`` the max over clients."""
    means = []
    for method in methods_in(table):
        rows = [row for row in table if row["method"] == method]
        summary: dict[str, Any] = {"method": method, "clients": len(rows)}
        numeric_keys = [key for key, value in rows[0].items()
                        if key not in ("method", "client", "seconds", "peak_rss_mb")
                        and isinstance(value, (int, float)) and not isinstance(value, bool)]
        for key in numeric_keys:
            summary[key] = nan_mean(row.get(key) for row in rows)
        summary["seconds"] = mean_seconds_per_phase(rows)
        summary["peak_rss_mb"] = max((float(r["peak_rss_mb"]) for r in rows
                                      if not is_missing(r.get("peak_rss_mb"))), default=NAN)
        means.append(summary)
    return means


def round_series(records: Iterable[Mapping], specs: Any, all_private: Any) -> list[dict]:
    """Per (method, round): mean over clients of gain and kept-class forgetting as they stood after
    that round (each client summarised over its records up to and including the round); rounds
    without an evaluation (``evaluated``) have no row.

    Returns rows ``{"method", "round", "gain", "forgetting_kept", "clients"}`` in method order then
    round order."""
    by_client = specs_by_client(specs)
    per_round: dict[tuple[str, int], list[dict]] = {}
    for (method, client), group in group_records(records).items():
        ordered = sorted_by_round(group)
        spec = by_client.get(client, {"client": client})
        for index, record in enumerate(ordered):
            if not evaluated(record):
                continue
            summary = client_summary(ordered[: index + 1], spec, all_private)
            per_round.setdefault((method, int(record["round"])), []).append(summary)
    series = []
    for method, round_number in sorted(per_round, key=lambda k: (method_sort_key(k[0]), k[1])):
        rows = per_round[(method, round_number)]
        series.append({
            "method": method,
            "round": round_number,
            "gain": nan_mean(r["gain"] for r in rows),
            "forgetting_kept": nan_mean(r["forgetting_kept"] for r in rows),
            "clients": len(rows),
        })
    return series


def _mean_round_seconds(records: Sequence[Mapping], method: str) -> float | None:
    walls = {r["round"]: r["round_wall_s"] for r in records if r["method"] == method and "round_wall_s" in r}
    return sum(walls.values()) / len(walls) if walls else None


def max_dp_epsilon(records: Iterable[Mapping], method: str) -> float | None:
    """The largest epsilon a client of ``method`` reported spending (``record["dp"]["epsilon"]``,
    clients with differential privacy on: ``protocol.privacy``); None when no record carries one."""
    values = [float(r["dp"]["epsilon"]) for r in records if r["method"] == method
              and isinstance(r.get("dp"), Mapping) and r["dp"].get("epsilon") is not None]
    return max(values) if values else None


def run_summary(records: Sequence[Mapping], specs: Any, all_private: Any, rounds: int, wall_s: float,
                tutor_history: Sequence[Mapping] = ()) -> dict:
    """The run in one machine-readable dict (``summary.json``): per method the mean over clients of
    gain, forgetting (kept, protected), released, spread in percentage points, traffic in MB
    (10^6 bytes) per client per round, DiReDi's accepted / rejected client-rounds, how many
    clients gained (gain > 0), the mean wall seconds of a federated round (None for local and
    oracle) and the largest epsilon a client spent (``dp_epsilon``, None without differential
    privacy); the tutor's validation mAP per round (round 0 first)."""
    table = method_table(records, specs, all_private)
    methods = {}
    for row in method_means(table):
        rows = [r for r in table if r["method"] == row["method"]]
        points = {key: 100 * row[key] for key in ("gain", "forgetting_kept", "forgetting_protected", "released",
                                                  "spread")}
        methods[row["method"]] = {
            **points, "up_mb": row["bytes_up"] / 1e6, "down_mb": row["bytes_down"] / 1e6,
            "accepted": sum(r["accepted_rounds"] for r in rows), "rejected": sum(r["rejected_rounds"] for r in rows),
            "clients_with_gain": sum(1 for r in rows if not is_missing(r["gain"]) and r["gain"] > 0),
            "round_s": _mean_round_seconds(records, row["method"]),
            "dp_epsilon": max_dp_epsilon(records, row["method"])}
    return {"rounds": rounds, "wall_s": wall_s, "methods": methods,
            "tutor_val_map": [100 * float(entry["mAP"]) for entry in sorted(tutor_history, key=lambda e: e["round"])]}
