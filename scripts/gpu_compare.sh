#!/bin/bash
# Same-machine comparison of the built-in engine's GPU benchmark
# (benchmarks/bench_gpu.py) between a base tree and this one, so that a
# change is judged against a baseline measured on the same card, host and
# load rather than against another day's machine.
#   BASE=folder holding the base tree's sources, e.g.
#     mkdir _base && git archive REV | tar -x -C _base
#   STEP=build   builds both with CUDA into /tmp/site_base and /tmp/site_head
#   STEP=bench   runs each tree's bench_gpu.py ROUNDS times (default 2),
#                alternating base and head, with BENCH_ARGS (default
#                "--sizes 8192 --reps 5"); one JSON per run under $OUT
#   STEP=all     both (the default)
# On a warm machine the build step is skipped for a tree already built.
set -u
OUT=${OUT:-$PWD/gpu_out}
BASE=${BASE:?BASE must name the folder of the base tree}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source scripts/gpu_env.sh
S="$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$S" 2>&1
build() {  # build NAME FOLDER
  [ -f "/tmp/site_$1/kvblend/_clib.py" ] && return
  rm -f "/tmp/b_$1/CMakeCache.txt"
  (cd "$2" && KVB_CUDA=ON KVB_BUILD_DIR="/tmp/b_$1" \
     KVB_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 $KVB_DEB_CMAKE_ARGS" \
     python3 -m pip install -q --no-build-isolation --no-deps --target "/tmp/site_$1" .) \
    > "$OUT/build_$1.log" 2>&1
  echo "build $1 rc=$? $(date -u +%T)" | tee -a "$S"
}
if [ "${STEP:-all}" != bench ]; then
  build base "$BASE"
  build head .
fi
if [ "${STEP:-all}" != build ]; then
  for i in $(seq 1 "${ROUNDS:-2}"); do
    for name in base head; do
      dir=.; [ $name = base ] && dir=$BASE
      mkdir -p "$OUT/${name}_$i"
      (cd "$dir" && PYTHONPATH=/tmp/site_$name timeout ${BENCH_TIMEOUT:-240} python3 \
         benchmarks/bench_gpu.py --results '' --out "$OUT/${name}_$i" ${BENCH_ARGS:---sizes 8192 --reps 5}) \
        > "$OUT/${name}_$i/bench.log" 2>&1
      echo "bench $name round $i rc=$? $(date -u +%T)" | tee -a "$S"
      grep -E "^\| *[0-9]" "$OUT/${name}_$i/bench.log" | tail -3 | sed "s/^/$name $i: /" | tee -a "$S"
    done
  done
fi
