#!/usr/bin/env bash
# Offline install of the slimmed vLLM 0.26.0 bundle (built by scripts/gpu_vllm_bundle.sh) on the GPU
# machine, which reaches no package registry.
# Usage:  bash scripts/gpu_vllm_install.sh [PIECES_DIR] [DEST]
#   PIECES_DIR  folder holding part.00, part.01, ... (default: ./pieces, else ./.vllm_bundle/pieces,
#               else the script's folder)
#   DEST        install root (default: /root/vllm_site)
#   PYTHON=...  interpreter to install into (default: python3; must be the one with torch 2.11 cu130)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PIECES="${1:-}"
if [ -z "$PIECES" ]; then
    if ls ./pieces/part.* >/dev/null 2>&1; then PIECES=./pieces
    elif ls ./.vllm_bundle/pieces/part.* >/dev/null 2>&1; then PIECES=./.vllm_bundle/pieces
    else PIECES="$HERE"; fi
fi
DEST="${2:-/root/vllm_site}"
PY="${PYTHON:-python3}"

ls "$PIECES"/part.* >/dev/null 2>&1 || { echo "no part.* files in $PIECES" >&2; exit 1; }
echo "== pieces: $(ls "$PIECES"/part.* | wc -l) in $PIECES ; dest: $DEST ; python: $($PY -c 'import sys;print(sys.executable, sys.version.split()[0])')"

# 1. verify (if SHA256SUMS was carried along) and unpack
if [ -f "$PIECES/SHA256SUMS" ]; then
    (cd "$PIECES" && sha256sum -c SHA256SUMS) || { echo "checksum mismatch: re-copy the bad piece(s)" >&2; exit 1; }
fi
mkdir -p "$DEST"
FIRST="$(ls "$PIECES"/part.* | head -1)"
MAGIC="$(head -c 6 "$FIRST" | od -An -tx1 | tr -d ' \n')"
case "$MAGIC" in
    28b52ffd*) COMP=zstd ;;
    fd377a585a00) COMP=xz ;;
    *) echo "unknown archive format (magic $MAGIC)" >&2; exit 1 ;;
esac
echo "== unpacking ($COMP) ..."
if [ "$COMP" = xz ]; then
    if command -v xz >/dev/null; then
        cat "$PIECES"/part.* | xz -dc -T0 | tar -x -C "$DEST"
    else  # fall back to Python's lzma
        cat "$PIECES"/part.* | "$PY" -c "import sys,tarfile; kw={'filter':'data'} if hasattr(tarfile,'data_filter') else {}; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sys.argv[1], **kw)" "$DEST"
    fi
else
    command -v zstd >/dev/null || { echo "zstd binary needed to unpack" >&2; exit 1; }
    cat "$PIECES"/part.* | zstd -dc --long=31 | tar -x -C "$DEST"
fi
SITE="$DEST/site"; DEPS="$DEST/deps"
test -d "$SITE/vllm" && test -d "$DEPS" || { echo "unpack failed" >&2; exit 1; }
# optional extra piece: the MoE kernels (vllm/_moe_C_stable_libtorch.abi3.so), only needed for MoE models
if [ -f "$PIECES/moe_C.tar.xz" ]; then
    echo "== adding optional MoE kernels"
    "$PY" -c "import sys,tarfile; kw={'filter':'data'} if hasattr(tarfile,'data_filter') else {}; tarfile.open(sys.argv[1]).extractall(sys.argv[2], **kw)" "$PIECES/moe_C.tar.xz" "$DEST"
fi

# optional extra piece: FlashInfer for vLLM's FLASHINFER backend (its wheels join the dependency wheels)
if [ -f "$PIECES/flashinfer.tar.xz" ]; then
    if [ -f "$PIECES/flashinfer.sha256" ]; then
        (cd "$PIECES" && sha256sum -c flashinfer.sha256) || { echo "flashinfer.tar.xz: checksum mismatch" >&2; exit 1; }
    fi
    echo "== adding FlashInfer"
    "$PY" -c "import sys,tarfile; kw={'filter':'data'} if hasattr(tarfile,'data_filter') else {}; tarfile.open(sys.argv[1]).extractall(sys.argv[2], **kw)" "$PIECES/flashinfer.tar.xz" "$DEST"
    cp "$DEST"/flashinfer/*.whl "$DEPS"/
fi

# 2. install the dependency wheels that are missing / too old / not importable
echo "== checking dependency wheels ..."
TODO="$("$PY" - "$DEPS" "$SITE" <<'PYEOF'
import glob, importlib.metadata as md, os, subprocess, sys, zipfile
from email.parser import Parser
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name as canon

deps, site = sys.argv[1], sys.argv[2]
def reqs_of(meta_text):
    out = []
    for r in Parser().parsestr(meta_text).get_all("Requires-Dist") or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req)
    return out
wheels = {}
for w in sorted(glob.glob(os.path.join(deps, "*.whl"))):
    z = zipfile.ZipFile(w)
    di = [n for n in z.namelist() if n.split("/")[0].endswith(".dist-info")][0].split("/")[0]
    meta = z.read(di + "/METADATA").decode()
    name = canon(Parser().parsestr(meta)["Name"])
    tops = set()
    if di + "/top_level.txt" in z.namelist():
        tops = {t.strip() for t in z.read(di + "/top_level.txt").decode().split() if t.strip()}
    if not tops:
        for n in z.namelist():
            first = n.split("/")[0]
            if first.endswith((".dist-info", ".data", ".libs")) or first == "__pycache__":
                continue
            tops.add(first[:-3] if first.endswith(".py") else first.split(".")[0])
    pub = sorted(t for t in tops if t.isidentifier() and not t.startswith("_")) or sorted(tops)
    wheels[name] = dict(path=w, tops=pub, reqs=reqs_of(meta))
vmeta = glob.glob(os.path.join(site, "vllm-*.dist-info", "METADATA"))[0]
specs = {n: [] for n in wheels}
for r in reqs_of(open(vmeta).read()):
    if canon(r.name) in specs:
        specs[canon(r.name)].append((r.specifier, "vllm"))

def import_ok(tops):
    code = "import " + ", ".join(tops)
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0

install = {}
changed = True
while changed:
    changed = False
    for n, w in wheels.items():
        if n in install:
            continue
        try:
            v = md.version(n)
        except md.PackageNotFoundError:
            v = None
        why = None
        if v is None:
            why = "not installed" + ("" if not import_ok(w["tops"]) else " (importable w/o metadata)")
        else:
            bad = [f"{s} ({src})" for s, src in specs[n] if not s.contains(v, prereleases=True)]
            if bad:
                why = f"installed {v} fails " + ", ".join(bad)
            elif not import_ok(w["tops"]):
                why = f"installed {v} but 'import {','.join(w['tops'])}' fails"
        if why:
            install[n] = why
            changed = True
            for r in w["reqs"]:   # the wheel we install may need newer deps
                if canon(r.name) in specs:
                    specs[canon(r.name)].append((r.specifier, n))
for n in wheels:
    print(("INSTALL " if n in install else "skip    ") + f"{n:24} " + (install.get(n) or "ok: " + md.version(n)), file=sys.stderr)
print(" ".join(wheels[n]["path"] for n in install))
PYEOF
)"
if [ -n "$TODO" ]; then
    echo "== pip install --no-index --no-deps $(echo $TODO | wc -w) wheel(s)"
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-index --no-deps $TODO
else
    echo "== all dependency wheels already satisfied"
fi
"$PY" -m pip check 2>/dev/null | grep -viE "^(vllm|torch|torchvision|torchaudio) " | sed 's/^/   pip check: /' || true

# 3. environment for offline use
cat > "$DEST/env.sh" <<EOF
export PYTHONPATH="$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
export VLLM_USE_FLASHINFER_SAMPLER=0   # the sampler stays PyTorch's (FlashInfer is optional, and JIT-compiles)
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
EOF
# shellcheck disable=SC1091
source "$DEST/env.sh"
echo "== environment written to $DEST/env.sh  (run: source $DEST/env.sh)"

# 4. smoke import
"$PY" -c "from vllm import LLM; import vllm; print(vllm.__version__)"
