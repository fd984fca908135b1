#!/usr/bin/env bash
# Live replays of the Azure excerpt on the GPU engine (gpt2-small): the best-static knobs,
# the shipped guarded policy, a candidate policy ($CANDIDATE, an exported policy dir) and the defaults.
# The simulator's side of the same replay: autoopt replay ... --backend sim --profile P.
# Usage: OUT=DIR bash benchmarks/gpu_policies.sh [DEVICE] [MODEL] [SECONDS] [SPEEDUP] ["static ship exp default"]
set -uo pipefail
out=${OUT:-/tmp/out}; dev=${1:-cuda}; model=${2:-gpt2-small}; dur=${3:-30}; speedup=${4:-8}; only=${5:-static ship exp default}
mkdir -p "$out"
if ! python -c "import autoopt" 2>/dev/null; then mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/autoopt && export PYTHONPATH=/tmp/pkg; fi
export PYTHONUNBUFFERED=1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
common=(--trace azure-conv --model "$model" --device "$dev" --speedup "$speedup" --start 20 --duration "$dur" --slo-ttft-ms 500 --slo-tpot-ms 20 --max-slots 256)
for name in $only; do
  case $name in
    static) extra=(--knobs benchmarks/knobs_best_static.json);;
    ship) extra=(--knobs benchmarks/knobs_best_static.json --policy policies/shipped/h100-gpt2-small);;
    exp) extra=(--knobs benchmarks/knobs_best_static.json --policy "${CANDIDATE:-runs/exp1/policy}");;
    default) extra=();;
    *) echo "unknown name $name (known: static ship exp default); skipped"; continue;;
  esac
  t0=$(date +%s); timeout 150 python -m autoopt.cli replay "${common[@]}" "${extra[@]}" --report "$out/replay_$name.json" > "$out/log_$name.txt" 2>&1; echo "$name rc=$? $(( $(date +%s) - t0 ))s"; grep -E "goodput|SLO att|TTFT p99|TPOT p99|OOMs|requests|knobs " "$out/log_$name.txt"
done
