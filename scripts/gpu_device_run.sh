#!/bin/bash
# One call on a GPU machine: build kvblend with CUDA, run the C GPU tests
# (plain and under compute-sanitizer memcheck, quick sizes), the GPU pytest
# suite and the benchmark.  Logs and results go to $OUT (default ./gpu_out).
# PYTEST=0 / BENCH=0 skip those parts, BENCH_TIMEOUT bounds the benchmark.
# At most 8 files come back: summary.txt, build.log (pip + ctest),
# pytest_gpu.log, bench.log, results.md, results.json, profile.txt (with
# --profile in BENCH_ARGS) and memcheck.log (SANITIZE=1, the default);
# TIERS=1 adds tiers.log and tiers.json (benchmarks/bench_tiers.py).
# Build dependencies missing on the machine may be brought as .deb files
# in .debs/ (scripts/gpu_env.sh).
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/summary.txt" 2>&1
echo "start $(date -u +%T)" >> "$OUT/summary.txt"
if ! command -v redis-server >/dev/null && [ -z "${KVB_REDIS_SERVER:-}" ]; then
  # a machine without a package registry cannot install it; .ci/run does
  export KVB_TEST_NO_REDIS=1
  echo "no redis-server: the remote tier's C tests are skipped" | tee -a "$OUT/summary.txt"
fi
rm -f /tmp/bgpu/CMakeCache.txt  # a warm machine's cache may hold another call's paths
KVB_CUDA=ON KVB_BUILD_DIR=/tmp/bgpu \
  KVB_CMAKE_ARGS="-DKVB_BUILD_TESTS=ON -DCMAKE_CUDA_ARCHITECTURES=90 $KVB_DEB_CMAKE_ARGS" \
  python3 -m pip install -q --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1
echo "pip rc=$?" | tee -a "$OUT/summary.txt"
(cd /tmp/bgpu && ctest --output-on-failure) >> "$OUT/build.log" 2>&1
echo "ctest rc=$?" | tee -a "$OUT/summary.txt"
if [ "${PYTEST:-1}" = 1 ]; then
  (cd tests && timeout 330 python3 -m pytest -q gpu -rs -p no:cacheprovider) > "$OUT/pytest_gpu.log" 2>&1
  echo "pytest gpu rc=$? $(date -u +%T)" | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/pytest_gpu.log"
fi
if [ "${BENCH:-1}" = 1 ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_gpu.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench rc=$? $(date -u +%T)" | tee -a "$OUT/summary.txt"
fi
if [ "${TIERS:-0}" = 1 ]; then
  timeout ${TIERS_TIMEOUT:-300} python3 benchmarks/bench_tiers.py --device cuda --synthetic \
    --repeat 5 --json "$OUT/tiers.json" > "$OUT/tiers.log" 2>&1
  echo "tiers bench rc=$? $(date -u +%T)" | tee -a "$OUT/summary.txt"
  tail -12 "$OUT/tiers.log"
fi
if [ "${SANITIZE:-1}" = 1 ]; then
  KVB_GPU_TEST_QUICK=1 timeout 120 compute-sanitizer --tool memcheck --leak-check full \
    /tmp/bgpu/tests/gpu/kvb_check_gpu > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?" | tee -a "$OUT/summary.txt"
  tail -5 "$OUT/memcheck.log"
fi
tail -40 "$OUT/bench.log"
