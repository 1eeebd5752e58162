#!/usr/bin/env bash
# The GPU check (README, "GPUs"): the device tests, the paper profile's chain for STEPS steps a stage, and
# the cold default run (`python -m sim.run --clients 8`) on the GPU, within TOTAL_S seconds in all.
# Run it from the repository root on a machine with a CUDA GPU and the project's dependencies:
#     OUT=gpu-check bash bench/gpu_check.sh
# Writes to OUT: check.log (machine, versions, tests), paper_chain.log/.json (bench.chain's report: seconds
# and peak GPU memory per stage), default.log (the run's output) and the run's summary.json, results.md,
# rounds.jsonl and config.json. Data and chains go to CACHE (default .cache/gpu-check, ignored by git): cold on a fresh checkout, reused on a rerun.
# On one H200 the device tests and the paper chain took about 2 minutes and the cold default run had not
# finished after 391 s (in DiReDi's round 2, the FedAvg family still to come): give TOTAL_S 900 or more to see it end.
set -u
out=${OUT:-gpu-check}
steps=${STEPS:-100}    # steps per chain stage: a timing run, not a chain to use
images=${IMAGES:-600}  # synthetic images at the paper's sizes: seconds per step do not depend on the count
cache=${CACHE:-.cache/gpu-check}
device=${DEVICE:-cuda}  # cpu: a dry run of this script without a GPU
deadline=$(( $(date +%s) + ${TOTAL_S:-520} ))
left() { local s=$(( deadline - $(date +%s) )); (( s < $1 )) && echo "$s" || echo "$1"; }
mkdir -p "$out" "$cache"
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cpus: $(nproc)"
  python -c "import sys, torch, torchvision, flwr, ray; print('python', sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'flwr', flwr.__version__, 'ray', ray.__version__, torch.cuda.get_device_name())"
  timeout "$(left 90)" python -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tail -4
} 2>&1 | tee "$out/check.log"

# The paper profile (ResNet-101 / ResNet-50 / MobileNetV2 FCOS, FPN 256, 512 px) on default8's classes.
python - "$cache/paper-timing.yaml" "$images" <<'EOF'
import sys
import yaml
scenario = yaml.safe_load(open("data/scenarios/default8.yaml"))
scenario["data"].setdefault("profiles", {})["paper"] = {"num_images": int(sys.argv[2]), "image_size": 320}
yaml.safe_dump(scenario, open(sys.argv[1], "w"))
EOF
start=$(date +%s)
timeout "$(left 140)" python -m bench.chain --profile paper --scenario "$cache/paper-timing.yaml" --steps "$steps" \
  --device "$device" --cache "$cache" --out "$out/paper_chain.json" 2>&1 | grep -v " INFO " | tee "$out/paper_chain.log"
echo "paper chain: $(( $(date +%s) - start )) s in all (data included)" | tee -a "$out/paper_chain.log"

start=$(date +%s)
timeout "$(left 600)" python -m sim.run --clients 8 --device "$device" --cache "$cache" --out "$cache/runs" \
  --name gpu-default 2>&1 | tee "$out/default.log"
echo "default run: $(( $(date +%s) - start )) s (exit ${PIPESTATUS[0]})" | tee -a "$out/default.log"
for f in summary.json results.md rounds.jsonl config.json; do
  cp "$cache/runs/gpu-default/$f" "$out/" 2>/dev/null
done
exit 0
