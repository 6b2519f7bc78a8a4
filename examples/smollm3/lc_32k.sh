#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# SmolLM3-3B long context 4k -> 32k: RoPE theta 2M, TP2 x CP4 x DP12 (96 GPUs: NNODES=12),
# weights only from the end of stage 3 (optimizer and schedule start fresh). Settings: common.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_stage "${HERE}/lc_32k.yaml" smollm3-3b-lc32k smollm3-3b-pretrain
