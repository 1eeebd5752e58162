"""Run folder (config, per-round JSON lines, verification log), results table and plots.

Layout of ``runs/<name>/`` written here::

    config.json           resolved configuration (`RunFolder.write_config`)
    rounds.jsonl          one JSON line per (method, round, client) record (`append_record`)
    verification.jsonl    one JSON line per verification decision (`append_verification`)
    failures.jsonl        one JSON line per client failure: an error reply, or no reply in time (`append_failure`)
    results.md            Table III-style summary (`results_markdown`)
    gain_forgetting.png   per-client knowledge gain and forgetting, one bar per method
    heatmap_<method>.png  per-client, per-class AP before (original edge) and after (final)
    round_curves.png      mean gain and forgetting per round, one line per method

JSON cannot hold NaN: NaN (and +-inf) are written as ``null``.  Reading back, ``null`` becomes NaN
inside nested mappings (the AP maps, ``seconds``, ``after``) and for the top-level float fields in
`FLOAT_FIELDS`; any other top-level ``null`` (e.g. ``accepted: None``) stays ``None``.

Formatting in results.md: AP and mAP as percentages with one decimal, AP changes as signed
percentage points, traffic in MB (10^6 bytes) with two decimals, a missing value as an em dash.
The markdown depends only on its inputs (no dates, no paths), so the same records give a
byte-identical file.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from report.checkpoint import checkpoint_round  # noqa: E402
from protocol.config import RunConfig  # noqa: E402
from evaluation.metrics import (  # noqa: E402
    DETECTION_METRICS,
    is_missing,
    method_means,
    method_sort_key,
    method_table,
    methods_in,
    round_series,
    sorted_by_round,
    specs_by_client,
)

# Top-level record fields whose JSON null means NaN (not "no value").
FLOAT_FIELDS = frozenset({"peak_rss_mb", "precision", "recall", "f1", "mAP"})

# Stable colours per method so every plot agrees.
METHOD_COLOURS = {
    "diredi": "#1f77b4",
    "fedavg": "#ff7f0e",
    "fedprox": "#2ca02c",
    "local": "#9467bd",
    "oracle": "#7f7f7f",
}
EXTRA_COLOURS = ("#d62728", "#8c564b", "#e377c2", "#bcbd22", "#17becf")

TUTOR_HISTORY = "tutor.json"  # DiReDi's tutor per round: [{"round", "ap": {class: AP}, "mAP"}]
SUMMARY = "summary.json"  # evaluation.metrics.run_summary

MISSING_CELL = "—"
BYTES_PER_MB = 1e6
PNG_METADATA = {"Software": None}  # keep the matplotlib version out of the files


# ----------------------------------------------------------------------------------------------
# JSON with NaN as null
# ----------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Plain JSON types: NaN/inf -> None, numpy scalars/arrays -> python, tuples/sets -> lists,
    paths -> strings, mapping keys -> strings."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_result(out: Path, result: Mapping, text: str) -> None:
    """An experiment's figures: ``<out>.json`` (``result``) and ``<out>.md`` (``text``), also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(text)
    print(text)


def json_line(value: Any) -> str:
    """One strict-JSON line (no NaN tokens), keys in insertion order."""
    return json.dumps(to_jsonable(value), allow_nan=False, ensure_ascii=False)


def nulls_to_nan(value: Any) -> Any:
    """Inside a nested mapping / list: None -> NaN (recursively)."""
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {k: nulls_to_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nulls_to_nan(v) for v in value]
    return value


def restore_record_nans(record: dict) -> dict:
    """Undo NaN -> null for one record read back from rounds.jsonl (see module docstring)."""
    restored = {}
    for key, value in record.items():
        if isinstance(value, dict) or (value is None and key in FLOAT_FIELDS):
            restored[key] = nulls_to_nan(value)
        else:
            restored[key] = value
    return restored


def read_json_lines(path: Path) -> list[dict]:
    """Every JSON line of `path` ([] if absent).  A final line without its newline that does not
    parse (a write cut off by a crash) is ignored; any other bad line raises ValueError."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            is_unterminated_tail = number == len(lines) and not text.endswith("\n")
            if is_unterminated_tail:
                continue
            raise ValueError(f"{path}:{number}: not a JSON line ({error})") from error
    return rows


class RunFolder:
    """The folder of one run, e.g. ``RunFolder("runs/exp1")``; created (with parents) on init."""

    CONFIG = "config.json"
    ROUNDS = "rounds.jsonl"
    VERIFICATION = "verification.jsonl"
    FAILURES = "failures.jsonl"
    DONE = "done.json"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def start(cls, path: str | os.PathLike, run: Mapping, details: Mapping | None = None,
              resume: bool = False, redo: Sequence[str] = ()) -> "RunFolder":
        """The folder of a new run (earlier logs emptied), or with ``resume`` the folder of an
        earlier run with the same ``run`` configuration, keeping its finished methods' records but
        those of the methods to ``redo`` (their records, decisions, checkpoints and client state go).

        config.json holds ``{"run": run, **details}``; only ``run`` is compared on resume, and where
        DiReDi is redone or never ran its own settings may differ (``resume_problem``)."""
        folder = cls(path)
        run = json.loads(json.dumps(to_jsonable(run)))  # as it reads back from config.json
        done: list[str] = []
        if resume:
            problem = cls.resume_problem(folder.path, run, redo)
            if problem:
                raise ValueError(problem)
            done = [m for m in folder.read_done() if m not in redo]
            for method in redo:
                folder.forget_state(method)
            if "diredi" in redo:
                (folder.path / TUTOR_HISTORY).unlink(missing_ok=True)
        else:  # a new run: no earlier run's checkpoints or client state may leak into it
            shutil.rmtree(folder.checkpoints_path, ignore_errors=True)
            shutil.rmtree(folder.client_state_path, ignore_errors=True)

        def kept_round(method: str, server_round: int) -> bool:
            # a finished method's records, and an unfinished one's up to its last checkpointed round
            return method in done or server_round <= checkpoint_round(folder.checkpoints_path, method)

        kept = [r for r in folder.read_records() if kept_round(r["method"], r["round"])] if resume else []
        decisions = [d for d in folder.read_verification() if kept_round("diredi", d["round"])] if resume else []
        failures = [f for f in folder.read_failures() if kept_round(f["method"], f["round"])] if resume else []
        folder.rounds_path.write_text("")  # rounds.jsonl: the kept records, then the new ones
        for record in kept:
            folder.append_record(record)
        folder.verification_path.write_text("")
        for decision in decisions:
            folder.append_verification(decision)
        folder.failures_path.write_text("")
        for failure in failures:
            folder.append_failure(failure)
        folder.write_done(done)
        folder.write_config({"run": run, **(details or {})})
        return folder

    @classmethod
    def resume_problem(cls, path: str | os.PathLike, run: Mapping, redo: Sequence[str] = ()) -> str | None:
        """Why the run folder at ``path`` cannot go on with settings ``run`` (as config.json reads back) once
        the methods to ``redo`` are dropped, or None. The settings must be the folder's, except the ones only
        DiReDi reads where DiReDi neither finished nor checkpointed a round there (a resume drops any other
        DiReDi record, or where it is redone)."""
        path = Path(path)
        if not (path / cls.CONFIG).exists():
            return f"{path} holds no earlier run (no config.json)"
        folder = cls(path)
        diredi_ran = "diredi" not in redo and (
            "diredi" in folder.read_done() or checkpoint_round(folder.checkpoints_path, "diredi") > 0)
        if not RunConfig.same_settings(folder.read_config().get("run") or {}, run, diredi_ran=diredi_ran):
            hint = " (DiReDi ran in it, so DiReDi's own settings must match too; --redo diredi drops its records)"
            return f"{path} was made with other settings{hint if diredi_ran else ''}; start a new run (or another name)"
        return None

    def read_done(self) -> list[str]:
        """The methods whose every round is in rounds.jsonl."""
        path = self.path / self.DONE
        return json.loads(path.read_text()) if path.exists() else []

    def write_done(self, methods: Sequence[str]) -> None:
        (self.path / self.DONE).write_text(json.dumps(list(methods)))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def checkpoints_path(self) -> Path:
        """Each unfinished federated method's server state after its last round (``report.checkpoint``)."""
        return self.path / "checkpoints"

    @property
    def client_state_path(self) -> Path:
        """The simulated clients' state on disk (``clients.store``)."""
        return self.path / "client-state"

    def forget_state(self, method: str) -> None:
        """Drops a finished method's checkpoint and client state (a finished method is never resumed)."""
        for suffix in (".json", ".safetensors"):
            (self.checkpoints_path / f"{method}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(self.client_state_path / method, ignore_errors=True)
        for folder in (self.checkpoints_path, self.client_state_path):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    @property
    def rounds_path(self) -> Path:
        return self.path / self.ROUNDS

    @property
    def verification_path(self) -> Path:
        return self.path / self.VERIFICATION

    @property
    def failures_path(self) -> Path:
        return self.path / self.FAILURES

    def write_config(self, config: Mapping) -> Path:
        """config.json, keys sorted, NaN as null; overwrites."""
        text = json.dumps(to_jsonable(config), allow_nan=False, ensure_ascii=False, indent=2,
                          sort_keys=True)
        self.config_path.write_text(text + "\n", encoding="utf-8")
        return self.config_path

    def read_config(self) -> dict:
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def _append_line(self, path: Path, row: Mapping) -> Path:
        line = json_line(row)  # serialise first: a bad row never leaves half a line behind
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
        return path

    def append_record(self, record: Mapping) -> Path:
        """Append one per-round per-client record to rounds.jsonl and flush."""
        return self._append_line(self.rounds_path, record)

    def append_verification(self, decision: Mapping) -> Path:
        """Append one verification decision to verification.jsonl and flush."""
        return self._append_line(self.verification_path, decision)

    def append_failure(self, failure: Mapping) -> Path:
        """Append one client failure ({method, round, step, node, reason}) to failures.jsonl and flush."""
        return self._append_line(self.failures_path, failure)

    def write_json(self, name: str, value: Any) -> Path:
        """A JSON file in the folder (NaN as null), written whole or not at all."""
        path = self.path / name
        text = json.dumps(to_jsonable(value), allow_nan=False, ensure_ascii=False, indent=2)
        partial = path.with_suffix(path.suffix + ".partial")
        partial.write_text(text + "\n", encoding="utf-8")
        partial.replace(path)
        return path

    def read_json(self, name: str, default: Any = None) -> Any:
        path = self.path / name
        return nulls_to_nan(json.loads(path.read_text(encoding="utf-8"))) if path.exists() else default

    def read_records(self) -> list[dict]:
        """rounds.jsonl back as records, with null restored to NaN where it stood for NaN."""
        return [restore_record_nans(row) for row in read_json_lines(self.rounds_path)]

    def read_verification(self) -> list[dict]:
        """verification.jsonl as written (null stays None)."""
        return read_json_lines(self.verification_path)

    def read_failures(self) -> list[dict]:
        """failures.jsonl as written; empty for a folder from before it was kept."""
        return read_json_lines(self.failures_path)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def format_percent(value: Any) -> str:
    """AP / mAP / precision in [0, 1] -> '45.3'."""
    if is_missing(value):
        return MISSING_CELL
    return f"{round(100.0 * float(value), 1) + 0.0:.1f}"  # + 0.0 turns -0.0 into 0.0


def format_points(value: Any) -> str:
    """AP change in [-1, 1] -> signed percentage points '+12.3' / '-4.0' / '0.0'."""
    if is_missing(value):
        return MISSING_CELL
    rounded = round(100.0 * float(value), 1) + 0.0
    return "0.0" if rounded == 0 else f"{rounded:+.1f}"


def format_unsigned_points(value: Any) -> str:
    """A non-negative AP change (forgetting) -> percentage points without sign, '4.0'."""
    return format_percent(value)


def format_megabytes(value: Any) -> str:
    """Bytes -> MB (10^6 bytes) with two decimals."""
    if is_missing(value):
        return MISSING_CELL
    return f"{float(value) / BYTES_PER_MB:.2f}"


def format_seconds(value: Any) -> str:
    return MISSING_CELL if is_missing(value) else f"{float(value):.1f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def any_present(rows: Iterable[Mapping], key: str) -> bool:
    return any(not is_missing(row.get(key)) for row in rows)


STAGE_COLUMNS = (("mAP", "mAP"), ("precision", "precision"), ("recall", "recall"), ("f1", "F1"))


def stage_value(row: Mapping, key: str) -> Any:
    """A stage row's metric under the keys ``evaluation.ap.per_class_ap`` writes (mAP, precision, ...)."""
    return row.get(key)


def stage_section(stage_rows: Mapping[str, Mapping]) -> list[str]:
    """Model stages (e.g. original tutor / edge, updated tutor), in the given order."""
    columns = [(key, label) for key, label in STAGE_COLUMNS
               if any(not is_missing(stage_value(row, key)) for row in stage_rows.values())]
    header = ["model stage"] + [label for _, label in columns]
    rows = [[str(stage)] + [format_percent(stage_value(row, key)) for key, _ in columns]
            for stage, row in stage_rows.items()]
    return ["## Model stages", "", *markdown_table(header, rows), ""]


def methods_section(means: Sequence[Mapping]) -> list[str]:
    detection = [key for key in DETECTION_METRICS if any_present(means, key)]
    header = (["method", "clients", "mAP start", "mAP"] + [k if k != "f1" else "F1" for k in detection]
              + ["gain", "forgetting (kept)", "forgetting (protected)", "released", "spread",
                 "up MB/client/round", "down MB/client/round"])
    rows = []
    for row in means:
        rows.append(
            [row["method"], str(row["clients"]), format_percent(row["map_start"]),
             format_percent(row["map_final"])]
            + [format_percent(row[key]) for key in detection]
            + [format_points(row["gain"]), format_unsigned_points(row["forgetting_kept"]),
               format_unsigned_points(row["forgetting_protected"]), format_points(row["released"]),
               format_points(row["spread"]), format_megabytes(row["bytes_up"]),
               format_megabytes(row["bytes_down"])]
        )
    return ["## Methods (mean over clients)", "", *markdown_table(header, rows), ""]


def clients_section(table: Sequence[Mapping]) -> list[str]:
    header = ["client", "method", "mAP start", "mAP", "gain", "forgetting (kept)",
              "forgetting (protected)", "released", "spread", "up MB/round", "accepted/rejected"]
    ordered = sorted(table, key=lambda r: (r["client"], method_sort_key(r["method"])))
    rows = [
        [str(row["client"]), row["method"], format_percent(row["map_start"]),
         format_percent(row["map_final"]), format_points(row["gain"]),
         format_unsigned_points(row["forgetting_kept"]), format_unsigned_points(row["forgetting_protected"]),
         format_points(row["released"]), format_points(row["spread"]),
         format_megabytes(row["bytes_up"]),
         f"{row['accepted_rounds']}/{row['rejected_rounds']}"]
        for row in ordered
    ]
    return ["## Per client", "", *markdown_table(header, rows), ""]


def cost_section(means: Sequence[Mapping]) -> list[str]:
    phases = sorted({phase for row in means for phase in row["seconds"]})
    header = (["method"] + [f"{phase} s" for phase in phases]
              + ["total s/client", "peak RSS MB"])
    rows = [[row["method"]] + [format_seconds(row["seconds"].get(phase)) for phase in phases]
            + [format_seconds(row["seconds_total"]), format_seconds(row["peak_rss_mb"])]
            for row in means]
    return ["## Cost (seconds per phase summed over rounds, mean over clients; peak RSS max)", "",
            *markdown_table(header, rows), ""]


LEGEND_LINES = [
    "AP, mAP, precision, recall and F1 in percent. \"mAP start\" is the original edge (before any",
    "federated work), \"mAP\" the client's model after the last round, both over the classes",
    "evaluated on the client's test shard. Changes are in percentage points, final minus start:",
    "**gain** over the client's private (new) classes; **released** over its dropped classes",
    "(negative = released); **spread** over other clients' private classes. **Forgetting** is",
    "Chaudhry et al. (2018): per class, best earlier AP minus the latest AP, clamped at 0, averaged",
    "over the client's kept presumed classes, or over the protected classes. Classes without",
    "positives in a shard are skipped; \"—\" means no class was left to measure.",
]


def results_markdown(records: Sequence[Mapping], specs: Any, all_private: Any,
                     stage_rows: Mapping[str, Mapping] | None = None, operating_threshold: float = 0.5) -> str:
    """Table III-style report: model stages (optional), per-method means, per-client rows, cost; precision,
    recall and F1 were measured at ``operating_threshold`` (the run's, which the report states)."""
    table = method_table(records, specs, all_private)
    means = method_means(table)
    rounds = sorted({int(r["round"]) for r in records})
    lines = ["# Results", ""]
    lines += [f"Methods: {', '.join(methods_in(table)) or MISSING_CELL}; "
              f"clients: {len({row['client'] for row in table})}; "
              f"rounds: {max(rounds) if rounds else 0}.", ""]
    lines += LEGEND_LINES + [f"Precision, recall and F1 (eq. 11) count the detections scored at or above "
                             f"{operating_threshold:g}, the run's operating threshold.", ""]
    if stage_rows:
        lines += stage_section(stage_rows)
    lines += methods_section(means)
    lines += clients_section(table)
    lines += cost_section(means)
    lines += privacy_section(records)
    return "\n".join(lines)


def privacy_section(records: Sequence[Mapping]) -> list[str]:
    """Per method and client with differential privacy on: the epsilon it spent (after its last
    round), its rounds, and how much clipping shrank its deltas on average. Empty when it is off."""
    last: dict[tuple[str, int], Mapping] = {}
    factors: dict[tuple[str, int], list[float]] = {}
    for r in sorted_by_round([r for r in records if isinstance(r.get("dp"), Mapping) and r["dp"]]):
        key = (r["method"], int(r["client"]))
        last[key] = r
        factors.setdefault(key, []).append(float(r["dp"].get("clip_factor", math.nan)))
    if not last:
        return []
    rows = []
    for (method, client), r in sorted(last.items()):
        epsilon = r["dp"].get("epsilon")
        rows.append([method, str(client), f"{int(r['dp'].get('participations', 0))}",
                     f"{epsilon:.3g}" if epsilon is not None and math.isfinite(epsilon) else "inf (no noise)",
                     f"{sum(factors[(method, client)]) / len(factors[(method, client)]):.2f}"])
    return ["## Differential privacy", "",
            "Each client's delta clipped and noised before upload (`protocol/privacy.py`); epsilon at the run's "
            "`dp-delta`, from Opacus's RDP accountant over the rounds the client took part in.", "",
            *markdown_table(["method", "client", "rounds", "epsilon spent", "mean clip factor"], rows), ""]


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def method_colour(method: str, methods: Sequence[str]) -> str:
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    extras = [m for m in methods if m not in METHOD_COLOURS]
    return EXTRA_COLOURS[extras.index(method) % len(EXTRA_COLOURS)] if method in extras else "black"


def save_figure(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(figure)
    return path


def grouped_bar_panel(axis, table: Sequence[Mapping], key: str, title: str) -> None:
    """One panel: x groups = clients, one bar per method, value in percentage points."""
    methods = methods_in(table)
    clients = sorted({row["client"] for row in table})
    values = {(row["method"], row["client"]): row.get(key) for row in table}
    width = 0.8 / max(len(methods), 1)
    for index, method in enumerate(methods):
        offsets = np.arange(len(clients)) + (index - (len(methods) - 1) / 2) * width
        heights = [values.get((method, client)) for client in clients]
        for x, height in zip(offsets, heights):
            if is_missing(height):
                axis.text(x, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90,
                          color="grey")
        axis.bar(offsets, [0.0 if is_missing(h) else 100.0 * float(h) for h in heights],
                 width=width, label=method, color=method_colour(method, methods))
    axis.axhline(0.0, color="black", linewidth=0.8, zorder=0)
    axis.set_xticks(np.arange(len(clients)), [f"client {c}" for c in clients])
    axis.set_ylabel("AP change (percentage points)")
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)


def plot_gain_forgetting(table: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Per-client grouped bars, one bar per method: knowledge gain (top), forgetting of kept
    presumed classes (bottom).  `table` is `evaluation.metrics.method_table`'s output."""
    clients = sorted({row["client"] for row in table})
    figure, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.0 + 0.9 * len(clients)), 7.0),
                                sharex=True)
    grouped_bar_panel(axes[0], table, "gain", "Knowledge gain on private (new) classes (higher is better)")
    grouped_bar_panel(axes[1], table, "forgetting_kept",
                      "Unintended forgetting of kept presumed classes (lower is better)")
    axes[0].legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    return save_figure(figure, path)


def ordered_class_names(records: Iterable[Mapping]) -> list[str]:
    """Class names of the AP maps in first-seen order (the federation writes them in VOC order)."""
    names: list[str] = []
    for record in records:
        for key in ("ap_before", "ap_after"):
            for name in record.get(key) or {}:
                if name not in names:
                    names.append(name)
    return names


def ap_matrix(aps_by_client: Mapping[int, Mapping], clients: Sequence[int],
              classes: Sequence[str]) -> np.ndarray:
    """[clients, classes] AP in percent, NaN where missing."""
    matrix = np.full((len(clients), len(classes)), np.nan)
    for i, client in enumerate(clients):
        aps = aps_by_client.get(client, {})
        for j, name in enumerate(classes):
            if not is_missing(aps.get(name)):
                matrix[i, j] = 100.0 * float(aps[name])
    return matrix


def outline_spec_cells(axis, clients: Sequence[int], classes: Sequence[str], specs: Any) -> None:
    """Frame each client's private classes (solid red) and dropped classes (dashed black)."""
    by_client = specs_by_client(specs)
    for i, client in enumerate(clients):
        spec = by_client.get(client, {})
        for key, style in (("private", dict(edgecolor="red", linestyle="-")),
                           ("dropped", dict(edgecolor="black", linestyle="--"))):
            for name in spec.get(key) or []:
                if name in classes:
                    axis.add_patch(Rectangle((classes.index(name) - 0.5, i - 0.5), 1, 1,
                                             fill=False, linewidth=1.8, **style))


def heatmap_panel(axis, matrix: np.ndarray, clients: Sequence[int], classes: Sequence[str],
                  title: str, colour_map):
    image = axis.imshow(np.ma.masked_invalid(matrix), cmap=colour_map, vmin=0.0, vmax=100.0,
                        aspect="auto")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = matrix[i, j]
            text = "n/a" if np.isnan(value) else f"{value:.0f}"
            colour = "dimgrey" if np.isnan(value) else ("white" if value < 55 else "black")
            axis.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    axis.set_xticks(np.arange(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(np.arange(len(clients)), [f"client {c}" for c in clients])
    axis.set_title(title)
    return image


def plot_class_heatmap(records: Sequence[Mapping], method: str, path: str | os.PathLike,
                       specs: Any = None) -> Path:
    """Clients x classes AP (percent) of one method: before (round-1 ap_before, the original edge)
    and after (last round's ap_after); values annotated, NaN grey.  With `specs`, each client's
    private classes are framed in red and its dropped classes dashed."""
    chosen = [r for r in records if r["method"] == method]
    clients = sorted({int(r["client"]) for r in chosen})
    classes = ordered_class_names(chosen)
    before: dict[int, Mapping] = {}
    after: dict[int, Mapping] = {}
    for client in clients:
        ordered = sorted_by_round([r for r in chosen if int(r["client"]) == client])
        before[client] = ordered[0].get("ap_before") or {}
        after[client] = ordered[-1].get("ap_after") or {}
    colour_map = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    width = max(6.0, 2.0 + 0.55 * len(classes))
    height = 2.0 + 2 * (0.8 + 0.4 * max(len(clients), 1))
    figure, axes = plt.subplots(2, 1, figsize=(width, height), sharex=True)
    last_round = max((int(r["round"]) for r in chosen), default=0)
    panels = ((axes[0], before, f"{method}: AP before (original edge)"),
              (axes[1], after, f"{method}: AP after round {last_round}"))
    image = None
    for axis, aps, title in panels:
        image = heatmap_panel(axis, ap_matrix(aps, clients, classes), clients, classes, title,
                              colour_map)
        if specs is not None:
            outline_spec_cells(axis, clients, classes, specs)
    figure.tight_layout()
    colour_bar = figure.colorbar(image, ax=list(axes), fraction=0.03, pad=0.02)
    colour_bar.set_label("AP (%)")
    if specs is not None:
        handles = [Patch(fill=False, edgecolor="red", linewidth=1.8, label="private (new)"),
                   Patch(fill=False, edgecolor="black", linestyle="--", linewidth=1.8,
                         label="dropped"),
                   Patch(facecolor="lightgrey", label="no positives")]
        figure.legend(handles=handles, loc="lower center", ncol=3, frameon=False,
                      bbox_to_anchor=(0.45, 1.0))
    return save_figure(figure, path)


def all_classes_specs(records: Sequence[Mapping]) -> list[dict]:
    """Stand-in specs when none are given: every evaluated class counts as 'private' (gain) and
    'kept' (forgetting), so the round curves show the mean change / forgetting over all classes."""
    classes = ordered_class_names(records)
    clients = sorted({int(r["client"]) for r in records})
    return [{"client": c, "private": classes, "kept": classes} for c in clients]


def plot_round_curves(records: Sequence[Mapping], path: str | os.PathLike, specs: Any = None,
                      all_private: Any = None) -> Path:
    """Per round, the mean over clients of knowledge gain (left) and kept-class forgetting (right),
    one line per method.  Without `specs` both are over all evaluated classes (titles say so)."""
    scope = "private classes" if specs is not None else "all evaluated classes"
    forget_scope = "kept presumed classes" if specs is not None else "all evaluated classes"
    series = round_series(records, specs if specs is not None else all_classes_specs(records),
                          all_private or [])
    methods = methods_in(series)
    figure, axes = plt.subplots(1, 2, figsize=(11.0, 4.0))
    for method in methods:
        rows = [row for row in series if row["method"] == method]
        rounds = [row["round"] for row in rows]
        for axis, key in ((axes[0], "gain"), (axes[1], "forgetting_kept")):
            values = [np.nan if is_missing(row[key]) else 100.0 * row[key] for row in rows]
            axis.plot(rounds, values, marker="o", label=method,
                      color=method_colour(method, methods))
    all_rounds = sorted({row["round"] for row in series})
    for axis, title in ((axes[0], f"Mean knowledge gain ({scope})"),
                        (axes[1], f"Mean unintended forgetting ({forget_scope})")):
        axis.set_title(title)
        axis.set_xlabel("round")
        axis.set_ylabel("percentage points")
        axis.set_xticks(all_rounds)
        axis.axhline(0.0, color="black", linewidth=0.8, zorder=0)
        axis.grid(alpha=0.3)
    axes[1].legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_tutor_progress(history: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """The DiReDi tutor's per-class validation AP after every round (round 0 = the original tutor):
    what the accepted deltas accumulated, the paper's "updated tutor" row per round."""
    ordered = sorted(history, key=lambda entry: entry["round"])
    rounds = [entry["round"] for entry in ordered]
    classes = list(ordered[0]["ap"]) if ordered else []
    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    for name in classes:
        axis.plot(rounds, [100 * float(entry["ap"].get(name, math.nan)) for entry in ordered], marker="o",
                  linewidth=1.2, label=name)
    axis.plot(rounds, [100 * float(entry["mAP"]) for entry in ordered], color="black", linewidth=2.5,
              marker="s", label="mAP")
    axis.set_title("Tutor on the manufacturer's validation set, per round")
    axis.set_xlabel("round")
    axis.set_ylabel("AP (%)")
    axis.set_xticks(rounds)
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "method"


def write_all(run_folder: RunFolder | str | os.PathLike, records: Sequence[Mapping], specs: Any,
              all_private: Any, stage_rows: Mapping[str, Mapping] | None = None,
              operating_threshold: float = 0.5) -> dict[str, Path]:
    """Write results.md and every plot into the run folder; returns {name: path} with names
    ``results``, ``gain_forgetting``, ``round_curves``, ``heatmap_<method>``, ``curves_round``,
    ``curves_mb``, ``curves_compute`` (``report.study``: gain, forgetting and spread per round, per MB
    and per client compute second, bands over clients) and ``tutor_progress`` when there is a tutor."""
    folder = run_folder.path if isinstance(run_folder, RunFolder) else Path(run_folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    results = folder / "results.md"
    results.write_text(results_markdown(records, specs, all_private, stage_rows, operating_threshold),
                       encoding="utf-8")
    written["results"] = results
    table = method_table(records, specs, all_private)
    written["gain_forgetting"] = plot_gain_forgetting(table, folder / "gain_forgetting.png")
    written["round_curves"] = plot_round_curves(records, folder / "round_curves.png", specs,
                                                all_private)
    for method in methods_in(records):
        name = f"heatmap_{file_safe(method)}"
        written[name] = plot_class_heatmap(records, method, folder / f"{name}.png", specs)
    history = RunFolder(folder).read_json(TUTOR_HISTORY)
    if history:
        written["tutor_progress"] = plot_tutor_progress(history, folder / "tutor_progress.png")
    # The run's own rounds as a one-replicate study (bands over clients only), as the study draws them.
    from report.study import write_curves  # report.study imports this module
    from evaluation.study import summarise_study

    written.update(write_curves(summarise_study([(0, records, specs, history or [], all_private)]), folder))
    return written
