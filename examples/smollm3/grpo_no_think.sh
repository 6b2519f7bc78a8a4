#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# SmolLM3-3B GRPO on the /no_think mode with DAPO's overlong penalty, from the APO run; 8 GPUs
# of data parallelism. Settings: common.sh; data: data/smollm3-grpo-no-think.yaml (prepare it
# with megasmol prepare-prompts --template-kwarg enable_thinking=false).
#   bash examples/smollm3/grpo_no_think.sh                  # the run (rewards.overlong.l_max 3072)
#   GRID=1 bash examples/smollm3/grpo_no_think.sh           # the playbook's sweep: l_max 1,536-4,096
#   GRID=1 SLURM=1 bash examples/smollm3/grpo_no_think.sh   # the sweep as a Slurm array
# The sweep runs STEPS steps each (default 400) through megasmol ablate; then
#   megasmol compare ${CKPT_DIR}/grpo-no-think-grid --x steps
# tabulates reward, math reward, overlong penalty and completion length per l_max and plots
# reward.png and completion_length.png (mean length per step, shaded from min to max).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ "${GRID:-0}" != "1" ]]; then
    launch_stage "${HERE}/grpo_no_think.yaml" smollm3-3b-grpo-no-think smollm3-3b-apo
    exit 0
fi
STEPS="${STEPS:-400}"
mode=(--run --nproc-per-node "${GPUS_PER_NODE}")
if [[ "${SLURM:-0}" == "1" ]]; then
    mode=(--slurm)
fi
run "${PYTHON}" -m megasmol ablate --config "${HERE}/grpo_no_think.yaml" \
    --vary rewards.overlong.l_max=1536,2048,2560,3072,3584,4096 \
    --set "training.train_steps=${STEPS}" \
    --set "checkpoint.init_from=${CKPT_DIR}/smollm3-3b-apo/checkpoints" \
    --set "data.tokenizer=${TOKENIZER}" \
    --out "${CKPT_DIR}/grpo-no-think-grid" "${mode[@]}"
