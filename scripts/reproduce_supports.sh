#!/usr/bin/env bash
# scripts/reproduce_supports.sh [overrides...]     e.g. scripts/reproduce_supports.sh divergence=forward_kl
#
# The supports' comparison on the CPU default: the Table 2 grid (divergence {reverse_kl,
# forward_kl, js} x estimator {stopgrad, unbiased} x seeds {0, 1, 2}) on each support: sampled,
# topk with K = 4 and 16, full. Two jobs at a time with one thread each (joblib launcher), then
# one table per divergence with a row per support and each cell's seconds per step.
# SUPPORTS="topk full" runs only those (an existing Table 2 sweep is the sampled one).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-multirun/supports_$(date +%Y%m%d_%H%M%S)}
start=$(date +%s)
sweep() {  # sweep <name> <overrides...>
  OMP_NUM_THREADS=1 opdx train -m experiment=table2 logger.group=supports hydra/launcher=joblib \
    hydra.launcher.n_jobs=2 runtime.threads=1 hydra.sweep.dir="$out/$1" "${@:2}" \
    || echo "some runs of the $1 sweep failed: the table below marks them incomplete"
}
for support in ${SUPPORTS:-sampled topk full}; do
  case $support in
    topk) sweep topk estimator.support=topk estimator.top_k=4,16 "$@" ;;
    *) sweep "$support" estimator.support="$support" "$@" ;;
  esac
done
opdx table "$out" --rows support --facet divergence --step-time
echo "sweep in $out; wall time $(( $(date +%s) - start )) s"
