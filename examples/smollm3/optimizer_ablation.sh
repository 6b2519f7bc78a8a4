#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The playbook's optimizer ablation before SmolLM3: AdamW (beta 0.9/0.95, WD 0.1, clip 1) vs
# AdEMAMix vs Muon, each with an LR sweep and two seeds, on the pretraining config cut to a
# short run (STEPS, default 20,000 steps of 2.4M tokens = 47B tokens; the playbook: 1B params on
# 100B tokens), through megasmol ablate. Muon runs Muon on the hidden matrices and AdamW on the
# embeddings, norms and output layer with the same LR and weight decay (update-RMS matched).
# Compare them with `megasmol compare runs/optimizer-grid/*`: final loss per optimizer and LR as
# mean +- std over the seeds, distance from the baseline in seed-noise units, and the runs that
# diverged. What the playbook found: tuned Muon beat AdamW but was LR-sensitive and diverged
# more often; AdEMAMix came close with less sensitivity; SmolLM3 shipped with AdamW.
#   SLURM=1 bash examples/smollm3/optimizer_ablation.sh      # write a Slurm array instead
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STEPS="${STEPS:-20000}"
mode=(--run --nproc-per-node "${GPUS_PER_NODE}")
if [[ "${SLURM:-0}" == "1" ]]; then
    mode=(--slurm)
fi
run "${PYTHON}" -m megasmol ablate --config "${HERE}/pretrain.yaml" \
    --vary optim.name=adamw,ademamix,muon \
    --vary schedule.lr=1.0e-4,2.0e-4,4.0e-4,8.0e-4 \
    --seeds 2 \
    --set "training.train_steps=${STEPS}" --set "schedule.warmup_steps=$((STEPS / 10))" \
    --set "schedule.decay_steps=$((STEPS / 10))" \
    --set "data.tokenizer=${TOKENIZER}" \
    --out "${CKPT_DIR}/optimizer-grid" "${mode[@]}"
