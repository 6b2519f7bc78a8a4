"""Preference data and the pair objective without training: pairs read in TRL's formats with
completion-only masks and counted bad records, the objective by hand, the SmolLM3 APO scripts and
the merge's score table."""

import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megasmol.config.typed import ConfigError
from megasmol.data.preference.prepare import prepare_preferences, read_pref_description
from tests.conftest import REPO, run_cli


def _write(path, records):
    with open(path, "w") as handle:
        for record in records:
            handle.write(record if isinstance(record, str) else json.dumps(record))
            handle.write("\n")


def _msg(role, content):
    return {"role": role, "content": content}


def _halves(prefix):
    tokens, masks = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}_lossmask")
    return [(tokens[i].astype(np.int64), masks[i].astype(bool)) for i in range(len(tokens))]


def test_prepare_reads_trl_formats_and_masks_only_completions(tmp_path, llama_tokenizer_dir):
    from transformers import AutoTokenizer

    _write(tmp_path / "in.jsonl", [
        {"prompt": [_msg("user", "What is 2 + 3?")], "chosen": [_msg("assistant", "2 + 3 = 5.")],
         "rejected": [_msg("assistant", "2 + 3 = 6.")]},
        {"chosen": [_msg("system", "Be kind."), _msg("user", "Hi"), _msg("assistant", "Hello!")],
         "rejected": [_msg("system", "Be kind."), _msg("user", "Hi"), _msg("assistant", "Go away.")]},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    ])
    summary = prepare_preferences([str(tmp_path / "in.jsonl")], str(tmp_path / "out" / "p"),
                                  template="chatml", show_progress=False)
    assert summary.pairs == 3 and not summary.rejected
    assert read_pref_description(tmp_path / "out" / "p")["pairs"] == 3
    # Plain strings and conversations in one file are both kept, with one line saying so.
    assert summary.plain_pairs == 1
    assert [line for line in summary.lines() if "mixed formats" in line] == [
        "  note: mixed formats: 1 plain-string pair(s) (no chat template) and 2 conversation pair(s) "
        "(chatml): the model learns both prompt formats; prepare them apart if that is not meant"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "p.tokenizer")
    halves = _halves(tmp_path / "out" / "p")
    completions = [tok.decode(ids[mask]) for ids, mask in halves]
    assert completions == ["2 + 3 = 5.<|im_end|>", "2 + 3 = 6.<|im_end|>", "Hello!<|im_end|>",
                           "Go away.<|im_end|>", " blue.<|end_of_text|>", " green.<|end_of_text|>"]
    for (c_ids, c_mask), (r_ids, r_mask) in zip(halves[0::2], halves[1::2]):
        assert c_ids[-1] == r_ids[-1] == tok.eos_token_id  # each half is its own document
        first_c, first_r = np.argmax(c_mask), np.argmax(r_mask)
        assert first_c == first_r and np.array_equal(c_ids[:first_c], r_ids[:first_r])  # same prompt
    assert "Be kind." in tok.decode(halves[2][0])  # the implicit prompt keeps the system turn


def test_bad_pairs_are_counted_by_reason_and_all_bad_writes_nothing(tmp_path):
    good = {"prompt": [_msg("user", "q")], "chosen": [_msg("assistant", "a")],
            "rejected": [_msg("assistant", "b")]}
    _write(tmp_path / "in.jsonl", [
        good,
        {"prompt": [_msg("user", "q")], "chosen": [_msg("assistant", "same")],
         "rejected": [_msg("assistant", "same")]},
        {"chosen": [_msg("user", "x"), _msg("assistant", "a")],
         "rejected": [_msg("user", "y"), _msg("assistant", "b")]},
        {"prompt": [_msg("user", "q")], "chosen": [_msg("assistant", " ")],
         "rejected": [_msg("assistant", "b")]},
        {"prompt": [_msg("user", "q")], "chosen": [_msg("wizard", "a")],
         "rejected": [_msg("assistant", "b")]},
        {"prompt": [_msg("user", "q")], "rejected": [_msg("assistant", "b")]},
        {"prompt": "q", "chosen": [_msg("assistant", "a")], "rejected": "b"},
        "{not json",
    ])
    summary = prepare_preferences([str(tmp_path / "in.jsonl")], str(tmp_path / "p"), template="chatml",
                                  show_progress=False)
    assert summary.pairs == 1 and not any("mixed formats" in line for line in summary.lines())
    assert summary.rejected == {"chosen_equals_rejected": 1, "prompt_not_a_prefix": 1,
                                "empty_completion": 1, "unknown_role": 1, "missing_field": 1,
                                "mixed_formats": 1, "malformed_json": 1}
    assert summary.rejected_examples["unknown_role"].endswith("in.jsonl:5")
    _write(tmp_path / "bad.jsonl", ['{"prompt": "q"}', "{broken"])
    with pytest.raises(ConfigError, match="no usable pair.*missing_field=1.*nothing was written"):
        prepare_preferences([str(tmp_path / "bad.jsonl")], str(tmp_path / "q"), show_progress=False)
    assert not list(tmp_path.glob("q*"))


def test_an_out_under_a_file_or_in_a_checkpoint_is_one_line(tmp_path):
    """--out FILE/p (and FILE/sub/p) names --out instead of a raw [Errno 17] / [Errno 20]; a
    prefix in a checkpoint's iteration directory is refused, as init, import-hf and average
    refuse it (check_output_dir); nothing is written."""
    from megasmol.ckpt.checkpoint import check_output_dir

    good = {"prompt": [_msg("user", "q")], "chosen": [_msg("assistant", "a")],
            "rejected": [_msg("assistant", "b")]}
    _write(tmp_path / "in.jsonl", [good])
    proc = run_cli("prepare-preferences", "--input", str(tmp_path / "in.jsonl"), "--out",
                   str(tmp_path / "in.jsonl" / "p"), "--quiet", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"megasmol prepare-preferences: error: --out {tmp_path}/in.jsonl/p: {tmp_path}/in.jsonl is a "
        "file, not a folder; choose a prefix in a folder"]
    with pytest.raises(ConfigError, match=r"--out .*/in.jsonl/sub/p: .*/in.jsonl is a file"):
        prepare_preferences([str(tmp_path / "in.jsonl")], str(tmp_path / "in.jsonl" / "sub" / "p"),
                            template="chatml", show_progress=False)
    iteration = tmp_path / "ckpt" / "iter_0000010"
    iteration.mkdir(parents=True)
    (iteration / "megasmol.json").write_text('{"format": 1, "step": 10}')
    for out in (iteration / "p", iteration / "tokens" / "p"):
        with pytest.raises(ConfigError, match=f"--out {out}: inside checkpoint {iteration}, "):
            prepare_preferences([str(tmp_path / "in.jsonl")], str(out), template="chatml",
                                show_progress=False)
        with pytest.raises(FileExistsError, match=f"inside checkpoint {iteration}:"):
            check_output_dir(out.parent)
    assert sorted(p.name for p in iteration.iterdir()) == ["megasmol.json"]


def test_overflow_policies_keep_the_prompt_and_cut_completions(tmp_path):
    long_answer = " ".join(["word"] * 60)
    _write(tmp_path / "in.jsonl", [
        {"prompt": [_msg("user", "Say words.")], "chosen": [_msg("assistant", long_answer)],
         "rejected": [_msg("assistant", "No.")]},
        {"prompt": [_msg("user", " ".join(["prompt"] * 80))], "chosen": [_msg("assistant", "a")],
         "rejected": [_msg("assistant", "b")]},
    ])
    common = dict(template="chatml", max_length=32, show_progress=False)
    with pytest.raises(ConfigError, match="too_long=2"):
        prepare_preferences([str(tmp_path / "in.jsonl")], str(tmp_path / "e"), **common)
    summary = prepare_preferences([str(tmp_path / "in.jsonl")], str(tmp_path / "t"), on_overflow="truncate",
                                  **common)
    assert summary.pairs == 1 and summary.truncated == 1 and summary.rejected == {"prompt_too_long": 1}
    (c_ids, c_mask), (r_ids, r_mask) = _halves(tmp_path / "t")
    assert len(c_ids) == 32 and c_mask.sum() > 10 and not c_mask[-1]  # cut completion, EOS untrained
    assert np.array_equal(c_ids[:np.argmax(c_mask)], r_ids[:np.argmax(r_mask)])


def test_saved_datasets_and_per_record_template_kwargs(tmp_path):
    """A ``datasets`` save_to_disk copy is read like JSONL, and each record's
    ``chat_template_kwargs`` (SmolLM3's enable_thinking) reach the template."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    def record(thinking):
        return {"prompt": [_msg("user", "What is 2 + 3?")], "chosen": [_msg("assistant", "5")],
                "rejected": [_msg("assistant", "6")], "chat_template_kwargs": {"enable_thinking": thinking}}

    Dataset.from_list([record(True), record(False)]).save_to_disk(str(tmp_path / "saved"))
    summary = prepare_preferences([str(tmp_path / "saved")], str(tmp_path / "p"), template="smollm3",
                                  show_progress=False)
    assert summary.pairs == 2 and not summary.rejected
    tok = AutoTokenizer.from_pretrained(tmp_path / "p.tokenizer")
    think, no_think = (tok.decode(ids) for ids, _ in _halves(tmp_path / "p")[0::2])
    assert "/think" in think and "/no_think" in no_think


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero", "apo_down"])
def test_pair_objective_from_per_token_losses(megatron_runtime, loss_type):
    """The objective on a packed micro-batch of two pairs: per-document sums, TRL's pair losses,
    the RPO-style NLL term and TRL's metrics, by hand."""
    import torch
    import torch.nn.functional as F

    from megasmol.config.preference import PreferenceConfig
    from megasmol.data.masking import ModelInputs
    from megasmol.train.objectives import PreferenceLoss

    torch.manual_seed(0)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, -1]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0]], dtype=torch.float32)
    ref = torch.zeros(1, 13, dtype=torch.float64)
    ref[0, 2], ref[0, 5], ref[0, 9], ref[0, 11] = -3.0, -2.5, -4.0, -1.0
    ce = (torch.rand(1, 13, dtype=torch.float64) * 3).requires_grad_()
    inputs = ModelInputs(tokens=torch.zeros(1, 13, dtype=torch.long), position_ids=None, labels=None,
                         loss_mask=mask, segments=segments, ref_logps=ref)
    beta, weight = 0.3, 0.5
    objective = PreferenceLoss(PreferenceConfig(loss_type=loss_type, beta=beta, sft_weight=weight))
    loss, pairs, report = objective(inputs, ce)
    logp = [-(ce[0] * mask[0])[segments[0] == k].sum() for k in range(4)]
    counts = [mask[0][segments[0] == k].sum() for k in range(4)]
    refs = [-3.0, -2.5, -4.0, -1.0]
    expected, margins = 0.0, []
    for c, r in ((0, 1), (2, 3)):
        rc, rr = logp[c] - refs[c], logp[r] - refs[r]
        pair = {"sigmoid": -F.logsigmoid(beta * (rc - rr)),
                "ipo": (rc / counts[c] - rr / counts[r] - 1 / (2 * beta)) ** 2,
                "apo_zero": 1 - torch.sigmoid(beta * rc) + torch.sigmoid(beta * rr),
                "apo_down": torch.sigmoid(beta * rc) + 1 - torch.sigmoid(beta * (rc - rr))}[loss_type]
        expected = expected + pair + weight * (-logp[c] / counts[c])
        margins.append(beta * (rc - rr))
    assert int(pairs) == 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    means = objective.means(report["metrics"].tolist(), 2)
    assert means["rewards/margins"] == pytest.approx(sum(m.item() for m in margins) / 2, rel=1e-12)
    assert means["rewards/accuracies"] == sum(float(m > 0) for m in margins) / 2
    assert means["logps/chosen"] == pytest.approx((logp[0] + logp[2]).item() / 2, rel=1e-12)
    loss.backward()
    assert ce.grad[0, 12] == 0 and ce.grad[0, 0] == 0  # no document, no completion: no gradient


def test_score_table_puts_models_side_by_side(tmp_path):
    """merge.sh's last step: each model's task metrics and passkey accuracy in one row, and the
    change from the first to the last."""
    import subprocess
    import sys

    for name, acc, passkey in (("sft", 0.5, 0.8), ("merged", 0.6, 0.7)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"results": {"arc_easy": {"formulation": "cf", "examples": 10, "chance": 0.25, "acc": acc,
                                      "acc_stderr": 0.1}}}))
        (tmp_path / name / "passkey.json").write_text(json.dumps({"overall": passkey}))
    out = subprocess.run([sys.executable, str(REPO / "tools" / "score_table.py"), str(tmp_path / "sft"),
                          str(tmp_path / "merged")], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert "arc_easy acc" in lines[0] and "passkey accuracy" in lines[0]
    assert lines[2].split() == ["sft", "0.5000", "0.8000"]
    assert lines[-1].split() == ["last", "-", "first", "+0.1000", "-0.1000"]
    missing = subprocess.run([sys.executable, str(REPO / "tools" / "score_table.py"), str(tmp_path / "none")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "neither results.json nor passkey.json" in missing.stderr


def test_smollm3_apo_scripts_and_configs(tmp_path):
    from megasmol.config.run import load_run_config
    from tests.test_launch_scripts import _dry, _sets

    config = load_run_config(REPO / "examples" / "smollm3" / "apo.yaml")
    assert (config.preference.loss_type, config.preference.beta) == ("apo_zero", 0.1)
    assert (config.schedule.lr, config.optim.clip_grad, config.schedule.min_lr) == (1e-6, 0.2, 1e-7)
    _, train = _dry("examples/smollm3/apo.sh", CKPT_DIR=tmp_path)
    assert f"checkpoint.init_from={tmp_path}/smollm3-3b-sft/checkpoints" in _sets(train)
    [grid] = _dry("examples/smollm3/apo_grid.sh", CKPT_DIR=tmp_path, STEPS=100)
    assert grid[3] == "ablate" and "preference.beta=0.01,0.05,0.1,0.5" in grid
    commands = _dry("examples/smollm3/merge.sh", CKPT_DIR=tmp_path,
                    APO_CHECKPOINTS=f"{tmp_path}/a/iter_0000010 {tmp_path}/a/iter_0000020")
    soup, merge = commands[0], commands[1]
    assert soup[soup.index("--checkpoints") + 1:soup.index("--out")] == [f"{tmp_path}/a/iter_0000010",
                                                                         f"{tmp_path}/a/iter_0000020"]
    assert merge[merge.index("--weights") + 1:merge.index("--weights") + 3] == ["0.9", "0.1"]
    assert commands[-1][1].endswith("tools/score_table.py") and len(commands[-1]) == 5
