#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The SmolLM3 flow at CPU size, end to end on one machine: data, pre-flight, stage 1, stage 2
# (the same run resumed into its decay stage), the long-context stage, export, passkey check.
#   bash examples/tiny/run_all.sh                       # ~7 min on 2 cores
#   STEPS=40 STAGE1_STEPS=20 LC_STEPS=4 bash examples/tiny/run_all.sh   # a quick pass
# Settings (environment): WORKDIR=runs/tiny-flow, STEPS=150 (stage 2 ends there), STAGE1_STEPS=100,
# LC_STEPS=60, NPROC=1 (2 runs the training under torchrun: data parallelism for stages 1-2 and
# context parallelism for the long-context stage, as SmolLM3 did), DRY_RUN=1 prints the commands,
# PYTHON=python, CORPUS_ARGS="--code-mb 0.5 --math-problems 2000" (extra demo-corpus arguments: a
# smaller corpus for a quick pass).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"
WORKDIR="${WORKDIR:-${REPO}/runs/tiny-flow}"
STEPS="${STEPS:-150}"
STAGE1_STEPS="${STAGE1_STEPS:-100}"
LC_STEPS="${LC_STEPS:-60}"
NPROC="${NPROC:-1}"
PYTHON="${PYTHON:-python}"
read -r -a CORPUS_EXTRA <<< "${CORPUS_ARGS:-}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

# shellcheck source=../lib/run.sh
source "${REPO}/examples/lib/run.sh"

megasmol_train() {
    if [[ "${NPROC}" -gt 1 ]]; then
        run "${PYTHON}" -m torch.distributed.run --nproc_per_node "${NPROC}" -m megasmol train "$@"
    else
        run "${PYTHON}" -m megasmol train "$@"
    fi
}

TOKENS="${WORKDIR}/corpus/tokens"
BASE=(--config "${HERE}/demo.yaml" --set "run_dir=${WORKDIR}/pretrain" --set "data.root=${TOKENS}"
      --set "training.train_steps=${STEPS}")
LONG=(--config "${HERE}/long_context.yaml" --set "run_dir=${WORKDIR}/long_context"
      --set "data.root=${TOKENS}" --set "training.train_steps=${LC_STEPS}"
      --set "checkpoint.init_from=${WORKDIR}/pretrain/checkpoints")
if [[ "${NPROC}" -gt 1 ]]; then
    # Data parallel ranks split the demo's 4 sequences per step; CP ranks split each sequence.
    BASE+=(--set "training.micro_batch_size=1")
    LONG+=(--set "parallel.context_parallel=${NPROC}")
fi
if [[ "${LC_STEPS}" -lt 20 ]]; then
    LONG+=(--set "schedule.warmup_steps=1" --set "eval.interval=0" --set "checkpoint.interval=0")
fi
if [[ "${STEPS}" -lt 100 ]]; then
    BASE+=(--set "schedule.warmup_steps=5" --set "eval.interval=0" --set "checkpoint.interval=0"
           --set "eval.tasks=[demo_word_order]" --set "eval.tasks_limit=20")
fi

# 1. Data: the embedded demo corpus, tokenized with the Llama-3.2 tokenizer.
run "${PYTHON}" -m megasmol demo-corpus --out "${WORKDIR}/corpus" --tokenize --quiet "${CORPUS_EXTRA[@]}"
# 2. Pre-flight (CPU scale: a short burn, and a write floor for a laptop disk rather than a
#    cluster's store). It audits the data too; the few-MB corpus is too small to time its reads.
run "${PYTHON}" -m megasmol preflight "${BASE[@]}" --burn-seconds 1 --min-write-gbps 0.01 \
    --json "${WORKDIR}/preflight.json"
# 3. Stage 1 (stable mixture) stops at its last step; 4. stage 2 resumes the same run to the end.
megasmol_train "${BASE[@]}" --set "training.stop_after_step=${STAGE1_STEPS}"
megasmol_train "${BASE[@]}"
# 5. Long context: 1024 tokens, RoPE theta 500k, weights only from stage 2.
megasmol_train "${LONG[@]}"
# 6. Export to Hugging Face format and check retrieval at the new length.
run "${PYTHON}" -m megasmol export-hf --checkpoint "${WORKDIR}/long_context/checkpoints" \
    --out "${WORKDIR}/hf" --overwrite --quiet
run "${PYTHON}" -m megasmol eval passkey --hf "${WORKDIR}/hf" --lengths 256,1000 --depths 0,0.5,1 \
    --trials 2 --out "${WORKDIR}/passkey" --quiet
