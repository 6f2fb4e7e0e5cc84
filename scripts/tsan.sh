#!/usr/bin/env bash
# Builds the Check suites with ThreadSanitizer (KVB_SANITIZE=thread) and
# runs them: the store's lock, the connector's separator lock and the CPU
# ops' thread pool are exercised by several threads (the stress suite most
# of all), and any data race or lock-order inversion fails the run.
#
#   KVB_TSAN_BUILD  build directory (build/tsan)
#   KVB_TSAN_CC     compiler (default: the system cc; gcc and clang both work)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=${KVB_TSAN_BUILD:-$ROOT/build/tsan}
JOBS=$(nproc 2>/dev/null || echo 2)

cc_opt=()
[ -n "${KVB_TSAN_CC:-}" ] && cc_opt=(-DCMAKE_C_COMPILER="$KVB_TSAN_CC")
echo "== Check suites (thread sanitizer) in $BUILD"
cmake -S . -B "$BUILD" -G Ninja "${cc_opt[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVB_BUILD_TESTS=ON \
      -DKVB_WERROR=ON -DKVB_CUDA=OFF -DKVB_PYTHON=OFF -DKVB_SANITIZE=thread >/dev/null
cmake --build "$BUILD" -j "$JOBS"
# Check forks a child per test (CK_FORK); TSan follows each child, and a
# report exits it with TSan's status 66, which Check records as an error.
# No suite is excluded.  KVB_STRESS_REQUESTS scales the stress suite.
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}"
(cd "$BUILD" && ctest --output-on-failure -j "$JOBS")
