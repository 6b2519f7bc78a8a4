"""Preference optimization against the reference implementation: one optimizer step of megasmol
(packed pairs, precomputed reference log-probs, Megatron-Core) and one of TRL's ``DPOTrainer``
(padded pairs, a live reference model, transformers) on the same tiny model and data give the same
loss, metrics and update; the precomputed reference log-probs equal transformers' per-token
log-probs summed over each completion."""

import json
import random

import numpy as np
import pytest
import torch

from megasmol.convert.export import export_hf
from megasmol.data.preference.prepare import prepare_preferences
from megasmol.model.init import init_checkpoint
from tests.conftest import run_cli
from tests.specs import tiny_smollm3

LR, EPS = 1.0, 1.0  # with Adam's eps = 1 the first update is -lr g / (|g| + 1): gradients compare


def _pairs(count: int, seed: int) -> list[dict]:
    """TRL's standard (plain string) format: no template, so both sides tokenize identically."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        wrong = a + b + rng.randint(1, 9)
        out.append({"prompt": f"Question: what is {a} plus {b}? Answer:",
                    "chosen": f" {a} plus {b} is {a + b}.", "rejected": f" It is {wrong}, I think."})
    return out


@pytest.fixture(scope="module")
def parity_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref-trl")
    init_checkpoint(tiny_smollm3(), root / "sft", seed=11)
    records = _pairs(6, seed=3)
    with open(root / "pairs.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    prepare_preferences([str(root / "pairs.jsonl")], str(root / "data" / "pref"), template="chatml",
                        show_progress=False)
    export_hf(root / "sft", root / "sft-hf", show_progress=False)
    (root / "recipe.yaml").write_text("name: pref\nroot: data\nstages:\n  - name: apo\n    start_step: 1\n"
                                      "    datasets:\n      - {path: pref, weight: 1.0}\n")
    return root, records


def _megasmol_step(root, loss_type: str):
    run = root / f"run-{loss_type}"
    (root / f"{loss_type}.yaml").write_text(
        f"run_dir: run-{loss_type}\ncheckpoint: {{init_from: sft, interval: 0}}\n"
        "data: {recipe: recipe.yaml, seq_length: 512, validation_fraction: 0.0}\n"
        "training: {train_steps: 1, global_batch_size: 1, micro_batch_size: 1, precision: fp32}\n"
        f"schedule: {{kind: constant, lr: {LR}, warmup_steps: 0}}\n"
        f"optim: {{beta1: 0.9, beta2: 0.999, eps: {EPS}, weight_decay: 0.0, clip_grad: 0.0}}\n"
        f"preference: {{loss_type: {loss_type}, beta: 0.1}}\n"
        "logging: {interval: 1}\neval: {interval: 0}\n")
    run_cli("train", "--config", str(root / f"{loss_type}.yaml"))
    record = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["kind"] == "train")
    export_hf(run / "checkpoints", root / f"hf-{loss_type}", show_progress=False)
    return record


def _trl_step(root, records, loss_type: str, out):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(root / "data" / "pref.tokenizer")
    model = AutoModelForCausalLM.from_pretrained(root / "sft-hf", dtype=torch.float32)
    args = DPOConfig(output_dir=str(out), loss_type=[loss_type], beta=0.1, learning_rate=LR,
                     adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=EPS, weight_decay=0.0,
                     max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0, max_steps=1,
                     per_device_train_batch_size=len(records), gradient_accumulation_steps=1,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                     bf16=False, seed=0, dataloader_drop_last=False, max_length=None,
                     precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer)
    trainer.train()
    return trainer.state.log_history[0], trainer.model


def _weights(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


STEP_ONE = {"sigmoid": np.log(2), "apo_zero": 1.0, "apo_down": 1.0, "ipo": (1 / (2 * 0.1)) ** 2}


# ipo's and apo_down's formulas are checked by hand in test_preference_data.py; these run TRL for
# real on SmolLM3's loss (APO-zero) and DPO's.
@pytest.mark.parametrize("loss_type", ["apo_zero", "sigmoid"])
def test_one_step_equals_trl_dpo_trainer(parity_setup, loss_type, tmp_path):
    root, records = parity_setup
    ours = _megasmol_step(root, loss_type)
    theirs, trl_model = _trl_step(root, records, loss_type, tmp_path / "trl")
    # At step 1 the policy is the reference: ln 2 for DPO, 1 for APO, 1/(2 beta)^2 for IPO.
    assert ours["loss"] == pytest.approx(STEP_ONE[loss_type], abs=1e-6)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key
    # The update: both start from the same weights; the step's change must agree.
    start, mine = _weights(root / "sft-hf"), _weights(root / f"hf-{loss_type}")
    trl_state = trl_model.state_dict()
    compared = 0
    for name, before in start.items():
        if name not in trl_state:
            continue
        delta_ours, delta_trl = mine[name] - before, trl_state[name].detach().cpu() - before
        if delta_trl.abs().max() == 0:
            assert delta_ours.abs().max() < 1e-7, name
            continue
        error = ((delta_ours - delta_trl).norm() / delta_trl.norm()).item()
        assert error < 2e-3, (name, error)
        compared += 1
    assert compared >= 10


def test_reference_logps_equal_transformers(parity_setup):
    """The precomputed file holds, per pair, transformers' per-token log-probs of the reference
    model summed over each completion (TRL's ``logps``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    root, _ = parity_setup
    if not list((root / "data").glob("pref.ref-*.npy")):
        _megasmol_step(root, "sigmoid")
    (path,) = list((root / "data").glob("pref.ref-*.npy"))
    stored = np.load(path)
    model = AutoModelForCausalLM.from_pretrained(root / "sft-hf", dtype=torch.float32).eval()
    tokens = IndexedDataset(str(root / "data" / "pref"))
    masks = IndexedDataset(str(root / "data" / "pref_lossmask"))
    assert stored.shape == (len(tokens) // 2, 2)
    for pair in range(stored.shape[0]):
        for half in (0, 1):
            ids = torch.from_numpy(tokens[2 * pair + half].astype(np.int64)).unsqueeze(0)
            mask = torch.from_numpy(masks[2 * pair + half].astype(np.float64))
            with torch.no_grad():
                logits = model(ids).logits[0, :-1].double()
            per_token = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
            expected = (per_token * mask[1:]).sum().item()
            assert stored[pair, half] == pytest.approx(expected, abs=1e-4), (pair, half)
