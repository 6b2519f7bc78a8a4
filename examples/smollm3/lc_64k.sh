#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# SmolLM3-3B long context 32k -> 64k: RoPE theta 5M, TP2 x CP4 x DP12 (96 GPUs: NNODES=12),
# weights only from the 32k stage. Settings: common.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_stage "${HERE}/lc_64k.yaml" smollm3-3b-lc64k smollm3-3b-lc32k
