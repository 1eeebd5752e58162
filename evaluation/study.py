"""A study: every method run once per replicate (seed); per round, per method, the mean over clients and
replicates of each metric with a 95% nested bootstrap interval, and paired verdicts DiReDi vs a baseline.

Pure numpy on top of ``evaluation.metrics`` (records and specs as its docstring defines them).

Intervals
---------
A replicate is one run of the whole federation (its own training seeds, data order and client
sampling; the data, shards and manufacturer chain are the same in every replicate).  The clients of one
replicate share a server - the same tutor, the same merged deltas, the same global model - so their
values are not independent draws: resampling the clients of all replicates as one pool would treat
8 x S correlated numbers as 8 x S independent ones and give intervals that are too narrow.  The
interval is therefore a *nested* (two-stage) bootstrap over an S x C table (replicates x clients):

1. draw S replicates with replacement;
2. within each drawn replicate, draw C clients with replacement;
3. the statistic is the NaN-skipping mean over the drawn cells (a NaN cell is a metric the client
   does not define, e.g. "released" for a client that dropped nothing);

repeated ``samples`` times; the interval is the percentile interval of the statistic, the point
estimate the NaN-skipping mean of the table itself.  Caveats:

* With few replicates the first stage sees only S values: a bootstrap of S units estimates their
  variance with the factor (S - 1) / S and the percentile interval undercovers at small S, so the
  interval understates the between-replicate spread a little (with S = 3, the variance by a third).
  Resampling the clients as well adds the within-replicate variance a second time (a two-stage
  bootstrap is slightly conservative on that part), which compensates partly, not reliably.
* With S = 1 the first stage degenerates: the interval is over clients only and says nothing about
  how another seed would come out.  With C = 1 (one client's values over replicates) the second
  stage degenerates: the interval is over replicates only.
* Resampling clients treats the C clients as draws from a population of clients like them; the
  scenario's clients are fixed (each holds its own classes), so the interval speaks of "a client
  like these", not of exactly these.
* A bootstrap sample whose drawn cells are all NaN has no statistic; it is left out (the interval is
  then conditional on the statistic existing).  A table without any finite value gives NaN.

Paired differences (``paired_difference``) are the same bootstrap on A - B cell by cell: the same
replicate and client under two methods share data and seeds, so pairing removes the spread between
clients' difficulty.  ``verdict`` reads a difference's interval: "yes" when all of it is on the
better side of 0, "no" when all of it is on the worse side, else "cannot tell".

Metrics per client after round r (``client_round_values``), AP-like ones in percentage points
---------------------------------------------------------------------------------------------
gain, forgetting_kept, forgetting_protected, released, spread (``evaluation.metrics.client_summary``
over the records up to round r); bwt_kept / bwt_protected (backward transfer: mean over the class set
of AP_now - AP_start, negative = forgotten; unlike Chaudhry's forgetting, whose max over earlier
evaluations grows with evaluation noise alone, noise averages out of it); worst_drop_protected (the
largest drop of the protected classes below their AP at the start, the manufacturer's edge, over every
round up to r: ``evaluation.metrics.worst_drop``); map (mAP of ap_after);
recall_new / f1_new (operating point at the deployment threshold over the client's private classes,
from the last record's ``after`` counts, in percent); recall_kept / f1_kept (the same over its kept
classes); recall_kept_drop (kept-class recall at the start, from the first record's ``before``, minus
now); mb_cum (cumulative bytes up + down / 10^6 up to round r); client_s_cum (cumulative client
compute seconds up to round r: CPU seconds where the records hold them, else wall seconds; phases named
"evaluate..." are evaluation, not compute; the server's per-client shares, phases named "server_...",
included); own_s_cum (the same without the server's shares: what the client's own machine spent).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from evaluation.metrics import (
    client_summary,
    evaluated,
    is_missing,
    mean_ap_change,
    mean_average_precision,
    method_sort_key,
    operating_point,
    sorted_by_round,
    spec_classes,
    specs_by_client,
    worst_drop,
)

NAN = float("nan")

# Metrics with an interval in every per-round entry, in table order.
INTERVAL_METRICS = ("gain", "gain_objects", "forgetting_kept", "forgetting_protected", "bwt_kept", "bwt_protected",
                    "worst_drop_protected", "released",
                    "spread", "map", "recall_new", "f1_new", "recall_kept", "f1_kept", "recall_kept_drop")
# Cumulative costs: a plain mean in the entry, the interval under "<metric>_ci95".
COST_METRICS = ("mb_cum", "client_s_cum", "own_s_cum")
ALL_METRICS = INTERVAL_METRICS + COST_METRICS

# Verdicts: DiReDi against each of these baselines present, at rounds 2, 10 and the last.
VERDICT_BASELINES = ("fedavg", "fedavg_ls", "fedavg_ft", "local")
VERDICT_ROUNDS = (2, 10)
# (claim with "B" for the baseline, metric, higher is better, skipped for these baselines)
CLAIMS = (
    ("DiReDi gains more than B", "gain", True, ()),
    ("DiReDi forgets less than B (kept classes)", "forgetting_kept", False, ()),
    ("DiReDi forgets less than B (protected)", "forgetting_protected", False, ()),
    ("DiReDi's protected class drops less below the manufacturer's edge than B's", "worst_drop_protected", False, ()),
    ("DiReDi detects more new-class objects at the threshold than B", "recall_new", True, ()),
    ("DiReDi costs fewer bytes than B", "mb_cum", False, ("local",)),  # local sends nothing
    ("DiReDi costs less client compute than B", "client_s_cum", False, ()),
)
# DiReDi's gain where it had spent what B spent by round r (``gain_at_compute``), minus B's gain at r:
# (claim, verdict metric, higher is better, the cost it is equal in)
EQUAL_COMPUTE_CLAIMS = (
    ("DiReDi gains more than B at equal client compute", "gain_at_equal_compute", True, "client_s_cum"),
    ("DiReDi gains more than B at equal compute on the client's own machine", "gain_at_equal_own_compute", True,
     "own_s_cum"),
)
SERVER_PHASE = "server_"  # a phase of the server's work, booked to each client as its share


# ----------------------------------------------------------------------------------------------
# Intervals
# ----------------------------------------------------------------------------------------------


def as_table(values: Any) -> np.ndarray:
    """An S x C float array (replicates x clients), None -> NaN; a 1-D input is S replicates of one
    value (one column), a scalar one cell."""
    table = np.array(values, dtype=float)
    if table.ndim < 2:
        table = table.reshape(-1, 1)
    if table.ndim != 2:
        raise ValueError(f"a replicates x clients table needs 2 dimensions, not {table.ndim}")
    return table


def nan_table_mean(table: np.ndarray) -> float:
    finite = np.isfinite(table)
    return float(table[finite].mean()) if finite.any() else NAN


def bootstrap_means(table: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """``samples`` nested bootstrap statistics of an S x C table (NaN where a sample drew only NaN)."""
    s, c = table.shape
    rng = np.random.default_rng(seed)
    finite = np.isfinite(table)
    filled = np.where(finite, table, 0.0)
    replicates = rng.integers(0, s, size=(samples, s))[:, :, None]  # stage 1: replicates
    clients = rng.integers(0, c, size=(samples, s, c))  # stage 2: clients within each drawn replicate
    sums = filled[replicates, clients].sum(axis=(1, 2))
    counts = finite[replicates, clients].sum(axis=(1, 2))
    means = np.full(samples, NAN)
    np.divide(sums, counts, out=means, where=counts > 0)
    return means


def nested_bootstrap_ci(values: Any, samples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of an S x C table (replicates x clients, NaN = not defined for that client) with its nested
    bootstrap percentile interval (see the module docstring: why nested, and the caveats).

    Returns ``{"mean", "ci95": [lo, hi], "n_seeds", "n_clients"}``: ``n_seeds`` the replicates and
    ``n_clients`` the clients (columns) with at least one finite value. Deterministic for a given
    ``seed``; S = 1 or C = 1 work (one stage degenerates); no finite value gives NaN everywhere."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), not {level}")
    if samples < 1:
        raise ValueError(f"samples must be positive, not {samples}")
    table = as_table(values)
    finite = np.isfinite(table)
    result = {"mean": nan_table_mean(table), "ci95": [NAN, NAN],
              "n_seeds": int(finite.any(axis=1).sum()), "n_clients": int(finite.any(axis=0).sum())}
    if table.size == 0 or not finite.any():
        return result
    means = bootstrap_means(table, samples, seed)
    means = means[np.isfinite(means)]
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    # the mean of identical values can come out one ulp off them: an end that close is the mean
    mean = result["mean"]
    result["ci95"] = [mean if np.isclose(v, mean, rtol=1e-12, atol=1e-12) else float(v) for v in (lo, hi)]
    return result


def paired_difference(a: Any, b: Any, samples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """`nested_bootstrap_ci` of A - B, cell by cell (paired by replicate and client; NaN where either is
    NaN). ``a`` and ``b`` are S x C tables with the same rows (replicates) and columns (clients)."""
    table_a, table_b = as_table(a), as_table(b)
    if table_a.shape != table_b.shape:
        raise ValueError(f"paired tables differ in shape: {table_a.shape} vs {table_b.shape}")
    return nested_bootstrap_ci(table_a - table_b, samples=samples, level=level, seed=seed)


def verdict(ci: Any, higher_is_better: bool) -> str:
    """For a claim "A better than B" read on the interval of A - B (a ``[lo, hi]`` pair or a dict with
    "ci95"): "yes" when the whole interval is on the better side of 0, "no" when the whole interval is
    on the worse side, else (0 inside, or no interval) "cannot tell"."""
    if isinstance(ci, Mapping):
        ci = ci.get("ci95")
    if ci is None or len(ci) != 2 or any(is_missing(v) for v in ci):
        return "cannot tell"
    lo, hi = float(ci[0]), float(ci[1])
    better_side = lo > 0 if higher_is_better else hi < 0
    worse_side = hi < 0 if higher_is_better else lo > 0
    return "yes" if better_side else "no" if worse_side else "cannot tell"


# ----------------------------------------------------------------------------------------------
# One replicate: per method, round and client
# ----------------------------------------------------------------------------------------------


def points(value: float) -> float:
    """[0, 1] -> percent / percentage points; NaN stays NaN."""
    return NAN if is_missing(value) else 100.0 * float(value)


def compute_seconds(record: Mapping, server_shares: bool = True) -> float:
    """The client's training compute of one record: every phase but evaluation ("evaluate..."), each in
    CPU seconds where the record measured them (``cpu_seconds``: the work, whatever else shared the
    machine), else in wall seconds (records made before CPU seconds were kept); ``server_shares=False``
    leaves out the server's work booked to the client ("server_..." phases)."""
    cpu = record.get("cpu_seconds") or {}
    total = 0.0
    for phase, wall in (record.get("seconds") or {}).items():
        seconds = cpu.get(phase, wall)
        if str(phase).startswith("evaluate") or (not server_shares and str(phase).startswith(SERVER_PHASE)):
            continue
        if not is_missing(seconds):
            total += float(seconds)
    return total


def record_megabytes(record: Mapping) -> float:
    """bytes_up + bytes_down of one record in MB (10^6 bytes); a missing count is 0."""
    return sum(0.0 if is_missing(record.get(key)) else float(record[key]) for key in ("bytes_up", "bytes_down")) / 1e6


def client_round_metrics(ordered: Sequence[Mapping], spec: Mapping, all_private: Any, mb_cum: float,
                         client_s_cum: float, own_s_cum: float) -> dict[str, float]:
    """The metrics of one client after the last of ``ordered`` (its records up to that round, round
    order); the cumulative costs are passed in."""
    summary = client_summary(ordered, spec, all_private)
    first, last = ordered[0], ordered[-1]
    ap_start, ap_now = first.get("ap_before") or {}, last.get("ap_after") or {}
    private, kept = spec_classes(spec, "private"), spec_classes(spec, "kept")
    new_now = operating_point(last.get("after"), private)
    kept_now = operating_point(last.get("after"), kept)
    kept_start = operating_point(first.get("before"), kept)
    values = {key: points(summary[key]) for key in ("gain", "gain_objects", "forgetting_kept", "forgetting_protected",
                                                    "released", "spread")}
    values.update(
        bwt_kept=points(mean_ap_change(ap_start, ap_now, kept)),
        bwt_protected=points(mean_ap_change(ap_start, ap_now, spec_classes(spec, "protected"))),
        worst_drop_protected=points(worst_drop(ap_start, [r.get("ap_after") or {} for r in ordered],
                                               spec_classes(spec, "protected"))),
        map=points(mean_average_precision(ap_now)),
        recall_new=points(new_now["recall"]), f1_new=points(new_now["f1"]),
        recall_kept=points(kept_now["recall"]), f1_kept=points(kept_now["f1"]),
        recall_kept_drop=points(kept_start["recall"] - kept_now["recall"]),
        mb_cum=mb_cum, client_s_cum=client_s_cum, own_s_cum=own_s_cum)
    return {key: values[key] for key in ALL_METRICS}


def client_round_values(records: Iterable[Mapping], specs: Any, all_private: Any) -> dict:
    """One replicate's records -> ``{method: {round: {client: {metric: value}}}}``, methods in report
    order, rounds ascending; the metrics after round r summarise the client's records up to round r
    (module docstring); a round without an evaluation (``eval_every``) has no entry, its costs count
    from the client's next evaluated round. A client without a spec gets an empty one (its class-set
    metrics are NaN)."""
    by_client = specs_by_client(specs or [])
    groups: dict[tuple[str, int], list[Mapping]] = {}
    for record in records:
        groups.setdefault((str(record["method"]), int(record["client"])), []).append(record)
    values: dict[str, dict[int, dict[int, dict]]] = {}
    for (method, client) in sorted(groups, key=lambda k: (method_sort_key(k[0]), k[1])):
        ordered = sorted_by_round(groups[(method, client)])
        spec = by_client.get(client, {"client": client})
        mb_cum = seconds_cum = own_cum = 0.0
        for index, record in enumerate(ordered):
            mb_cum += record_megabytes(record)
            seconds_cum += compute_seconds(record)
            own_cum += compute_seconds(record, server_shares=False)
            if not evaluated(record):  # a round between evaluations: its costs count from the next one on
                continue
            metrics = client_round_metrics(ordered[: index + 1], spec, all_private, mb_cum, seconds_cum, own_cum)
            values.setdefault(method, {}).setdefault(int(record["round"]), {})[client] = metrics
    return {method: dict(sorted(rounds.items())) for method, rounds in values.items()}


def carried_states(per_round: Mapping[int, Mapping[int, Mapping]]) -> dict[int, dict[int, Mapping]]:
    """Per round present, every client's values as they stand after it: a client without a record in
    that round (not sampled) keeps its values of its latest earlier round."""
    states: dict[int, dict[int, Mapping]] = {}
    state: dict[int, Mapping] = {}
    for round_number in sorted(per_round):
        state = {**state, **per_round[round_number]}
        states[round_number] = state
    return states


def gain_at_compute(computes: Sequence[float], gains: Sequence[float], spend: float) -> float:
    """A client's gain at cumulative client compute ``spend``, linear between its evaluated rounds'
    (cumulative compute, gain) points and from (0, 0) (nothing spent, nothing gained) to the first;
    NaN past its last round's compute (it never spent that much) or where a point is missing."""
    points_ = [(0.0, 0.0)] + list(zip(map(float, computes), map(float, gains)))
    if is_missing(spend) or any(is_missing(c) or is_missing(g) for c, g in points_):
        return NAN
    for (c0, g0), (c1, g1) in zip(points_, points_[1:]):
        if c0 <= spend <= c1:
            return g1 if c1 == c0 else g0 + (g1 - g0) * (spend - c0) / (c1 - c0)
    return NAN


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------


def _unpack(replicate: Sequence) -> tuple[Any, list, Any, list, Any]:
    """(id, records, specs, tutor_history[, all_private]); all_private defaults to the specs' private."""
    if len(replicate) not in (4, 5):
        raise ValueError("a replicate is (id, records, specs, tutor_history[, all_private])")
    replicate_id, records, specs, tutor = replicate[:4]
    specs = specs or []
    spec_list = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
    all_private = replicate[4] if len(replicate) == 5 else [list(s.get("private") or []) for s in spec_list]
    return replicate_id, list(records), specs, list(tutor or []), all_private


def interval_entry(ci: Mapping) -> dict:
    return {"mean": ci["mean"], "ci95": list(ci["ci95"]), "n_seeds": ci["n_seeds"], "n_clients": ci["n_clients"]}


def summarise_study(replicates: Sequence[Sequence], samples: int = 2000, seed: int = 0) -> dict:
    """A study's summary (``compare.json``) from ``[(replicate id, records, specs, tutor_history), ...]``
    (an optional fifth element overrides all_private, by default every spec's private classes).

    Per method (report order) and round 1..R (R the largest round of any record): ``per_round`` with
    every metric of `INTERVAL_METRICS` as ``{"mean", "ci95", "n_seeds", "n_clients"}`` (nested bootstrap
    over replicates x clients), every cost of `COST_METRICS` as a plain mean (intervals under
    ``<cost>_ci95``) and ``replicates`` (how many replicates reached the round;
    a method or replicate missing rounds is summarised on what exists); ``replicates_per_round``;
    ``last_round_clients``: per client its values at the method's last round with intervals over
    replicates only. ``tutor``: per round the tutor's per-class validation AP and mAP (percent) over
    replicates. ``verdicts``: DiReDi vs each baseline of `VERDICT_BASELINES` present, at rounds 2, 10
    and R (where both have them), paired differences with intervals and verdicts (`CLAIMS`; each with
    ``replicates_paired``, the replicates that hold both), and the
    gain at equal compute, with and without the server's shares (`EQUAL_COMPUTE_CLAIMS`, ``equal_compute_verdicts``)."""
    unpacked = [_unpack(r) for r in replicates]
    states: list[dict[str, dict[int, dict[int, Mapping]]]] = []  # per replicate: method -> round -> client -> values
    for _, records, specs, _, all_private in unpacked:
        per_method = client_round_values(records, specs, all_private)
        states.append({method: carried_states(rounds) for method, rounds in per_method.items()})
    methods = sorted({m for state in states for m in state}, key=method_sort_key)
    clients = sorted({c for state in states for rounds in state.values() for values in rounds.values()
                      for c in values}
                     | {int(s["client"]) for _, _, specs, _, _ in unpacked
                        for s in (specs.values() if isinstance(specs, Mapping) else specs)})
    last_round = max((r for state in states for rounds in state.values() for r in rounds), default=0)

    def rows(method: str, round_number: int) -> list[int]:
        return [i for i, state in enumerate(states) if round_number in state.get(method, {})]

    def table(method: str, round_number: int, metric: str, replicate_rows: Sequence[int]) -> np.ndarray:
        out = np.full((len(replicate_rows), len(clients)), NAN)
        for i, rep in enumerate(replicate_rows):
            state = states[rep][method][round_number]
            for j, client in enumerate(clients):
                if client in state:
                    out[i, j] = state[client][metric]
        return out

    def ci(values: np.ndarray) -> dict:
        return interval_entry(nested_bootstrap_ci(values, samples=samples, seed=seed))

    summary_methods: dict[str, dict] = {}
    for method in methods:
        per_round = []
        for round_number in range(1, last_round + 1):
            present = rows(method, round_number)
            if not present:
                continue
            entry: dict[str, Any] = {"round": round_number, "replicates": len(present)}
            for metric in INTERVAL_METRICS:
                entry[metric] = ci(table(method, round_number, metric, present))
            for metric in COST_METRICS:
                cost = ci(table(method, round_number, metric, present))
                entry[metric], entry[f"{metric}_ci95"] = cost["mean"], cost["ci95"]
            per_round.append(entry)
        method_last = per_round[-1]["round"] if per_round else 0
        last_clients = []
        if per_round:
            present = rows(method, method_last)
            for j, client in enumerate(clients):
                row: dict[str, Any] = {"client": client}
                for metric in ALL_METRICS:
                    row[metric] = ci(table(method, method_last, metric, present)[:, j:j + 1])
                last_clients.append(row)
        summary_methods[method] = {
            "per_round": per_round, "last_round": method_last,
            "replicates_per_round": {str(e["round"]): e["replicates"] for e in per_round},
            "last_round_clients": last_clients}

    return {"rounds": last_round, "seeds": [u[0] for u in unpacked], "clients": len(clients),
            "client_ids": clients, "samples": samples, "level": 0.95,
            "methods": summary_methods, "tutor": tutor_summary([u[3] for u in unpacked], samples, seed),
            "verdicts": study_verdicts(methods, last_round, rows, table, samples, seed)
            + equal_compute_verdicts(states, methods, clients, last_round, samples, seed)}


def tutor_summary(histories: Sequence[Sequence[Mapping]], samples: int = 2000, seed: int = 0) -> list[dict]:
    """Per round (ascending, round 0 = the original tutor), the tutor's per-class validation AP and its
    mAP in percent, mean and interval over the replicates that have the round; [] without tutor data."""
    by_round: dict[int, list[Mapping]] = {}
    for history in histories:
        for entry in history or []:
            by_round.setdefault(int(entry["round"]), []).append(entry)
    out = []
    for round_number in sorted(by_round):
        entries = by_round[round_number]
        classes: list[str] = []
        for entry in entries:
            classes += [name for name in entry.get("ap") or {} if name not in classes]
        ap = {name: interval_entry(nested_bootstrap_ci([points((e.get("ap") or {}).get(name)) for e in entries],
                                                       samples=samples, seed=seed)) for name in classes}
        mean_ap = interval_entry(nested_bootstrap_ci([points(e.get("mAP")) for e in entries], samples=samples,
                                                     seed=seed))
        out.append({"round": round_number, "replicates": len(entries), "ap": ap, "mAP": mean_ap})
    return out


def verdict_rounds(last_round: int) -> list[int]:
    """2, 10 and the last round, deduplicated, ascending."""
    return sorted({r for r in (*VERDICT_ROUNDS, last_round) if r >= 1})


def study_verdicts(methods: Sequence[str], last_round: int, rows, table, samples: int, seed: int) -> list[dict]:
    """DiReDi - B for every claim, baseline and verdict round both methods reached (paired on the
    replicates both have)."""
    if "diredi" not in methods:
        return []
    out = []
    for baseline in (b for b in VERDICT_BASELINES if b in methods):
        for round_number in verdict_rounds(last_round):
            both = sorted(set(rows("diredi", round_number)) & set(rows(baseline, round_number)))
            if not both:
                continue
            for claim, metric, higher_is_better, skipped in CLAIMS:
                if baseline in skipped:
                    continue
                difference = paired_difference(table("diredi", round_number, metric, both),
                                               table(baseline, round_number, metric, both), samples=samples, seed=seed)
                out.append({"claim": claim.replace("than B", f"than {baseline}"), "metric": metric, "baseline": baseline,
                            "round": round_number, "diff": difference["mean"], "ci95": difference["ci95"],
                            "verdict": verdict(difference, higher_is_better), "higher_is_better": higher_is_better,
                            "n_seeds": difference["n_seeds"], "n_clients": difference["n_clients"],
                            "replicates_paired": len(both)})
    return out


def equal_compute_verdicts(states: Sequence[Mapping], methods: Sequence[str], clients: Sequence[int],
                           last_round: int, samples: int, seed: int) -> list[dict]:
    """DiReDi against each baseline of `VERDICT_BASELINES` at the baseline's compute, once per cost of
    `EQUAL_COMPUTE_CLAIMS` (with the server's shares, and the client's own): per replicate and client,
    DiReDi's gain at the cumulative compute the baseline had spent by its round r (``gain_at_compute``
    along DiReDi's rounds) minus the baseline's gain at r; NaN where DiReDi never spent that much. Rounds
    2, 10 and R of the baseline; paired on the replicates both have."""
    if "diredi" not in methods:
        return []
    out = []
    for claim, metric, higher_is_better, cost in EQUAL_COMPUTE_CLAIMS:
        for baseline in (b for b in VERDICT_BASELINES if b in methods):
            for round_number in verdict_rounds(last_round):
                both = [state for state in states if round_number in state.get(baseline, {}) and state.get("diredi")]
                if not both:
                    continue
                ours, theirs = np.full((len(both), len(clients)), NAN), np.full((len(both), len(clients)), NAN)
                for i, state in enumerate(both):
                    spent = state[baseline][round_number]
                    for j, client in enumerate(clients):
                        curve = [state["diredi"][r][client] for r in sorted(state["diredi"])
                                 if client in state["diredi"][r]]
                        if client not in spent or not curve:
                            continue
                        theirs[i, j] = spent[client]["gain"]
                        ours[i, j] = gain_at_compute([v[cost] for v in curve], [v["gain"] for v in curve],
                                                     spent[client][cost])
                difference = paired_difference(ours, theirs, samples=samples, seed=seed)
                out.append({"claim": claim.replace("than B", f"than {baseline}"), "metric": metric,
                            "baseline": baseline, "round": round_number, "diff": difference["mean"],
                            "ci95": difference["ci95"], "verdict": verdict(difference, higher_is_better),
                            "higher_is_better": higher_is_better, "n_seeds": difference["n_seeds"],
                            "n_clients": difference["n_clients"], "replicates_paired": len(both)})
    return out
