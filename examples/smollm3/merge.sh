#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# SmolLM3's final merge (../shared/reference/evaluation-and-ablations.md): a uniform soup of the
# preference-tuned checkpoints, then a linear merge 0.9 x soup + 0.1 x the mid-training
# checkpoint (which restored long-context scores APO had lost), then one table scoring the SFT,
# APO and merged models on downstream tasks (TASKS) and passkey retrieval at long length.
#   APO_CHECKPOINTS="runs/smollm3-3b-apo/checkpoints/iter_0004500 ..." bash examples/smollm3/merge.sh
# (default: every checkpoint the APO run kept). Single process: averaging reads one block at a time.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

APO_RUN="${CKPT_DIR}/smollm3-3b-apo"
MID="${MID:-${CKPT_DIR}/smollm3-3b-mid-training/checkpoints}"
SFT="${SFT:-${CKPT_DIR}/smollm3-3b-sft/checkpoints}"
OUT="${OUT:-${CKPT_DIR}/smollm3-3b-merged}"
TASKS="${TASKS:-hellaswag,arc_easy,arc_challenge,piqa,winogrande}"
PASSKEY_LENGTH="${PASSKEY_LENGTH:-65536}"
LIMIT="${LIMIT:-500}"
if [[ -n "${APO_CHECKPOINTS:-}" ]]; then
    read -r -a soup <<< "${APO_CHECKPOINTS}"
else
    soup=()
    for iteration in "${APO_RUN}"/checkpoints/iter_*; do
        [[ -d "${iteration}" && "${iteration}" != *.partial ]] && soup+=("${iteration}")
    done
fi
if [[ "${#soup[@]}" -eq 0 && "${DRY_RUN:-0}" != "1" ]]; then
    echo "merge.sh: no APO checkpoints under ${APO_RUN}/checkpoints (set APO_CHECKPOINTS)" >&2
    exit 2
fi

evaluated=()
run "${PYTHON}" -m megasmol average --checkpoints "${soup[@]}" --out "${OUT}-soup"
run "${PYTHON}" -m megasmol average --checkpoints "${OUT}-soup" "${MID}" --weights 0.9 0.1 --out "${OUT}"
for model in "${SFT}" "${OUT}-soup" "${OUT}"; do
    name="$(basename "$(dirname "${model}")")"
    [[ "${model}" == "${OUT}"* ]] && name="$(basename "${model}")"
    run "${PYTHON}" -m megasmol eval tasks --checkpoint "${model}" --tasks "${TASKS}" --limit "${LIMIT}" \
        --out "${CKPT_DIR}/merge-eval/${name}"
    run "${PYTHON}" -m megasmol eval passkey --checkpoint "${model}" --lengths "${PASSKEY_LENGTH}" \
        --out "${CKPT_DIR}/merge-eval/${name}"
    evaluated+=("${CKPT_DIR}/merge-eval/${name}")
done
run "${PYTHON}" "${REPO}/tools/score_table.py" "${evaluated[@]}"
