"""RL on CPU: megasmol's rollouts and GRPO step against transformers' ``generate`` and TRL's
``GRPOTrainer``, on the same model, prompts, batch and completion length.

    python bench/rl_step.py [--hidden 256] [--layers 4] [--vocab 8192] [--prompts 4]
                            [--generations 8] [--completion 64] [--steps 3] [--rounds 2]

One random SmolLM3-architecture model (a bench-sized spec, a word-level tokenizer whose tokens
are ``t0`` .. ``tV-1``) is written as a megasmol checkpoint and exported to HF
(``megasmol.convert``), so both sides run the same weights in fp32 on the CPU.

1. Rollouts: ``prompts x generations`` completions of ``--completion`` tokens (16-24-token
   prompts, temperature 1, no top-k / top-p) sampled by ``megasmol.decode.generate`` (KV cache,
   one seeded generator per row, the log-prob of each sampled token returned) and by transformers'
   ``generate`` (left-padded batch, KV cache) with ``output_scores`` turned into the same
   log-probs; transformers' ``generate`` without log-probs is shown too. Completion tokens per
   second (EOS ends a row on both sides), the median of ``--rounds`` alternating rounds.
2. A whole GRPO step (rollouts, rewards, advantages, the DAPO loss, AdamW): megasmol's training
   loop with ``training.objective: rl`` against TRL's ``GRPOTrainer`` (``use_cpu``, no vLLM,
   transformers' ``generate``), the same prompts per step, ``num_generations``,
   ``max_completion_length``, temperature, learning rate and reward (the share of even ``tN``
   words in the completion, ``tests.rl_rewards:even_tokens``). Each side runs one warm-up step,
   then ``--steps`` timed steps, the two alternating step by step (a TRL step, then a megasmol
   step) so machine noise hits both alike; median seconds per step, and the share of it spent
   generating (megasmol: ``time/generation_s`` from its metrics, i.e. drawing prompts, sampling
   and rewards; TRL: a timer around ``GRPOTrainer._generate``). TRL 1.16 with one update per
   rollout batch computes no separate old log-probs (its loss's forward gives them); megasmol
   takes the decoder's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

BOS, EOS, PAD = 1, 2, 3


def bench_spec(args) -> dict:
    return dict(
        name="rl-bench", architecture="smollm3", num_layers=args.layers, hidden_size=args.hidden,
        ffn_hidden_size=3 * args.hidden, num_attention_heads=4, num_kv_heads=2, head_dim=args.hidden // 4,
        vocab_size=args.vocab, max_position_embeddings=512, norm_eps=1e-6, rope_theta=10000.0,
        nope_interval=4, tie_embeddings=True, init_std=0.02, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD)


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=f"t{BOS}", eos_token=f"t{EOS}",
                                   pad_token=f"t{PAD}", unk_token="t0")


def prompt_ids(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.integers(10, vocab, size=int(rng.integers(16, 25)))] for _ in range(count)]


def write_inputs(work: Path, args) -> dict:
    """Spec, checkpoint, its HF export, a prompt set and the RL run's config under ``work``."""
    import yaml

    from megasmol.convert.export import export_hf
    from megasmol.data.masked.layout import tokenizer_path
    from megasmol.data.prompts.store import PROMPTS, records_path
    from megasmol.model.init import init_checkpoint
    from megasmol.model.spec import load_model_spec

    spec = bench_spec(args)
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    tokenizer = word_tokenizer(args.vocab)
    tokenizer.save_pretrained(str(work / "tokenizer"))
    init_checkpoint(load_model_spec(str(work / "spec.yaml")), work / "ckpt", seed=11,
                    tokenizer=work / "tokenizer")
    export_hf(work / "ckpt", work / "hf", show_progress=False)
    # Enough prompts that neither side reuses one within the run.
    prompts = prompt_ids(args.prompts * (2 * args.steps + 4), args.vocab)
    prefix = work / "prompts" / "words"
    prefix.parent.mkdir(parents=True)
    tokenizer.save_pretrained(str(tokenizer_path(prefix)))
    records_path(prefix).write_text("".join(json.dumps(
        {"prompt_ids": ids, "text": " ".join(f"t{i}" for i in ids), "answer": None, "tests": None,
         "entry_point": None, "mode": None, "chat": False, "where": f"bench:{n + 1}"}) + "\n"
        for n, ids in enumerate(prompts)))
    PROMPTS.path(prefix).write_text(json.dumps({"format": PROMPTS.format, "prompts": len(prompts)}))
    (work / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "words", "root": "prompts",
        "stages": [{"name": "rl", "start_step": 1, "datasets": [{"path": "words", "weight": 1.0}]}]}))
    completions = args.prompts * args.generations
    (work / "run.yaml").write_text(yaml.safe_dump({
        "model": "spec.yaml", "run_dir": "run",
        "data": {"recipe": "recipe.yaml", "seq_length": 24 + args.completion, "validation_fraction": 0.0,
                 "prefetch": 0, "tokenizer": "auto"},
        "training": {"objective": "rl", "train_steps": 1 + args.steps, "global_batch_size": completions,
                     "micro_batch_size": completions, "precision": "fp32", "seed": 7},
        "optim": {"weight_decay": 0.0, "clip_grad": 1.0},
        "schedule": {"kind": "constant", "lr": args.lr, "warmup_steps": 0},
        "rl": {"num_generations": args.generations, "max_completion_length": args.completion,
               "temperature": 1.0},
        "rewards": {"functions": [{"name": "tests.rl_rewards:even_tokens"}]},
        "checkpoint": {"init_from": str(work / "ckpt"), "interval": 0, "save_at_end": False,
                       "resume": False},
        "logging": {"interval": 1, "tensorboard": False, "progress": False},
        "eval": {"interval": 0, "steps": 0},
    }))
    return {"prompts": prompts, "tokenizer": tokenizer}


def hf_sample(hf, prompts: list[list[int]], new_tokens: int, scores: bool) -> int:
    """transformers' ``generate`` on the left-padded batch; with ``scores``, the log-prob of each
    sampled token at temperature 1 from ``output_scores``. Returns the completion tokens."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                      top_p=1.0, max_new_tokens=new_tokens, eos_token_id=EOS, pad_token_id=PAD,
                      output_scores=scores, return_dict_in_generate=True)
    completion = out.sequences[:, width:]
    if scores:
        step_scores = torch.stack(out.scores, dim=1)  # [rows, new, vocab], after the temperature
        logps = torch.log_softmax(step_scores.float(), dim=-1).gather(-1, completion.unsqueeze(-1))
        assert bool(torch.isfinite(logps).all())
    done = (completion == EOS).int().cumsum(dim=1)
    return int(((done == 0) | ((done == 1) & (completion == EOS))).sum())


def rollout_throughput(args, model, hf, prompts: list[list[int]]) -> dict:
    import torch

    from megasmol.decode.cached import generate
    from megasmol.decode.sampling import SamplingParams

    batch = [p for p in prompts[:args.prompts] for _ in range(args.generations)]
    sampling = SamplingParams(temperature=1.0)

    def ours() -> int:
        done = generate(model, batch, args.completion, sampling=sampling, seeds=list(range(len(batch))),
                        eos_token_id=EOS)
        return sum(len(c.tokens) for c in done)

    modes = {"megasmol generate (log-probs)": ours,
             "transformers generate + output_scores log-probs":
                 lambda: hf_sample(hf, batch, args.completion, True),
             "transformers generate (no log-probs)": lambda: hf_sample(hf, batch, args.completion, False)}
    rates: dict[str, list[float]] = {name: [] for name in modes}
    torch.manual_seed(0)
    with torch.no_grad():
        for fn in modes.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in modes.items():
                started = time.perf_counter()
                tokens = fn()
                rates[name].append(tokens / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()} | {"rounds": rates}


class MegasmolSteps:
    """megasmol's training loop on the RL run, one step per call."""

    def __init__(self, work: Path):
        from megasmol.config.run import load_run_config
        from megasmol.train.loop import Trainer
        from megasmol.train.setup import build_setup

        self.work = work
        self.setup = build_setup(load_run_config(work / "run.yaml"))
        self.trainer = Trainer(self.setup)
        self.times: list[float] = []

    def step(self) -> None:
        started = time.perf_counter()
        self.trainer.run_steps(until=len(self.times) + 1)
        self.times.append(time.perf_counter() - started)

    def close(self) -> dict:
        self.trainer.close()
        if not self.times:
            return {}
        lines = (self.work / "run" / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if r.get("kind") == "train"]
        timed = self.times[1:]
        return {"step_s": statistics.median(timed), "steps": timed,
                "generation_s": statistics.median(r["time/generation_s"] for r in records[1:]),
                "reward": [r["reward"] for r in records]}


def grpo_steps(work: Path, args, tokenizer, prompts: list[list[int]], ours: MegasmolSteps) -> dict:
    """megasmol's warm-up step, then TRL's ``GRPOTrainer`` for ``1 + args.steps`` steps, with one
    megasmol step after each but the last (TRL's timer stopped), so machine noise hits both
    alike."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tests.rl_rewards import even_tokens

    def reward(prompts, completions, **kwargs):
        return even_tokens(completions, None)

    class Alternate(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []
            self.started = 0.0

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.steps.append(time.perf_counter() - self.started)
            if len(ours.times) < 1 + args.steps:
                ours.step()

    config = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, report_to="none", bf16=False, save_strategy="no",
        logging_steps=1, seed=0, num_generations=args.generations,
        per_device_train_batch_size=args.prompts * args.generations, gradient_accumulation_steps=1,
        max_completion_length=args.completion, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        max_steps=1 + args.steps, loss_type="dapo", beta=0.0, dataloader_num_workers=0,
        disable_tqdm=True)
    data = Dataset.from_list([{"prompt": " ".join(f"t{i}" for i in ids)} for ids in prompts])
    model = AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=torch.float32)
    timer = Alternate()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[timer])
    generation: list[float] = []
    inner = trainer._generate

    def timed_generate(*a, **k):
        started = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            generation.append(time.perf_counter() - started)

    trainer._generate = timed_generate
    ours.step()  # megasmol's warm-up first: see main()
    trainer.train()
    timed = timer.steps[1:]
    return {"step_s": statistics.median(timed), "steps": timed,
            "generation_s": statistics.median(generation[1:]),
            "reward": [r["reward"] for r in trainer.state.log_history if "reward" in r]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="model width (heads of hidden/4)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192, help="word-level vocabulary size")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--completion", type=int, default=64, help="max_completion_length")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=3, help="timed GRPO steps per side (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="rollout rounds per decoder")
    parser.add_argument("--skip", choices=["rollouts", "steps"], help="leave one part out")
    parser.add_argument("--workdir", help="where to write the model and runs (default: a new temp dir)")
    args = parser.parse_args()

    from megasmol.runtime.openmp import passive_waits

    passive_waits()  # as the megasmol command does, before torch loads: both sides run with it
    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rlbench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    inputs = write_inputs(work, args)
    print(f"model: smollm3 architecture, hidden {args.hidden}, {args.layers} layers, vocabulary "
          f"{args.vocab}; {args.prompts} prompts x {args.generations} generations, "
          f"{args.completion} completion tokens; torch threads {torch.get_num_threads()}; {work}")

    # megasmol's run first: it owns the process's parallel state. Its model serves the rollout
    # comparison after the steps, reloaded with the checkpoint's (= the HF export's) weights.
    # megasmol's warm-up step runs before anything else is timed (one-time costs; before the
    # passive OpenMP waits of runtime/openmp.py, decoding before that step also ran 20-60x slower
    # on the loaded 2-core VM, on both sides).
    ours = MegasmolSteps(work)
    if args.skip != "steps":
        theirs = grpo_steps(work, args, inputs["tokenizer"], inputs["prompts"], ours)
    mine = ours.close()
    if args.skip != "steps":
        print("\n| GRPO step | median s/step | steps (s) | generation share | TRL / this |")
        print("|---|---|---|---|---|")
        for name, side in (("megasmol (training.objective: rl)", mine), ("TRL GRPOTrainer", theirs)):
            print(f"| {name} | {side['step_s']:.3f} | {' '.join(f'{s:.3f}' for s in side['steps'])} | "
                  f"{100 * side['generation_s'] / side['step_s']:.0f}% | "
                  f"{theirs['step_s'] / side['step_s']:.2f}x |")
        print(f"rewards per step: megasmol {[round(r, 3) for r in mine['reward']]}, "
              f"TRL {[round(r, 3) for r in theirs['reward']]}")
    if args.skip != "rollouts":
        from transformers import AutoModelForCausalLM

        from megasmol.ckpt.checkpoint import load_model_weights

        model = ours.setup.model
        load_model_weights(model, work / "ckpt")  # the exported weights, not the trained ones
        model.eval()
        hf = AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=torch.float32).eval()
        rates = rollout_throughput(args, model, hf, inputs["prompts"])
        base = rates["megasmol generate (log-probs)"]
        print("\n| decoder | completion tokens/s (median) | rounds | megasmol / this |")
        print("|---|---|---|---|")
        for name, rounds in rates["rounds"].items():
            print(f"| {name} | {rates[name]:.0f} | {' '.join(f'{r:.0f}' for r in rounds)} | "
                  f"{base / rates[name]:.2f}x |")


if __name__ == "__main__":
    main()
