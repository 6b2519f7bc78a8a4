"""Supervised fine-tuning on the same engine: packing keeps conversations apart on every layout,
an assistant-only loss trains the replies and not the prompts, and the result exports and chats
with its template."""

import json

import pytest
import torch

from megasmol.data.chat.prepare import prepare_chat
from megasmol.data.chat.synthetic import REPLY, noise_conversations, write_jsonl
from tests.chat_check import summed_losses
from tests.conftest import WORKERS, cli_in_process, run_cli, run_torchrun
from tests.specs import tiny_smollm3


@pytest.fixture(scope="module")
def noise_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    write_jsonl(noise_conversations(48, seed=1, turns=1), root / "train.jsonl")
    prepare_chat([str(root / "train.jsonl")], str(root / "noise"), template="chatml", show_progress=False)
    return root


def _assert_packing_equal(result, where):
    (packed, packed_tokens, packed_rows), (alone, alone_tokens, alone_rows) = result["ffd"], result["none"]
    assert packed_rows < alone_rows, where  # several conversations per sequence
    assert packed_tokens == alone_tokens > 0, where
    assert abs(packed - alone) <= 1e-4 * abs(alone), (where, packed, alone)


def test_packed_loss_equals_conversations_alone(megatron_runtime, noise_data, tmp_path):
    spec = tiny_smollm3(attention_backend="sdpa")
    _assert_packing_equal(summed_losses(spec, str(noise_data / "noise"), tmp_path), "tp1")


def test_packed_loss_equals_conversations_alone_under_tp2_pp2_and_cp2(noise_data, tmp_path):
    run_torchrun([str(WORKERS / "chat_packing.py"), str(noise_data / "noise"), str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())
    for layout in ("tp2", "pp2", "cp2"):
        _assert_packing_equal(results[layout], layout)


@pytest.fixture(scope="module")
def sft_run(noise_data):
    """A short SFT of the tiny model on conversations whose user turns are noise. 30 steps at a
    peak LR of 6e-3: on the 2-core VM the replies' loss was 0.19 after them (the test asks below
    0.5) and the user words' 9.1 (above 8); 0.43 and 10.8 at 5e-3, 0.75 after 25 steps at 1e-2
    (the reply not generated). At 3e-3 it took 55 steps (0.15; 0.26 after 50, 0.87 after 40).
    About 0.75 s of CPU a step."""
    (noise_data / "recipe.yaml").write_text(
        "name: noise\nroot: .\nstages:\n  - name: sft\n    start_step: 1\n    datasets:\n"
        "      - {path: noise, weight: 1.0}\n")
    (noise_data / "sft.yaml").write_text(
        "model: smollm3-tiny\nrun_dir: run\n"
        "data: {recipe: recipe.yaml, seq_length: 64, validation_fraction: 0.0, packing: ffd}\n"
        "training: {train_steps: 30, global_batch_size: 4, micro_batch_size: 4, precision: fp32}\n"
        "schedule: {kind: wsd, lr: 6.0e-3, warmup_steps: 3}\n"
        "checkpoint: {interval: 30}\nlogging: {interval: 10}\neval: {interval: 0}\n")
    proc = run_cli("train", "--config", str(noise_data / "sft.yaml"))
    return noise_data, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def sft_hf(sft_run):
    """The SFT checkpoint exported by ``megasmol export-hf`` (for transformers and ``chat --hf``)."""
    root, _ = sft_run
    assert cli_in_process("export-hf", "--checkpoint", str(root / "run" / "checkpoints"),
                          "--out", str(root / "hf"), "--quiet").returncode == 0
    return root / "hf"


def test_assistant_only_loss_trains_replies_not_prompts(sft_run, sft_hf):
    """Exported to transformers: replies (and their <|im_end|>) are learnt, the random user
    words stay near chance (ln 128256 = 11.8), far above what training on them would reach
    (ln 48 words = 3.9)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, log = sft_run
    assert "non-padding (ffd)" in log  # the packing efficiency is reported
    generation = json.loads((sft_hf / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [128012, 128001]
    tokenizer = AutoTokenizer.from_pretrained(sft_hf)
    model = AutoModelForCausalLM.from_pretrained(sft_hf).eval()
    reply, prompt = [], []
    for record in noise_conversations(8, seed=99, turns=1):
        enc = tokenizer.apply_chat_template(record["messages"], return_dict=True, return_tensors="pt",
                                            return_assistant_tokens_mask=True)
        ids = enc["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="none")
        supervised = torch.as_tensor(enc["assistant_masks"]).reshape(-1)[1:].bool()
        structural = torch.isin(ids[0, 1:], torch.tensor([128011, 128012, 198, 882, 78191]))
        reply.append(losses[supervised])
        prompt.append(losses[~supervised & ~structural])
    assert torch.cat(reply).mean() < 0.5
    assert torch.cat(prompt).mean() > 8.0
    # The export's template drives generation exactly as for SmolLM3: prompt, reply, stop.
    question = tokenizer.apply_chat_template([{"role": "user", "content": "apple river stone"}],
                                             add_generation_prompt=True, return_dict=True,
                                             return_tensors="pt")
    out = model.generate(**question, max_new_tokens=20, do_sample=False)
    new = out[0, question["input_ids"].shape[1]:].tolist()
    assert new[-1] == 128012 and tokenizer.decode(new[:-1]) == REPLY


def test_export_can_attach_a_chat_template_to_any_tokenizer(sft_run, llama_tokenizer_dir, tmp_path):
    from megasmol.convert.export import export_hf
    from megasmol.tokenizer import load_tokenizer

    root, _ = sft_run
    export_hf(root / "run" / "checkpoints", tmp_path / "hf", tokenizer=llama_tokenizer_dir,
              chat_template="smollm3", show_progress=False)
    tokenizer = load_tokenizer(tmp_path / "hf")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 128012
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [128012, 128001]
    # The end of a turn is the chat model's EOS for every tool that reads it (as SmolLM3-3B's).
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 128012
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 128012


def test_chat_command_answers_with_the_template_and_stops(sft_run, sft_hf):
    """The checkpoint through Megatron-Core, and its export through transformers (``--hf``): the
    same replies, each stopped at <|im_end|>, and nothing else printed."""
    root, _ = sft_run
    proc = run_cli("chat", "--checkpoint", str(root / "run" / "checkpoints"), "--message", "apple stone",
                   "--message", "river", "--max-new-tokens", "24")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("assistant> ")]
    assert lines == [f"assistant> {REPLY}"] * 2, proc.stdout
    proc = run_cli("chat", "--hf", str(sft_hf), "--message", "apple stone", "--message", "river",
                   "--max-new-tokens", "24")
    assert [line for line in proc.stdout.splitlines() if line.startswith("assistant> ")] == lines
    # The transcript is the conversation only: transformers' cache is passed as a Cache object by
    # its current name, so no deprecation warning (`past_key_values`) lands in it.
    assert proc.stderr == "", proc.stderr
    wrong = run_cli("chat", "--hf", str(root / "run" / "checkpoints"), "--message", "hi", check=False)
    assert wrong.returncode == 2 and "use --checkpoint" in wrong.stderr
