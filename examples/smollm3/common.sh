#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Shared by the SmolLM3 stage scripts (sourced, not run). Every setting comes from the
# environment, with these defaults:
#
#   cluster   NNODES=1  GPUS_PER_NODE=8  NODE_RANK=0  MASTER_ADDR=localhost  MASTER_PORT=29500
#   paths     DATA_ROOT=$SMOLLM3_DATA (tokenized datasets the recipes name)
#             CKPT_DIR=runs (one run directory per stage below it)
#             TOKENIZER=auto (copied into checkpoints: chat data's own, else the bundled one;
#               bundled or a directory work too)
#   run       OVERRIDES="key=value ..." (extra `--set`s for the run config)
#             PREFLIGHT_LEVEL=quick; SKIP_PREFLIGHT=1 skips it (not recommended)
#             DRY_RUN=1 prints every command instead of running it
#
# Run the script on every node (or use examples/slurm/smollm3.sbatch, which does).

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"

NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"
DATA_ROOT="${DATA_ROOT:-${SMOLLM3_DATA:-}}"
CKPT_DIR="${CKPT_DIR:-${REPO}/runs}"
TOKENIZER="${TOKENIZER:-auto}"
OVERRIDES="${OVERRIDES:-}"
PREFLIGHT_LEVEL="${PREFLIGHT_LEVEL:-quick}"
SKIP_PREFLIGHT="${SKIP_PREFLIGHT:-0}"
PYTHON="${PYTHON:-python}"

# Megatron-Core wants one hardware queue per device so that tensor/sequence-parallel
# communication kernels are scheduled in issue order and overlap with compute as planned.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# Fail fast on a NCCL error (a dead peer) instead of hanging until the job's time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# One CPU thread per rank unless told otherwise: 8 ranks on a node share its cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
if [[ -n "${DATA_ROOT}" ]]; then
    export SMOLLM3_DATA="${DATA_ROOT}"
fi

# shellcheck source=../lib/run.sh
source "${REPO}/examples/lib/run.sh"

torchrun_args=(
    --nnodes "${NNODES}" --nproc_per_node "${GPUS_PER_NODE}" --node_rank "${NODE_RANK}"
    --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}"
)

# launch_stage CONFIG RUN_NAME [INIT_FROM_RUN] [extra --set values...]
launch_stage() {
    local config="$1" run_name="$2" init_from="${3:-}"
    shift 3 || shift $#
    local -a sets=(--set "run_dir=${CKPT_DIR}/${run_name}" --set "data.tokenizer=${TOKENIZER}")
    if [[ -n "${init_from}" ]]; then
        sets+=(--set "checkpoint.init_from=${CKPT_DIR}/${init_from}/checkpoints")
    fi
    local extra
    for extra in "$@"; do
        sets+=(--set "${extra}")
    done
    local -a user_sets
    read -r -a user_sets <<< "${OVERRIDES}"
    for extra in "${user_sets[@]}"; do
        sets+=(--set "${extra}")
    done
    if [[ "${SKIP_PREFLIGHT}" != "1" ]]; then
        run "${PYTHON}" -m torch.distributed.run "${torchrun_args[@]}" -m megasmol preflight \
            --config "${config}" "${sets[@]}" --level "${PREFLIGHT_LEVEL}" \
            --json "${CKPT_DIR}/${run_name}/preflight-node${NODE_RANK}.json"
    fi
    run "${PYTHON}" -m torch.distributed.run "${torchrun_args[@]}" -m megasmol train \
        --config "${config}" "${sets[@]}"
}
