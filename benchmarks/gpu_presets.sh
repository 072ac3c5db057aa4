#!/usr/bin/env bash
# The paper presets on one GPU in one call: eager and compiled, float32 and bf16 autocast (each case capped at
# 60-100 s; typically 5-8 minutes in all).
#   bash benchmarks/gpu_presets.sh [RESULTS_DIR]    # default benchmarks/results; each mode one JSON result
# Compiled density steps take the backprop gradient (the Neumann gradient does not compile yet). Every case runs
# in its own process with a time limit, so one slow compile costs its own row only (reported as failed).
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
flows="density:paper-mnist density:paper-cifar10"
classifiers="classify:paper-mnist classify:paper-cifar10"
run() {  # NAME SECONDS_PER_CASE ARGS...
  local name=$1 limit=$2
  shift 2
  timeout $((limit * 3)) python -m benchmarks.presets --device cuda --steps 10 --timeout "$limit" \
    --json "$out/presets-gpu-$name.json" "$@" || echo "$name: exit $?"
}
run eager-float32 60 --cases $flows $classifiers
run eager-bf16 60 --amp --cases $flows $classifiers
run compiled-float32-flows 100 --compile --set gradient=backprop --cases $flows
run compiled-bf16-flows 100 --compile --amp --set gradient=backprop --cases $flows
run compiled-float32-classifiers 60 --compile --cases $classifiers
