#!/usr/bin/env bash
# The device check, in one call (GPU hosts): gpt2-small replays of the Azure excerpt on the
# live engine under the best-static knobs (the shipped evaluation's search, docs/evaluation.json)
# and under the shipped guarded policy from them; a quick
# calibration of this card (2 minutes at most) and `calibrate check` of the shipped profiles
# against it; then the simulator against the live engine on this card
# (benchmarks/sim_vs_live.py --device cuda, two rounds of calibrate + replay).
# Usage: bash benchmarks/gpu_check.sh OUTDIR [DEVICE] [MODEL]
set -euo pipefail
out=${1:-out}; device=${2:-cuda}; model=${3:-gpt2-small}
mkdir -p "$out"
if ! python -c "import autoopt" 2>/dev/null; then  # a bare machine: import the checkout as `autoopt`
  mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/autoopt && export PYTHONPATH=/tmp/pkg
fi
export PYTHONUNBUFFERED=1
common=(--trace azure-conv --model "$model" --device "$device" --speedup 8 --start 20 --duration 30
        --slo-ttft-ms 500 --slo-tpot-ms 20 --max-slots 256)
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
python -m autoopt.cli replay "${common[@]}" --knobs benchmarks/knobs_best_static.json --report "$out/replay_static.json"
python -m autoopt.cli replay "${common[@]}" --knobs benchmarks/knobs_best_static.json --policy policies/shipped/h100-gpt2-small --report "$out/replay_policy.json"
python -m autoopt.cli replay "${common[@]}" --report "$out/replay_default.json"
python -m autoopt.cli calibrate --model "$model" --device "$device" --quick --budget-s 120 --no-progress --out "$out/profile.json" \
  || echo "calibrate: rc=$? (continuing)"
# a check that cannot run (rc 2: e.g. no rows, the budget cut the grid early) must not stop
# the sim_vs_live step below: report it and go on
for shipped in h100-gpt2-small-engine h100-gpt2-small; do
  python -m autoopt.cli calibrate check --profile "$shipped" --against "$out/profile.json" | tee "$out/check_$shipped.txt" \
    || echo "calibrate check against $shipped: rc=$? (continuing)"
done
python benchmarks/sim_vs_live.py --device cuda --calibrate --rounds 2 --report "$out/sim_vs_live_cuda.json" | tee "$out/sim_vs_live_cuda.txt"
