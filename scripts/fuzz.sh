#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/fuzz_*.c; CMake option KVB_FUZZ,
# clang with ASan and UBSan) and fuzzes every target at once, each for
# KVB_FUZZ_SECONDS (default 60) seconds, so the whole run takes about that
# long after the build whatever the number of cores.
#
# Each target first replays tests/fuzz/crashes/<target>/ (inputs that once
# broke the library: a regression run) and its seed corpus; then it fuzzes a
# copy of tests/fuzz/corpus/<target>/ so the committed corpus never grows.
# Exits non-zero when any target crashes, naming the reproducer; replay it
# with `<build>/tests/fuzz/fuzz_<target> <file>`.
#
#   KVB_FUZZ_BUILD    build directory (build/fuzz)
#   KVB_FUZZ_SECONDS  fuzzing time per target (60)
#   KVB_FUZZ_CC       the clang to build with (clang)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=${KVB_FUZZ_BUILD:-$ROOT/build/fuzz}
SECS=${KVB_FUZZ_SECONDS:-60}
CC_FUZZ=${KVB_FUZZ_CC:-clang}
JOBS=$(nproc 2>/dev/null || echo 2)

# libFuzzer comes with clang (Debian's clang package ships it).
if ! command -v "$CC_FUZZ" >/dev/null; then
  echo "== installing clang (libFuzzer)"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq clang >/dev/null
  CC_FUZZ=clang
fi

echo "== building the fuzz targets ($CC_FUZZ) in $BUILD"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_C_COMPILER="$CC_FUZZ" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DKVB_FUZZ=ON -DKVB_WERROR=ON -DKVB_CUDA=OFF -DKVB_PYTHON=OFF -DKVB_BUILD_TESTS=OFF >/dev/null
cmake --build "$BUILD" -j "$JOBS"

TARGETS=()
for src in tests/fuzz/fuzz_*.c; do
  t=$(basename "$src" .c)
  TARGETS+=("${t#fuzz_}")
done

RUN="$BUILD/run"
rm -rf "$RUN"
mkdir -p "$RUN"
status=0

# Regression run: every known crash and every seed must pass.
echo "== replaying known crashes and seed corpora"
for t in "${TARGETS[@]}"; do
  dirs=("tests/fuzz/corpus/$t")
  if [ -d "tests/fuzz/crashes/$t" ] && [ -n "$(ls -A "tests/fuzz/crashes/$t")" ]; then
    dirs=("tests/fuzz/crashes/$t" "${dirs[@]}")
  fi
  if ! "$BUILD/tests/fuzz/fuzz_$t" -runs=0 "${dirs[@]}" >"$RUN/$t.replay.log" 2>&1; then
    echo "fuzz.sh: $t fails on a committed input; see $RUN/$t.replay.log" >&2
    tail -n 30 "$RUN/$t.replay.log" >&2
    status=1
  fi
done
[ "$status" = 0 ] || exit "$status"

echo "== fuzzing ${#TARGETS[@]} targets for ${SECS}s each, all at once"
pids=()
for t in "${TARGETS[@]}"; do
  mkdir -p "$RUN/$t/corpus" "$RUN/$t/artifacts"
  cp tests/fuzz/corpus/"$t"/* "$RUN/$t/corpus/"
  opts=(-max_total_time="$SECS" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1
        -artifact_prefix="$RUN/$t/artifacts/")
  [ -f "tests/fuzz/$t.dict" ] && opts+=(-dict="tests/fuzz/$t.dict")
  "$BUILD/tests/fuzz/fuzz_$t" "${opts[@]}" "$RUN/$t/corpus" >"$RUN/$t.log" 2>&1 &
  pids+=($!)
done

for i in "${!TARGETS[@]}"; do
  t=${TARGETS[$i]}
  rc=0
  wait "${pids[$i]}" || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$RUN/$t.log" | tail -n 1)
  found=$(ls -A "$RUN/$t/artifacts")
  if [ "$rc" != 0 ] || [ -n "$found" ]; then
    status=1
    echo "fuzz.sh: $t FAILED (exit $rc) after ${execs:-?} executions; log: $RUN/$t.log" >&2
    grep -E "^(==[0-9]+==ERROR|SUMMARY|fuzz_)|runtime error" "$RUN/$t.log" | head -n 5 >&2 || true
    for f in $found; do
      echo "  reproducer: $RUN/$t/artifacts/$f" >&2
      echo "  replay:     $BUILD/tests/fuzz/fuzz_$t $RUN/$t/artifacts/$f" >&2
    done
  else
    echo "fuzz.sh: $t ok: ${execs:-?} executions in ${SECS}s, corpus $(ls "$RUN/$t/corpus" | wc -l) inputs"
  fi
done
exit "$status"
