#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# SmolLM3-3B pretraining, stage 1 (stable, steps 1-3,450,000, ~8.1T tokens).
# Stages 1-3 are one run with one WSD schedule (examples/smollm3/pretrain.yaml); this script
# trains up to the stage's last step and stops there (training.stop_after_step=3450000);
# the next script resumes the same run from its latest checkpoint. Settings: see common.sh.
#   NNODES=48 MASTER_ADDR=node001 NODE_RANK=$i DATA_ROOT=/data/smollm3 bash examples/smollm3/stage1.sh
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_stage "${HERE}/pretrain.yaml" smollm3-3b-pretrain "" training.stop_after_step=3450000
