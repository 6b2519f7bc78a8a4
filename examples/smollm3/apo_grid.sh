#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The playbook's preference-optimization ablation: LR 5-20x below SFT's 1e-5 and beta over
# 0.01-0.5, each run a short APO-zero from the SFT checkpoint (STEPS, default 500), through
# megasmol ablate; compare them with `megasmol compare runs/apo-grid/*` (rewards/accuracies and
# the downstream scores of each run's checkpoints).
#   SLURM=1 bash examples/smollm3/apo_grid.sh      # write a Slurm array instead of running
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STEPS="${STEPS:-500}"
mode=(--run --nproc-per-node "${GPUS_PER_NODE}")
if [[ "${SLURM:-0}" == "1" ]]; then
    mode=(--slurm)
fi
run "${PYTHON}" -m megasmol ablate --config "${HERE}/apo.yaml" \
    --vary schedule.lr=5.0e-7,1.0e-6,2.0e-6 \
    --vary preference.beta=0.01,0.05,0.1,0.5 \
    --set "training.train_steps=${STEPS}" --set "schedule.warmup_steps=$((STEPS / 10))" \
    --set "checkpoint.init_from=${CKPT_DIR}/smollm3-3b-sft/checkpoints" \
    --set "data.tokenizer=${TOKENIZER}" \
    --out "${CKPT_DIR}/apo-grid" "${mode[@]}"
