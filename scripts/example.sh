#!/usr/bin/env bash
# Installs kvblend and what it needs on a fresh machine, then runs the blend
# example on the CPU with the real SmolLM2-135M-Instruct model through
# kvblend's built-in engine (examples/blend_builtin.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export LMCACHE_ENABLE_BLENDING=True LMCACHE_BLEND_SPECIAL_STR=" # # " LMCACHE_USE_LAYERWISE=True \
       LMCACHE_BLEND_CHECK_LAYERS=1 LMCACHE_BLEND_RECOMPUTE_RATIOS=0.15 LMCACHE_CHUNK_SIZE=256 \
       LMCACHE_LOCAL_CPU=True LMCACHE_MAX_LOCAL_CPU_SIZE=5
exec ${PYTHON:-python3} examples/blend_builtin.py "$@"
