#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# SmolLM3-3B APO-zero preference optimization from the SFT run; TP2 x CP4 (8 GPUs per replica).
# Settings: common.sh; data: data/smollm3-apo.yaml (prepare it with megasmol prepare-preferences).
# Then: merge.sh (soup + linear merge with the mid-training checkpoint).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_stage "${HERE}/apo.yaml" smollm3-3b-apo smollm3-3b-sft
