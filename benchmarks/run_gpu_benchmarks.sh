#!/usr/bin/env bash
# Every GPU benchmark in one go, for a lent GPU machine: each script's report goes to $OUT (default
# benchmarks/results/). The models are 7B-shaped (Q-ReAlign: 0.8B/9B-shaped) with random weights, so nothing is
# downloaded.
# Expects the project installed (pip install -e ".[test]") with a CUDA build of torch.
set -uo pipefail
cd "$(dirname "$0")/.."
# --tiny: every script on tiny models on this machine's CPU (what CI runs, so the GPU run does not fail on a typo).
if [[ "${1:-}" == "--tiny" ]]; then
    tiny=(--tiny); mini=(--shape tiny --device cpu); pro=(--shape tiny --device cpu); prefix=(--tiny)
else
    tiny=(); mini=(--shape 0.8b --device cuda --batch-size 16); pro=(--shape 9b --device cuda --batch-size 8 --images 24)
    prefix=(--device cuda)
fi
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1
status=0
run() {  # name, command...: keeps going after a failure so one broken script does not hide the others
    local name=$1; shift
    echo "== $name"
    "$@" > "$out/$name.txt" 2>&1 || { status=1; echo "   failed (see $out/$name.txt)"; }
    tail -n 30 "$out/$name.txt"
}
run gpu_score python benchmarks/gpu_score.py "${tiny[@]}" --out "$out/gpu_score.json"
run prefix_cache python benchmarks/bench_prefix_cache.py "${prefix[@]}"
run gpu_reward python benchmarks/gpu_reward.py "${tiny[@]}"
run gpu_guidance python benchmarks/gpu_guidance.py "${tiny[@]}"
run gpu_train python benchmarks/gpu_train.py "${tiny[@]}"
run qrealign_mini python benchmarks/bench_qrealign.py "${mini[@]}" --out "$out/qrealign_mini.json"
run qrealign_pro python benchmarks/bench_qrealign.py "${pro[@]}" --out "$out/qrealign_pro.json"
exit $status
