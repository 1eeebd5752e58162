"""Why plain FedAvg learns no new class here: label skew, measured.

    python -m experiments.fedavg_skew --profile cpu --rounds 2

FedAvg in-process from the manufacturer's edge (``experiments.baseline_grid.fedavg_round``: the
Flower clients' training and seeds, the server's weighted mean), once with plain clients and once
with label-skew-aware clients (each trains only the class scores its labels hold: ``fedavg_ls``).
For every new class c, on the manufacturer's validation set (no client test data), after each
round: the score the models give c's objects (per object, the best class-c score of a detection
overlapping it at IoU > 0.5, with the detector's score floor lowered to 0.001; 0 when there is
none), averaged over c's objects, for the client models whose labels hold c, the client models
whose labels do not, and the averaged global model; the same models' classification bias of c (the
logit every location starts from: its change from the round's start is how far a client pushed the
class up or down everywhere); and the global model's AP on c. Writes
``fedavg_skew.json`` and ``fedavg_skew.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import box_iou

from data.voc import CLASS_INDEX
from distill.rd import direct_training
from evaluation.ap import per_class_ap, predict
from experiments.baseline_grid import weighted_average
from protocol.config import resolve_run_config
from protocol.wire import work_seed
from session.workspace import workspace_of

SCORE_FLOOR = 1e-3


def object_scores(model, dataset, class_ids) -> dict[int, list[float]]:
    """Per class, per non-difficult object of it: the best score of a detection of that class covering it."""
    low = copy.deepcopy(model).eval()
    low.score_thresh = SCORE_FLOOR
    predictions, targets = predict(low, dataset)
    scores: dict[int, list[float]] = {c: [] for c in class_ids}
    for det, target in zip(predictions, targets):
        for c in class_ids:
            gt = target["boxes"][(target["labels"] == c) & ~target["difficult"]]
            if len(gt) == 0:
                continue
            mine = det["labels"] == c
            if not mine.any():
                scores[c] += [0.0] * len(gt)
                continue
            overlap = box_iou(gt, det["boxes"][mine]) > 0.5
            best = torch.where(overlap, det["scores"][mine].unsqueeze(0), torch.zeros(1)).max(dim=1).values
            scores[c] += best.tolist()
    return scores


def class_bias(model, class_id: int) -> float:
    return float(model.head.classification_head.cls_logits.bias[class_id].detach())


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def run(config, rounds: int, label_skew_aware: bool) -> list[dict]:
    ws = workspace_of(config)
    edge = copy.deepcopy(ws.chain(progress=False).edge).cpu()
    settings, val = config.client_training(), ws.validation_set()
    new = sorted({c for spec in ws.clients for c in spec.private}, key=CLASS_INDEX.get)
    data = [ws.client_train(i) for i in range(len(ws.clients))]
    out = []
    for r in range(1, rounds + 1):
        start_bias = {c: class_bias(edge, CLASS_INDEX[c]) for c in new}
        trained = []
        for i, spec in enumerate(ws.clients):
            classes = [CLASS_INDEX[c] for c in spec.train_classes] if label_skew_aware else None
            model, _ = direct_training(edge, data[i], config.direct_iters, settings,
                                       seed=work_seed(config.training_seed, r, i), trained_classes=classes)
            trained.append(model)
        edge.load_state_dict(weighted_average([m.state_dict() for m in trained], [len(d) for d in data]))
        ap, _ = per_class_ap(edge, val, new)
        ids = [CLASS_INDEX[c] for c in new]
        per_client = [object_scores(model, val, ids) for model in trained]
        global_scores = object_scores(edge, val, ids)
        for c in new:
            holders = [i for i, spec in enumerate(ws.clients) if c in spec.train_classes]
            others = [i for i in range(len(ws.clients)) if i not in holders]
            k = CLASS_INDEX[c]
            out.append({"round": r, "class": c, "holders": len(holders), "others": len(others),
                        "score_holders": mean(mean(per_client[i][k]) for i in holders),
                        "score_others": mean(mean(per_client[i][k]) for i in others),
                        "score_global": mean(global_scores[k]), "ap_global": 100 * ap[c],
                        "bias_start": start_bias[c],
                        "bias_change_holders": mean(class_bias(trained[i], k) - start_bias[c] for i in holders),
                        "bias_change_others": mean(class_bias(trained[i], k) - start_bias[c] for i in others),
                        "bias_change_global": class_bias(edge, k) - start_bias[c]})
            print(json.dumps({"label_skew_aware": label_skew_aware, **out[-1]}), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.fedavg_skew", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=".cache")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = parser.parse_args(argv)
    if min(args.clients, args.rounds, args.threads) < 1:
        parser.error("--clients, --rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = resolve_run_config({"profile": args.profile, "num-clients": args.clients, "cache-dir": args.cache})
    result = {"command": "python -m experiments.fedavg_skew " + " ".join(sys.argv[1:] if argv is None else argv),
              "score_floor": SCORE_FLOOR, "fedavg": run(config, args.rounds, False),
              "fedavg_ls": run(config, args.rounds, True)}
    result["wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fedavg_skew.json").write_text(json.dumps(result, indent=1))
    lines = ["# Why plain FedAvg learns no new class: the scores of the new classes' objects\n",
             f"`{result['command']}` ({result['wall_s']:.0f} s). Manufacturer's validation set; per new class, the mean "
             "over its objects of the best class score of a detection covering it (0-1; the detector keeps "
             "detections from 0.05, a deployment threshold is 0.5).\n",
             "| FedAvg clients | round | class | clients holding it | score: their models | the others' | global | "
             "bias change: their models | the others' | global | global AP |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("fedavg", "fedavg_ls"):
        for row in result[name]:
            lines.append(f"| {'plain' if name == 'fedavg' else 'label-skew aware'} | {row['round']} | {row['class']} | "
                         f"{row['holders']}/{row['holders'] + row['others']} | {row['score_holders']:.3f} | "
                         f"{row['score_others']:.3f} | {row['score_global']:.3f} | {row['bias_change_holders']:+.3f} | "
                         f"{row['bias_change_others']:+.3f} | {row['bias_change_global']:+.3f} | {row['ap_global']:.1f} |")
    (args.out / "fedavg_skew.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
