#!/bin/sh
# Fails when the shared object exports a defined dynamic symbol whose name
# does not start with kvb_ (the version script and hidden visibility must
# keep everything else local).
set -eu
lib="$1"
syms=$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -v '^$')
[ -n "$syms" ] || { echo "no exported symbols in $lib"; exit 1; }
bad=$(printf '%s\n' "$syms" | grep -v '^kvb_' || true)
if [ -n "$bad" ]; then
  echo "non-kvb_ symbols exported by $lib:"; printf '%s\n' "$bad"; exit 1
fi
echo "$(printf '%s\n' "$syms" | wc -l) symbols exported, all kvb_*"
