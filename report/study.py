"""A study's report: ``compare.json``, ``compare.md`` and its plots, from the run folders of its replicates.

    python -m report.study runs/study-r0 runs/study-r1 runs/study-r2 --out runs/study
    python -m report.study runs/study-r0 runs/study-r1 --replace runs/diredi-r0 runs/diredi-r1 --out runs/study2

``--replace``: run folders of one or more methods run apart (a method's setting changed after the
study ran): each replaces those methods' records in the study's folder of the same replicate, on the
same clients. ``compare.json``'s ``assembled`` and ``compare.md`` say which folder gave which method
and every run setting in which the two folders differ.

Every number comes from ``evaluation.study.summarise_study`` (means over clients and replicates with
95% nested bootstrap intervals, paired verdicts DiReDi vs baselines). Plots, one question each:

    curves_round.png        gain / forgetting (kept) / spread per round, one line and band per method
    curves_mb.png           the same against the cumulative traffic per client (MB up + down)
    curves_compute.png      the same against the cumulative client compute (s, evaluation excluded)
    clients_last_round.png  per client, gain at the last round per method, with error bars
    tutor_progress.png      DiReDi's tutor per-class validation AP per round (when a run has tutor.json)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.metrics import is_missing, method_sort_key  # noqa: E402
from evaluation.study import summarise_study, verdict_rounds  # noqa: E402
from report.writer import (  # noqa: E402
    MISSING_CELL,
    TUTOR_HISTORY,
    RunFolder,
    markdown_table,
    method_colour,
    save_figure,
    to_jsonable,
)

# x axis of `plot_curves`: (per-round key, label)
CURVE_X = {
    "round": (None, "round"),
    "mb": ("mb_cum", "cumulative traffic per client, up + down (MB)"),
    "compute": ("client_s_cum", "cumulative client compute per client (s, evaluation excluded, the server's shares included)"),
}
CURVE_PANELS = (
    ("gain", "Knowledge gain on private (new) classes (higher is better)"),
    ("forgetting_kept", "Unintended forgetting of kept classes (lower is better)"),
    ("spread", "Knowledge spread to other clients' classes (higher is better)"),
)
# compare.md's per-method table: (key, label, format)
TABLE_ROWS = (
    ("gain", "gain (pp)", "points"),
    ("gain_objects", "gain, each client's classes weighted by their test objects (pp)", "points"),
    ("forgetting_kept", "forgetting, kept (pp)", "plain"),
    ("forgetting_protected", "forgetting, protected (pp)", "plain"),
    ("bwt_kept", "backward transfer, kept (pp)", "points"),
    ("bwt_protected", "backward transfer, protected (pp)", "points"),
    ("worst_drop_protected", "protected: worst drop below the manufacturer's edge so far (pp)", "plain"),
    ("released", "released (pp)", "points"),
    ("spread", "spread (pp)", "points"),
    ("map", "mAP (%)", "plain"),
    ("recall_new", "recall, new classes @0.5 (%)", "plain"),
    ("f1_new", "F1, new classes @0.5 (%)", "plain"),
    ("mb_cum", "traffic per client, cumulative (MB)", "mb"),
    ("client_s_cum", "client compute, cumulative (s)", "seconds"),
    ("own_s_cum", "client compute without the server's shares, cumulative (s)", "seconds"),
)
# compare.md's table at a glance: one row per method at the last round (key, column, format)
GLANCE_COLUMNS = (
    ("gain", "gain (pp)", "points"),
    ("forgetting_kept", "forgetting, kept (pp)", "plain"),
    ("forgetting_protected", "forgetting, protected (pp)", "plain"),
    ("worst_drop_protected", "protected: worst drop below the manufacturer's edge (pp)", "plain"),
    ("spread", "spread (pp)", "points"),
    ("released", "released (pp)", "points"),
    ("recall_new", "recall, new @0.5 (%)", "plain"),
    ("mb_cum", "MB per client", "mb"),
)
UNITS = {"mb_cum": "mb", "client_s_cum": "seconds", "own_s_cum": "seconds", "forgetting_kept": "points", "forgetting_protected": "points",
         "worst_drop_protected": "points",
         "recall_new": "points"}


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_replicate(path: str | os.PathLike, finished_only: bool = False) -> tuple[int, list[dict], list[dict], list[dict]]:
    """(replicate id, records, client specs, tutor history) of one run folder; the replicate id is
    config.json's run -> replicate (0 when absent). ``finished_only``: the records of the methods the
    folder's done.json lists (a replicate still running, or cut, has a method part-way)."""
    path = Path(path)
    if not (path / RunFolder.ROUNDS).exists():
        raise FileNotFoundError(f"{path} holds no run (no {RunFolder.ROUNDS})")
    folder = RunFolder(path)
    config = folder.read_config() if folder.config_path.exists() else {}
    replicate = int((config.get("run") or {}).get("replicate", 0) or 0)
    records = folder.read_records()
    if finished_only:
        done = set(folder.read_done())
        records = [r for r in records if r["method"] in done]
    return replicate, records, list(config.get("client_specs") or []), \
        list(folder.read_json(TUTOR_HISTORY, []) or [])


def run_settings(path: str | os.PathLike) -> dict:
    """A run folder's settings (config.json's "run", older folders completed as they ran)."""
    from protocol.config import RunConfig

    folder = RunFolder(Path(path))
    return RunConfig.completed(folder.read_config().get("run") or {}) if folder.config_path.exists() else {}


def replace_methods(study: tuple, rerun: tuple) -> tuple[tuple, list[str]]:
    """A replicate's (id, records, specs, tutor history) with the methods of ``rerun`` (the same
    replicate's run of those methods alone) in place of the study's records of them; the tutor's
    history goes with DiReDi. Returns (the replicate, the methods replaced)."""
    (rep, records, specs, tutor), (rerun_rep, rerun_records, rerun_specs, rerun_tutor) = study, rerun
    if rep != rerun_rep:
        raise ValueError(f"replicate {rerun_rep} cannot replace methods of replicate {rep}")
    if specs != rerun_specs:
        raise ValueError(f"replicate {rep}: the replacing run has other clients or classes than the study's")
    methods = sorted({r["method"] for r in rerun_records}, key=method_sort_key)
    kept = [r for r in records if r["method"] not in methods]
    return (rep, kept + list(rerun_records), specs, rerun_tutor if "diredi" in methods else tutor), methods


def summarise_run_folders(paths: Sequence[str | os.PathLike], samples: int = 2000, seed: int = 0,
                          replace: Sequence[str | os.PathLike] = (), finished_only: bool = False) -> dict:
    """`evaluation.study.summarise_study` over run folders, one replicate each (``runs`` lists them);
    each folder of ``replace`` replaces its methods in the folder of its replicate (``assembled``);
    ``finished_only``: only the methods each folder's done.json lists."""
    replicates = [read_replicate(p, finished_only) for p in paths]
    diredi_source = [Path(p) for p in paths]  # per replicate, the folder its DiReDi records (and decisions) come from
    assembled = []
    for path in replace:
        rerun = read_replicate(path)
        target = next((i for i, r in enumerate(replicates) if r[0] == rerun[0]), None)
        if target is None:
            raise ValueError(f"{path}: the study has no run of replicate {rerun[0]}")
        replicates[target], methods = replace_methods(replicates[target], rerun)
        if "diredi" in methods:
            diredi_source[target] = Path(path)
        study, rerun_settings = run_settings(paths[target]), run_settings(path)
        differ = {k: [study.get(k), rerun_settings.get(k)] for k in sorted(set(study) | set(rerun_settings))
                  if study.get(k) != rerun_settings.get(k) and k not in ("methods", "rounds")}  # a part may stop early
        assembled.append({"replicate": rerun[0], "methods": methods, "study_run": Path(paths[target]).name,
                          "replacing_run": Path(path).name, "settings_study_vs_replacing": differ})
    summary = summarise_study(replicates, samples=samples, seed=seed)
    summary["runs"] = [Path(p).name for p in paths]
    decisions = [(rep[0], folder, RunFolder(folder).read_verification() if RunFolder(folder).verification_path.is_file()
                  else []) for rep, folder in zip(replicates, diredi_source)]
    verification = [{"replicate": k, "run": folder.name, **rejection_counts(made)} for k, folder, made in decisions if made]
    if verification:
        summary["verification"] = verification
    if assembled:
        summary["assembled"] = assembled
    chains = run_chains(paths)
    if len({tuple(chain.get(k) for k in CHAIN_ROLES) for chain in chains.values()}) > 1:
        summary["chains"] = chains
    return summary


def rejection_counts(decisions: Sequence[Mapping]) -> dict:
    """One run's verification decisions counted: deltas judged, rejected, by gate (``rejected_by``;
    "unrecorded" for a decision older than it), where (round, client, reason), and how many the round's merge
    admitted after the protected gate rejected them whole (``appeal``). Every client of a ``sim.run`` is
    honest, so each rejection in a run folder is a false one."""
    rejected = [d for d in decisions if not d["accepted"]]
    return {"deltas": len(decisions), "rejected": len(rejected),
            "admitted_in_merge": sum(1 for d in decisions if (d.get("appeal") or {}).get("accepted")),
            "by_gate": dict(Counter(g for d in rejected for g in (d.get("rejected_by") or ["unrecorded"]))),
            "where": [{"round": d["round"], "client": d["client"], "reason": d["reason"][:160]} for d in rejected]}


def rejections_markdown(verification: Sequence[Mapping]) -> list[str]:
    """compare.md's lines on DiReDi's honest deltas turned away, in total and per replicate."""
    deltas, rejected = sum(v["deltas"] for v in verification), sum(v["rejected"] for v in verification)
    gates = Counter()
    for v in verification:
        gates.update(v["by_gate"])
    lines = [f"Every client of a study is honest, so each delta DiReDi's verification rejected is a false rejection: "
             f"**{rejected} of {deltas}** over {len(verification)} replicates"
             f"{' (' + ', '.join(f'{g} {n}' for g, n in sorted(gates.items())) + ')' if gates else ''}; "
             f"{sum(v['admitted_in_merge'] for v in verification)} admitted inside the round's merge after the "
             f"protected gate rejected them whole.", ""]
    rows = [[str(v["replicate"]), f"`{v['run']}`", str(v["deltas"]), str(v["rejected"]),
             "; ".join(f"round {w['round']} client {w['client']}: {w['reason']}" for w in v["where"]) or MISSING_CELL,
             str(v["admitted_in_merge"])] for v in verification]
    return lines + markdown_table(["replicate", "DiReDi's run", "deltas", "rejected", "where (why)",
                                   "admitted inside the merge"], rows) + [""]


CHAIN_ROLES = ("teacher", "tutor", "edge")


def run_chains(paths: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """{run folder name: its manufacturer chain's fingerprints and the CPU that built it}: the folder's own
    chain.json (a replicate of ``experiments.compare --chain-per-replicate``), else its study's
    (``<study>/runs/<run>``); folders with neither are left out."""
    chains = {}
    for folder in map(Path, paths):
        path = next((p for p in (folder / "chain.json", folder.parent.parent / "chain.json") if p.is_file()), None)
        if path is not None:
            record = json.loads(path.read_text())
            chains[folder.name] = {k: record[k] for k in (*CHAIN_ROLES, "cpu") if k in record}
    return chains


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _value(x: Any) -> float:
    return np.nan if is_missing(x) else float(x)


def _interval(entry: Any) -> tuple[float, float, float]:
    """(mean, lo, hi) of an interval entry; NaN where missing."""
    if not isinstance(entry, Mapping):
        return np.nan, np.nan, np.nan
    ci = entry.get("ci95") or [None, None]
    return _value(entry.get("mean")), _value(ci[0]), _value(ci[1])


def replicates_note(summary: Mapping) -> str:
    seeds = len(summary.get("seeds") or [])
    if seeds <= 1:
        return "one replicate: bands are 95% bootstrap intervals over clients only"
    return f"{seeds} replicates: bands are 95% nested bootstrap intervals (replicates, then clients)"


def plot_curves(summary: Mapping, x: str, path: str | os.PathLike) -> Path:
    """Gain, forgetting (kept) and spread, mean over clients and replicates with its 95% band, one line
    per method, against the round (``x="round"``), the cumulative MB per client (``"mb"``) or the
    cumulative client compute seconds (``"compute"``)."""
    if x not in CURVE_X:
        raise ValueError(f"x must be one of {sorted(CURVE_X)}, not {x!r}")
    x_key, x_label = CURVE_X[x]
    methods = sorted(summary.get("methods") or {}, key=method_sort_key)
    figure, axes = plt.subplots(len(CURVE_PANELS), 1, figsize=(7.5, 9.5), sharex=True)
    for method in methods:
        entries = summary["methods"][method].get("per_round") or []
        xs = np.array([e["round"] if x_key is None else _value(e.get(x_key)) for e in entries], dtype=float)
        colour = method_colour(method, methods)
        label = f"{method} (no traffic: at 0)" if x == "mb" and len(xs) and np.all(xs == 0) else method
        for axis, (key, _) in zip(axes, CURVE_PANELS):
            mean, lo, hi = (np.array(v, dtype=float) for v in zip(*[_interval(e.get(key)) for e in entries])) \
                if entries else (np.array([]),) * 3
            axis.plot(xs, mean, marker="o", markersize=3.5, linewidth=1.6, color=colour, label=label)
            axis.fill_between(xs, lo, hi, color=colour, alpha=0.15, linewidth=0)
    rounds = sorted({e["round"] for m in methods for e in summary["methods"][m].get("per_round") or []})
    for axis, (_, title) in zip(axes, CURVE_PANELS):
        axis.set_title(title, fontsize=10.5)
        axis.set_ylabel("percentage points")
        axis.axhline(0.0, color="black", linewidth=0.8, zorder=0)
        axis.grid(alpha=0.3)
    if x_key is None and rounds and len(rounds) <= 20:
        axes[-1].set_xticks(rounds)
    axes[-1].set_xlabel(x_label)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5) or 1, frameon=False,
                  bbox_to_anchor=(0.5, -0.005))
    figure.suptitle(f"Mean over clients ({replicates_note(summary)})", fontsize=9.5)
    figure.tight_layout(rect=(0, 0.035 * (1 + (len(labels) - 1) // 5), 1, 1))
    return save_figure(figure, path)


def plot_tutor(summary: Mapping, path: str | os.PathLike) -> Path | None:
    """DiReDi's tutor on the manufacturer's validation set: per-class AP and mAP per round (round 0 =
    the original tutor) with 95% bands over replicates; None (nothing written) without tutor data."""
    tutor = sorted(summary.get("tutor") or [], key=lambda e: e["round"])
    if not tutor:
        return None
    rounds = np.array([e["round"] for e in tutor], dtype=float)
    classes: list[str] = []
    for entry in tutor:
        classes += [name for name in entry.get("ap") or {} if name not in classes]
    colours = matplotlib.colormaps["tab20"]
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for index, name in enumerate(classes):
        mean, lo, hi = (np.array(v) for v in zip(*[_interval((e.get("ap") or {}).get(name)) for e in tutor]))
        colour = colours(index % 20)
        axis.plot(rounds, mean, marker="o", markersize=3, linewidth=1.1, color=colour, label=name)
        axis.fill_between(rounds, lo, hi, color=colour, alpha=0.12, linewidth=0)
    mean, lo, hi = (np.array(v) for v in zip(*[_interval(e.get("mAP")) for e in tutor]))
    axis.plot(rounds, mean, color="black", linewidth=2.5, marker="s", label="mAP")
    axis.fill_between(rounds, lo, hi, color="black", alpha=0.15, linewidth=0)
    axis.set_title("Tutor on the manufacturer's validation set, per round (round 0 = original)", fontsize=10.5)
    axis.set_xlabel("round")
    axis.set_ylabel("AP (%)")
    if len(rounds) <= 21:
        axis.set_xticks(rounds)
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7.5,
                ncol=2 if len(classes) > 14 else 1)
    seeds = len(summary.get("seeds") or [])
    figure.text(0.01, 0.0, f"bands: 95% bootstrap over {seeds} replicate(s)" if seeds > 1 else "one replicate: no band",
                fontsize=8, color="dimgrey")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_last_round_clients(summary: Mapping, path: str | os.PathLike, key: str = "gain") -> Path:
    """Per client, one bar per method: the metric (default knowledge gain) at the method's last round,
    mean over replicates with its 95% interval as an error bar ("n/a" where undefined)."""
    methods = sorted(summary.get("methods") or {}, key=method_sort_key)
    clients = sorted({row["client"] for m in methods for row in summary["methods"][m].get("last_round_clients") or []})
    width = 0.8 / max(len(methods), 1)
    figure, axis = plt.subplots(figsize=(max(7.5, 1.2 + 0.95 * len(clients)), 4.6))
    for index, method in enumerate(methods):
        rows = {row["client"]: row for row in summary["methods"][method].get("last_round_clients") or []}
        offsets = np.arange(len(clients)) + (index - (len(methods) - 1) / 2) * width
        mean, lo, hi = (np.array(v, dtype=float) for v in zip(*[_interval(rows.get(c, {}).get(key)) for c in clients])) \
            if clients else (np.array([]),) * 3
        heights = np.nan_to_num(mean, nan=0.0)
        below, above = np.nan_to_num(mean - lo, nan=0.0), np.nan_to_num(hi - mean, nan=0.0)
        axis.bar(offsets, heights, width=width, color=method_colour(method, methods), label=method,
                 yerr=np.clip([below, above], 0, None), error_kw={"elinewidth": 0.9, "capsize": 1.5, "ecolor": "black"})
        for x, value in zip(offsets, mean):
            if np.isnan(value):
                axis.text(x, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color="grey")
    axis.axhline(0.0, color="black", linewidth=0.8, zorder=0)
    axis.set_xticks(np.arange(len(clients)), [f"client {c}" for c in clients])
    axis.set_ylabel("AP change (percentage points)")
    last = summary.get("rounds")
    seeds = len(summary.get("seeds") or [])
    bars = f"error bars: 95% interval over {seeds} replicates" if seeds > 1 else "one replicate: no error bars"
    what = "Knowledge gain" if key == "gain" else key
    axis.set_title(f"{what} per client after round {last} ({bars})", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    return save_figure(figure, path)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def format_number(value: Any, kind: str) -> str:
    """One number: "points" signed with one decimal, "plain" one decimal, "mb" two, "seconds" one."""
    if is_missing(value):
        return MISSING_CELL
    value = float(value)
    if kind == "points":
        rounded = round(value, 1) + 0.0
        return "0.0" if rounded == 0 else f"{rounded:+.1f}"
    if kind == "mb":
        return f"{value:.2f}"
    return f"{round(value, 1) + 0.0:.1f}"


def format_ci(ci: Any, kind: str) -> str:
    """ "[lo, hi]"; a dash when the interval is missing."""
    if ci is None or len(ci) != 2 or any(is_missing(v) for v in ci):
        return MISSING_CELL
    return f"[{format_number(ci[0], kind)}, {format_number(ci[1], kind)}]"


def format_interval(mean: Any, ci: Any, kind: str) -> str:
    """ "mean [lo, hi]"; just the mean when the interval is missing."""
    text, interval = format_number(mean, kind), format_ci(ci, kind)
    return text if interval == MISSING_CELL or text == MISSING_CELL else f"{text} {interval}"


def entry_cell(entry: Mapping, key: str, kind: str) -> str:
    value = entry.get(key)
    if isinstance(value, Mapping):
        return format_interval(value.get("mean"), value.get("ci95"), kind)
    return format_interval(value, entry.get(f"{key}_ci95"), kind)


def verdict_grid(summary: Mapping) -> list[str]:
    """The verdicts as one row per claim and baseline, the verdict rounds as columns (the README's
    table): "diff [lo, hi] verdict" per cell; a baseline that fewer replicates than the study's hold
    says how many its row pairs."""
    verdicts = summary.get("verdicts") or []
    rounds = sorted({v["round"] for v in verdicts})
    cells: dict[tuple[str, str], dict[int, str]] = {}
    paired: dict[tuple[str, str], int] = {}  # the fewest replicates a row's verdicts pair
    unit = {"mb": " (MB)", "seconds": " (s)"}

    def signed(value: Any, kind: str) -> str:  # a difference: always signed
        text = format_number(value, kind)
        return text if text.startswith(("+", "-")) or text in ("0.0", MISSING_CELL) else f"+{text}"

    for v in verdicts:
        kind = UNITS.get(v["metric"], "points")
        claim = v["claim"].replace("DiReDi ", "", 1).replace(f" than {v['baseline']}", " than B", 1) + unit.get(kind, "")
        verdict = f"**{v['verdict']}**" if v["verdict"] != "cannot tell" else v["verdict"]
        ci = v.get("ci95")
        interval = f"[{signed(ci[0], kind)}, {signed(ci[1], kind)}]" if ci and len(ci) == 2 else MISSING_CELL
        text = f"{signed(v['diff'], kind)} {interval} {verdict}"
        cells.setdefault((claim, v["baseline"]), {})[v["round"]] = text
        if "replicates_paired" in v:  # a replicate that does not hold B (or DiReDi) leaves its pairs out
            key, n = (claim, v["baseline"]), v["replicates_paired"]
            paired[key] = min(paired.get(key, n), n)
    replicates = len(summary.get("seeds") or [])

    def label(claim: str, baseline: str) -> str:
        n = paired.get((claim, baseline), replicates)
        return f"{baseline} ({n} of {replicates} replicates)" if n < replicates else baseline

    rows = [[claim, label(claim, baseline)] + [by_round.get(r, MISSING_CELL) for r in rounds]
            for (claim, baseline), by_round in cells.items()]
    return markdown_table(["claim (B = baseline)", "B"] + [f"round {r}" for r in rounds], rows)


def glance_table(summary: Mapping) -> list[str]:
    """Every method at the study's last round, one row each: mean [95% interval] of the figures a reader
    compares first, and on how many replicates the row stands."""
    last = int(summary.get("rounds") or 0)
    rows = []
    for method in sorted(summary.get("methods") or {}, key=method_sort_key):
        entries = {e["round"]: e for e in summary["methods"][method].get("per_round") or []}
        if last not in entries:
            continue
        entry = entries[last]
        rows.append([method, str(entry.get("replicates", MISSING_CELL))]
                    + [format_number(entry.get(key), kind) if kind == "mb" else entry_cell(entry, key, kind)
                       for key, _, kind in GLANCE_COLUMNS])  # MB: the same for every client, no interval
    return markdown_table(["method", "replicates"] + [label for _, label, _ in GLANCE_COLUMNS], rows)


def study_markdown(summary: Mapping, command: str | None = None, wall_s: float | None = None) -> str:
    """compare.md: every method at the last round at a glance, the verdict table, then per method a table of mean [95% interval] of each
    metric at rounds 2, 10 and R; the command and the wall time when given."""
    seeds = summary.get("seeds") or []
    lines = ["# Study: methods compared over replicates", ""]
    lines += [f"Rounds: {summary.get('rounds')}; replicates (seeds): {', '.join(map(str, seeds)) or MISSING_CELL}; "
              f"clients: {summary.get('clients')}.", ""]
    lines += ["Means over clients and replicates; [lo, hi] is a 95% nested bootstrap interval (replicates, then "
              "clients within each; `evaluation/study.py`). With few replicates it understates the spread between "
              "replicates a little; with one replicate it is over clients only. pp = percentage points of AP; "
              "recall / F1 at the deployment score threshold 0.5, in percent; traffic and compute cumulative per "
              "client (compute without evaluation).", ""]
    for part in summary.get("assembled") or []:
        settings = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in part["settings_study_vs_replacing"].items())
        lines += [f"Replicate {part['replicate']}: {', '.join(part['methods'])} from `{part['replacing_run']}`, the "
                  f"other methods from `{part['study_run']}` (settings that differ: {settings or 'none'}).", ""]
    if summary.get("chains"):
        lines += ["The replicates ran on different manufacturer chains (the same seed builds another chain on "
                  "another CPU make); every method of a replicate ran on its chain, and the verdicts pair within "
                  "a replicate:", ""]
        lines += markdown_table(["run", "teacher", "tutor", "edge", "built on"],
                                [[name, *(chain.get(k, MISSING_CELL)[:8] for k in ("teacher", "tutor", "edge")),
                                  chain.get("cpu", MISSING_CELL)] for name, chain in summary["chains"].items()])
        lines += [""]
    glance = glance_table(summary)
    if len(glance) > 2:
        lines += [f"## At a glance: round {summary.get('rounds')}", ""] + glance + [""]
    if summary.get("verification"):
        lines += ["## Verification: honest deltas rejected", ""] + rejections_markdown(summary["verification"])
    verdicts = summary.get("verdicts") or []
    lines += ["## Verdicts (DiReDi - baseline)", ""]
    if verdicts:
        rows = []
        for v in verdicts:
            kind = UNITS.get(v["metric"], "points")
            rows.append([v["claim"], str(v["round"]), format_number(v["diff"], kind), format_ci(v.get("ci95"), kind),
                         f"**{v['verdict']}**" if v["verdict"] != "cannot tell" else v["verdict"]])
        lines += verdict_grid(summary)
        lines += ["", "yes: the whole interval of the difference is on the claim's side of 0; no: the whole "
                  "interval is on the other side; cannot tell: it holds 0. The same, one row per verdict:", ""]
        lines += markdown_table(["claim", "round", "diff", "95% CI", "verdict"], rows) + [""]
    else:
        lines += ["No verdicts: DiReDi and a baseline (fedavg, fedavg_ls, fedavg_ft, local) are not both in the study.",
                  ""]
    rounds_wanted = verdict_rounds(int(summary.get("rounds") or 0))
    for method in sorted(summary.get("methods") or {}, key=method_sort_key):
        entries = {e["round"]: e for e in summary["methods"][method].get("per_round") or []}
        shown = [r for r in rounds_wanted if r in entries]
        if not shown:
            continue
        lines += [f"## {method}", ""]
        counts = [f"round {r}: {entries[r].get('replicates')}" for r in shown]
        lines += [f"Replicates per round ({'; '.join(counts)}).", ""]
        rows = [[label] + [entry_cell(entries[r], key, kind) for r in shown] for key, label, kind in TABLE_ROWS]
        lines += markdown_table(["metric"] + [f"round {r}" for r in shown], rows) + [""]
    if command:
        lines += ["## Command", "", "```", command, "```", ""]
    if wall_s is not None and not is_missing(wall_s):
        lines += [f"Wall time: {float(wall_s):.0f} s ({float(wall_s) / 3600:.2f} h).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Everything on disk
# ----------------------------------------------------------------------------------------------


def write_curves(summary: Mapping, folder: str | os.PathLike) -> dict[str, Path]:
    """curves_round.png, curves_mb.png and curves_compute.png in ``folder``."""
    folder = Path(folder)
    return {f"curves_{x}": plot_curves(summary, x, folder / f"curves_{x}.png") for x in ("round", "mb", "compute")}


def write_study(summary: Mapping, out_dir: str | os.PathLike, command: str | None = None,
                wall_s: float | None = None) -> dict[str, Path]:
    """compare.json (NaN as null), compare.md and the plots in ``out_dir``; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    compare = dict(summary)
    if command:
        compare["command"] = command
    if wall_s is not None:
        compare["wall_s"] = wall_s
    path = out / "compare.json"
    path.write_text(json.dumps(to_jsonable(compare), allow_nan=False, ensure_ascii=False, indent=2) + "\n",
                    encoding="utf-8")
    written["compare_json"] = path
    path = out / "compare.md"
    path.write_text(study_markdown(summary, command, wall_s), encoding="utf-8")
    written["compare_md"] = path
    written.update(write_curves(summary, out))
    written["clients_last_round"] = plot_last_round_clients(summary, out / "clients_last_round.png")
    tutor = plot_tutor(summary, out / "tutor_progress.png")
    if tutor is not None:
        written["tutor_progress"] = tutor
    return written


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description="Compare methods over the run folders of a study's replicates.")
    parser.add_argument("runs", nargs="+", help="run folders, one per replicate")
    parser.add_argument("--replace", nargs="+", default=[], metavar="RUN",
                        help="run folders of methods run apart: each replaces its methods' records in the run "
                             "folder of the same replicate")
    parser.add_argument("--out", required=True, help="folder for compare.json, compare.md and the plots")
    parser.add_argument("--samples", type=int, default=2000, help="bootstrap samples")
    parser.add_argument("--command", default=None, help="the command that ran the study (written into compare.md; "
                                                         "by default this one)")
    parser.add_argument("--wall-s", type=float, default=None, help="the study's wall time in seconds")
    parser.add_argument("--finished-only", action="store_true",
                        help="only the methods each run folder's done.json lists (a replicate still running or cut)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = summarise_run_folders(args.runs, samples=args.samples, replace=args.replace,
                                        finished_only=args.finished_only)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    command = args.command or " ".join(["python -m report.study", *(sys.argv[1:] if argv is None else argv)])
    written = write_study(summary, args.out, command, args.wall_s)
    print(f"{len(written)} files in {args.out} ({time.perf_counter() - start:.1f} s)")
    return written


if __name__ == "__main__":
    main()
