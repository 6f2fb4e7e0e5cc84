#!/bin/bash
# One call on the GPU machine (which reaches no package registry): blending
# through vLLM 0.26 with its defaults, against the same vLLM without
# kvblend.  Steps (each skipped when already done on this machine):
#   1. the bundle's pieces (carried one per call into /root/pieces, see
#      scripts/gpu_vllm_bundle.sh; flashinfer.tar.xz with flashinfer.sha256
#      too for the FLASHINFER backend) are installed into /root/vllm_site;
#   2. kvblend is built with CUDA (libraries from .debs/, scripts/gpu_env.sh);
#   3. RUNS (space-separated, e.g. "baseline:FLASH_ATTN blend:FLASH_ATTN:gpu";
#      a fourth field, comma-separated flags: "timing" logs each blend's device
#      time per phase, "compile" / "eager" turn the compiled layer pieces on /
#      off (default: the product's, eager under vLLM), "fa3" takes
#      the FlashAttention 3 subset attention) of
#      benchmarks/bench_vllm_gpu.py, each in its own process, and the
#      GPU pytest of the vLLM path when PYTEST=1.
# Results: $OUT/summary.txt, one JSON per run, the logs, table.md.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
S="$OUT/summary.txt"
if [ ! -f /root/vllm_site/env.sh ]; then
  ls /root/pieces/part.* >/dev/null 2>&1 || { echo "no pieces in /root/pieces" | tee -a "$S"; exit 1; }
  bash scripts/gpu_vllm_install.sh /root/pieces /root/vllm_site > "$OUT/install.log" 2>&1
  echo "vllm install rc=$? $(date -u +%T)" | tee -a "$S"
fi
source /root/vllm_site/env.sh
[ -d /tmp/debroot ] && export LD_LIBRARY_PATH=/tmp/debroot/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
if ! python3 -c "import kvblend._clib as c; assert c.has_cuda()" 2>/dev/null; then
  source scripts/gpu_env.sh
  KVB_CUDA=ON KVB_BUILD_DIR=/tmp/bgpu KVB_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 $KVB_DEB_CMAKE_ARGS" \
    python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1
  echo "kvblend build rc=$? $(date -u +%T)" | tee -a "$S"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$S" 2>&1
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >> "$S" 2>&1
for spec in ${RUNS:-}; do
  IFS=: read -r run backend tier flags <<< "$spec"
  name="$run-$backend${tier:+-$tier}${flags:+-${flags//,/-}}"
  extra=()
  [[ ",$flags," == *,timing,* ]] && extra+=(--timing)
  [[ ",$flags," == *,eager,* ]] && extra+=(--compile off)
  [[ ",$flags," == *,compile,* ]] && extra+=(--compile on)
  [[ ",$flags," == *,fa3,* ]] && extra+=(--subset-attention fa3)
  timeout ${RUN_TIMEOUT:-420} python3 benchmarks/bench_vllm_gpu.py --run "$run" --backend "$backend" \
    --tier "${tier:-gpu}" "${extra[@]}" --json "$OUT/$name.json" ${BENCH_ARGS:-} \
    > "/tmp/$name.log" 2>&1
  echo "$name rc=$? $(date -u +%T)" | tee -a "$S"
  grep -o "segments hit.*device ms.*" "/tmp/$name.log" | sed "s/^/$name: /" >> "$OUT/phases.log"
  grep -m3 -E "kvblend: (attention backend|worker|blending)" "/tmp/$name.log" >> "$OUT/runs.log"
  grep -E "kvblend|Error|error|WARN" "/tmp/$name.log" | grep -v "Route:" | tail -16 >> "$OUT/runs.log"
  tail -40 "/tmp/$name.log" > "$OUT/last_run.log"
done
if [ "${PYTEST:-0}" = 1 ]; then
  (cd tests && timeout ${PYTEST_TIMEOUT:-300} python3 -m pytest -q gpu/test_vllm_gpu.py -rs -p no:cacheprovider) \
    > "$OUT/pytest_vllm_gpu.log" 2>&1
  echo "pytest vllm gpu rc=$? $(date -u +%T)" | tee -a "$S"
  tail -5 "$OUT/pytest_vllm_gpu.log"
fi
ls "$OUT"/*.json >/dev/null 2>&1 && python3 benchmarks/bench_vllm_gpu.py --table "$OUT"/*.json > "$OUT/table.md"
cat "$S"; cat "$OUT/table.md" 2>/dev/null; tail -12 "$OUT/phases.log" 2>/dev/null
tail -30 "$OUT/runs.log" 2>/dev/null
