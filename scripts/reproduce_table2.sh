#!/usr/bin/env bash
# scripts/reproduce_table2.sh [overrides...]     e.g. scripts/reproduce_table2.sh trainer.steps=400
#
# The paper's Table 2 grid on the CPU default: divergence {reverse_kl, forward_kl, js} x
# estimator {stopgrad, unbiased} x seeds {0, 1, 2}, two jobs at a time with one thread each
# (joblib launcher), then the ablation table and the learning curves of the sweep.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-multirun/table2_$(date +%Y%m%d_%H%M%S)}
start=$(date +%s)
OMP_NUM_THREADS=1 opdx train -m experiment=table2 hydra/launcher=joblib hydra.launcher.n_jobs=2 \
  runtime.threads=1 hydra.sweep.dir="$out" "$@" \
  || echo "some runs of the sweep failed: the table below marks them incomplete"
opdx table "$out"
opdx plot "$out" --out "$out"
echo "sweep in $out; wall time $(( $(date +%s) - start )) s"
