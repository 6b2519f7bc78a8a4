#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# SmolLM3-3B SFT (SmolLM3 chat template, assistant-only loss, packed), weights only from the
# mid-training run; TP2 x CP4 x DP8 (64 GPUs: NNODES=8). Settings: common.sh; data:
# data/smollm3-sft.yaml (prepare it with megasmol prepare-chat --template smollm3).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_stage "${HERE}/sft.yaml" smollm3-3b-sft smollm3-3b-mid-training
