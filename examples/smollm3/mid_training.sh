#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# SmolLM3-3B reasoning mid-training (ChatML traces, loss on all tokens), weights only from the
# end of the 64k long-context stage; TP2 x CP4 x DP8 (64 GPUs: NNODES=8). Settings: common.sh;
# data: data/smollm3-mid-training.yaml (prepare it with megasmol prepare-chat --loss-on all).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_stage "${HERE}/mid_training.yaml" smollm3-3b-mid-training smollm3-3b-lc64k
