"""A small RL run on disk: the tiny 512-token spec of ``train_fixtures``, a word-level tokenizer
whose tokens are ``t0`` .. ``t511``, a prompt set written in ``prepare-prompts``' format, and a
config whose reward (``tests.rl_rewards:even_tokens``) a random model can learn to raise."""

import json
from pathlib import Path

import yaml

from tests.data_fixtures import EOS
from tests.train_fixtures import SPEC


def write_word_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(SPEC["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=f"t{EOS}", unk_token="t0")
    fast.save_pretrained(str(path))
    return path


def write_prompt_set(prefix: Path, count: int = 16, seed: int = 0) -> Path:
    """``count`` prompts of 3-6 ids in [10, 260) (never EOS), in the on-disk format of
    ``megasmol.data.prompts.store``."""
    import numpy as np

    from megasmol.data.masked.layout import tokenizer_path
    from megasmol.data.prompts.store import PROMPTS, records_path

    rng = np.random.default_rng(seed)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_word_tokenizer(tokenizer_path(prefix))
    lines = []
    for index in range(count):
        ids = [int(i) for i in rng.integers(10, 260, size=int(rng.integers(3, 7)))]
        lines.append(json.dumps({"prompt_ids": ids, "text": " ".join(f"t{i}" for i in ids),
                                 "answer": None, "tests": None, "entry_point": None, "mode": None,
                                 "chat": False, "where": f"fixture:{index + 1}"}))
    records_path(prefix).write_text("\n".join(lines) + "\n")
    PROMPTS.path(prefix).write_text(json.dumps({"format": PROMPTS.format, "prompts": count}))
    return prefix


def write_eval_suite(root: Path) -> Path:
    """An in-loop evaluation suite in the word tokenizer's ids: a cloze task (contexts shared
    by the choices) and a free-generation one (greedy, by the model being trained), averaged."""
    def jsonl(name: str, records: list[dict]) -> str:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        return name

    root.mkdir(parents=True, exist_ok=True)
    (root / "cloze.yaml").write_text(yaml.safe_dump({
        "name": "cloze", "target_delimiter": "", "primary_metric": "acc", "data_files": jsonl("items.jsonl", [
            {"context": "t10 t11", "choices": [" t12", " t13"], "gold": 0},
            {"context": "t20 t21 t22", "choices": [" t23", " t24", " t25"], "gold": 1},
            {"context": "t30", "choices": [" t31", " t32 t33"], "gold": 1}])}))
    (root / "gen.yaml").write_text(yaml.safe_dump({
        "name": "gen", "formulation": "fg", "context": "{{question}}", "answer": "{{answer}}",
        "until": ["t0"], "max_gen_tokens": 4, "answer_pattern": "(\\w+)",
        "data_files": jsonl("questions.jsonl", [{"question": "t40 t41", "answer": "t42"},
                                                {"question": "t50", "answer": "t51"}])}))
    suite = root / "words.suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "words", "description": "in-loop scoring during RL",
                                     "source": "tests", "tasks": [{"task": str(root / "cloze.yaml")},
                                                                  {"task": str(root / "gen.yaml")}]}))
    return suite


def write_rl_run(root: Path, steps: int = 6, initialized: bool = False, **sections) -> Path:
    """Spec, prompts, recipe and an RL config under ``root``; returns the config path.
    ``initialized``: the run starts from a checkpoint of initial weights saved at ``root/init``
    (the same for every parallel layout, which a random initialization is not)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    if initialized:  # in a process of its own: this one's Megatron runtime stays as it is
        from tests.conftest import run_cli

        run_cli("init", "--spec", str(root / "spec.yaml"), "--out", str(root / "init"), "--seed", "7")
        sections.setdefault("checkpoint", {})["init_from"] = "init"
    write_prompt_set(root / "prompts" / "words")
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "words", "root": "prompts",
        "stages": [{"name": "rl", "start_step": 1, "datasets": [{"path": "words", "weight": 1.0}]}]}))
    config = {
        "model": "spec.yaml",
        "run_dir": "run",
        "data": {"recipe": "recipe.yaml", "seq_length": 32, "validation_fraction": 0.0,
                 "prefetch": 0, "tokenizer": "auto"},
        "training": {"objective": "rl", "train_steps": steps, "global_batch_size": 16,
                     "micro_batch_size": 2, "precision": "fp32", "seed": 7},
        "optim": {"weight_decay": 0.0},
        "schedule": {"kind": "constant", "lr": 3e-2, "warmup_steps": 0},
        "rl": {"num_generations": 4, "max_completion_length": 8},
        "rewards": {"functions": [{"name": "tests.rl_rewards:even_tokens"}]},
        "checkpoint": {"interval": 3, "keep_last": 2},
        "logging": {"interval": 1, "tensorboard": False, "progress": False},
        "eval": {"interval": 0, "steps": 0},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
