#!/usr/bin/env bash
# The GPU smoke test: random-weight Qwen3-shaped models (1.7B teacher, 0.6B student) trained for a
# few steps by `opdx train` on one GPU; each phase's planned and measured peak memory, the step
# time and tokens/s (scripts/gpu_smoke.py says more).
#
#   scripts/gpu_smoke.sh --fetch [--python-version 3.12]   # where a registry is reachable: wheels into .gpu_wheels/
#   scripts/gpu_smoke.sh           # on the GPU machine (torch and transformers installed, no network)
#   scripts/gpu_smoke.sh --small   # the same at small sizes on a CPU (tests/test_scripts.py)
#
# Without opdx's other dependencies importable, it installs .gpu_wheels/ into .gpu_site/ (no
# network, no dependencies resolved) and runs opdx from this checkout through PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu_wheels
SITE=.gpu_site
if [ "${1:-}" = "--fetch" ]; then
    shift
    exec python scripts/gpu_smoke.py --fetch "$WHEELS" "$@"
fi
if ! python -c "import hydra, omegaconf, pandas, reasoning_gym, psutil, tabulate" 2>/dev/null; then
    if [ ! -d "$WHEELS" ]; then
        echo "gpu_smoke: opdx's dependencies are not importable and $WHEELS/ is missing:" \
             "run scripts/gpu_smoke.sh --fetch where a package registry is reachable, and carry $WHEELS/ over" >&2
        exit 2
    fi
    python -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$WHEELS"/*
    export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
exec python scripts/gpu_smoke.py "$@"
