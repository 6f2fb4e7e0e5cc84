#!/usr/bin/env bash
# Builds the pieces that carry vLLM 0.26.0 (CUDA 13 build, pins torch 2.11.0, Python 3.12) to the GPU
# machine, which reaches no package registry.  Run it here, where PyPI is reachable:
#   bash scripts/gpu_vllm_bundle.sh        -> .vllm_bundle/pieces/part.00, part.01, SHA256SUMS (git-ignored),
#                                             and the optional flashinfer.tar.xz + flashinfer.sha256
# The bundle holds the vllm package slimmed (no FA2 kernels, no Rust HTTP front end, no MoE ops, only the
# cp312 deep_gemm build) plus the pure-Python/cp312 wheels it imports, xz-compressed, split in two pieces
# under 60 MiB each.  On the GPU machine, with the pieces in one folder:
#   bash scripts/gpu_vllm_install.sh PIECES_DIR /root/vllm_site && source /root/vllm_site/env.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/.vllm_bundle}
# Dependency pins: the shared copy next to the repo if present, else the copy kept in scripts/.
REQ=$ROOT/../shared/tools/vllm-gpu/requirements-deps.txt
[ -f "$REQ" ] || REQ=$ROOT/scripts/vllm-gpu-requirements.txt
rm -rf "$OUT"/{wheel,site,deps,extras,pieces} "$OUT"/bundle.tar*
mkdir -p "$OUT"/{wheel,site,deps,extras,pieces}
# 1. vllm itself, unpacked and slimmed
pip download -q --no-deps -d "$OUT/wheel" vllm==0.26.0
python3 -m zipfile -e "$OUT"/wheel/vllm-0.26.0-*.whl "$OUT/site"
rm -f "$OUT"/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so "$OUT"/site/vllm/_moe_C_stable_libtorch.abi3.so
rm -rf "$OUT"/site/vllm/vllm-rs
find "$OUT"/site/vllm/third_party -name '_C.cpython-3*' ! -name '*cpython-312*' -delete 2>/dev/null || true
# 2. dependency wheels for cp312 / manylinux x86_64 (llguidance needs glibc 2.31 wheels)
PLAT=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux2010 \
         manylinux_2_5 manylinux1; do PLAT+=(--platform "${p}_x86_64"); done
DL=(pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}")
grep -v '^llguidance' "$REQ" > "$OUT/req.txt"
"${DL[@]}" -d "$OUT/deps" -r "$OUT/req.txt"
"${DL[@]}" --platform manylinux_2_31_x86_64 -d "$OUT/deps" "$(grep '^llguidance' "$REQ")"
# 3. extras: the installer, plus the smoke test and its tiny model config when the shared copy is there
cp "$ROOT/scripts/gpu_vllm_install.sh" "$OUT/extras/install_on_gpu.sh"
SHARED=$ROOT/../shared/tools/vllm-gpu
[ -f "$SHARED/smoke_test.py" ] && cp -r "$SHARED/smoke_test.py" "$SHARED/tiny-llama" "$OUT/extras/"
# 4. one reproducible tar, xz, split in two pieces with checksums
tar --sort=name --owner=0 --group=0 -C "$OUT" -cf "$OUT/bundle.tar" site deps extras
xz -9e -T1 -c "$OUT/bundle.tar" > "$OUT/bundle.tar.xz"
(cd "$OUT/pieces" && split -n 2 -d -a 2 ../bundle.tar.xz part. && sha256sum part.* > SHA256SUMS)
# 5. optional piece for vLLM's FLASHINFER backend: the flashinfer-python release vLLM pins (it
#    JIT-compiles its kernels with the machine's nvcc on first use, minutes, cached in
#    ~/.cache/flashinfer) and what its import needs beyond the bundle (NVML bindings, ninja)
FI=$(sed -n 's/^Requires-Dist: flashinfer-python==\([0-9.]*\).*/\1/p' "$OUT"/site/vllm-0.26.0.dist-info/METADATA)
[ -n "$FI" ] || { echo "vllm's METADATA names no flashinfer-python pin" >&2; exit 1; }
rm -rf "$OUT/flashinfer" && mkdir -p "$OUT/flashinfer"
"${DL[@]}" -d "$OUT/flashinfer" "flashinfer-python==$FI" nvidia-ml-py ninja
tar --sort=name --owner=0 --group=0 -C "$OUT" -cJf "$OUT/pieces/flashinfer.tar.xz" flashinfer
(cd "$OUT/pieces" && sha256sum flashinfer.tar.xz > flashinfer.sha256)
ls -la "$OUT/pieces"
