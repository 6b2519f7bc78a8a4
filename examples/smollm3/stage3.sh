#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# SmolLM3-3B pretraining, stage 3 (the decay, to step 4,720,000, ~1.2T tokens).
# Stages 1-3 are one run with one WSD schedule (examples/smollm3/pretrain.yaml); this script
# trains to the end of the run;
# the next script resumes the same run from its latest checkpoint. Settings: see common.sh.
#   NNODES=48 MASTER_ADDR=node001 NODE_RANK=$i DATA_ROOT=/data/smollm3 bash examples/smollm3/stage3.sh
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

launch_stage "${HERE}/pretrain.yaml" smollm3-3b-pretrain ""
