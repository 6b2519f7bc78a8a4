#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Export the final 64k checkpoint to Hugging Face format with YaRN factor 2 (128k at inference),
# then check retrieval. One process, no GPU needed for the export.
#   OUT=runs/SmolLM3-3B-hf (default)  CKPT_DIR, DRY_RUN, PYTHON: see common.sh
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

OUT="${OUT:-${CKPT_DIR}/SmolLM3-3B-hf}"
run "${PYTHON}" -m megasmol export-hf --checkpoint "${CKPT_DIR}/smollm3-3b-lc64k/checkpoints" \
    --out "${OUT}" --dtype bfloat16 --yarn-factor 2 --yarn-original-max-positions 65536
run "${PYTHON}" -m megasmol eval passkey --hf "${OUT}" --lengths 4k,16k,64k,128k --trials 5 \
    --out "${OUT}/passkey"
