"""``megasmol demo``: the whole path on a CPU machine, with nothing downloaded.

1. build the demo corpus (prose, code, math) and tokenize it with the Llama-3.2 tokenizer;
2. train ``smollm3-tiny`` through the two-stage demo mixture (``examples/tiny/demo.yaml``) with
   the real loop: Megatron DDP and optimizer, WSD schedule, validation, checkpoints;
3. report the loss at the start and the end, and plot it (``loss.png``);
4. export the last checkpoint to Hugging Face format and generate a sample with transformers,
   checking (single process) that Megatron-Core's greedy decoding gives the same tokens.

It runs the same under ``torchrun --nproc_per_node 2 -m megasmol demo --set
parallel.tensor_parallel=2`` (or ``pipeline_parallel=2``); rank 0 does the corpus and the export.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from megasmol.data.run_tokenizer import run_tokenizer_dir
from megasmol.model.run_spec import run_model_spec
from megasmol.utils.fs import shown

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "tiny" / "demo.yaml"
PROMPTS = ("Question: Tom has 12 apples and buys 7 more. How many apples does he have now?\nAnswer:",
           "def read_lines(path):\n   ")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def corpus(workdir: Path, parts: int = 5, code_mb: float = 3.0, math_problems: int = 20000) -> Path:
    """The demo corpus, built and tokenized once under ``workdir/corpus`` (``code_mb`` and
    ``math_problems`` size it when it is built, as ``megasmol demo-corpus`` takes them)."""
    from megasmol.data.demo_corpus import build_demo_corpus, tokenize_demo_corpus
    from megasmol.data.tokenize import missing_parts

    tokens = workdir / "corpus" / "tokens"
    prefixes = [tokens / f"{d}_text_document" for d in ("prose", "code", "math")]
    if all(not missing_parts(p) for p in prefixes):
        print(f"[1/{parts}] demo corpus already tokenized in {shown(tokens)}")
        return tokens
    started = time.time()
    manifest = build_demo_corpus(workdir / "corpus", code_mb=code_mb, math_problems=math_problems)
    summaries = tokenize_demo_corpus(workdir / "corpus", overwrite=True, show_progress=False)
    sizes = ", ".join(f"{d} {manifest['domains'][d]['documents']:,} docs / {s.tokens:,} tokens"
                      for d, s in summaries.items())
    print(f"[1/{parts}] demo corpus built and tokenized in {time.time() - started:.0f}s: {sizes}")
    return tokens


def _losses(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    from megasmol.runtime.run_dir import Kind, RunDir

    train, valid = {}, {}
    for record in RunDir(run_dir).records():
        if record.get("loss") is None:
            continue
        if record["kind"] == Kind.TRAIN:
            train[record["step"]] = record["loss"]
        elif record["kind"] == Kind.VALIDATION:
            valid[record["step"]] = record["loss"]
    return sorted(train.items()), sorted(valid.items())


def _sample(checkpoint: Path, workdir: Path, compare_megatron: bool, steps: int) -> bool:
    """The exported model's greedy samples and, in one process, whether Megatron-Core's greedy
    decoding gives the same tokens: that agreement is the check, not the text (a model this short
    writes whitespace or repeats itself)."""
    from megasmol.convert.export import export_hf
    from megasmol.convert.hf_dir import load_hf_causal_lm
    from megasmol.tokenizer import load_tokenizer

    report = export_hf(checkpoint, workdir / "hf", show_progress=False, overwrite=True)
    check = ("samples check that transformers and Megatron-Core decode the same greedy tokens"
             if compare_megatron else "transformers samples (no engine comparison under torchrun)")
    print(f"[4/5] exported {checkpoint.name} to {shown(report.out_dir)} ({report.total_bytes / 1e6:.1f} MB); "
          f"{check} (a {steps}-step model writes whitespace or repeats itself: expected)")
    hf = load_hf_causal_lm(report.out_dir)
    tokenizer = load_tokenizer(report.out_dir)
    megatron = None
    if compare_megatron:
        from megasmol.model.load import load_checkpoint_model

        megatron, _, _ = load_checkpoint_model(checkpoint)
    agree = True
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        # No early stop at EOS on either side, so the two decodings compare token for token.
        out = hf.generate(ids, max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids),
                          eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], clean_up_tokenization_spaces=False)
        print(f"      transformers sample: {prompt!r} -> {text!r}")
        if megatron is not None:
            from megasmol.decode.cached import greedy_generate

            same = greedy_generate(megatron, ids, 24).tolist() == out.tolist()
            agree &= same
            print(f"      Megatron-Core greedy decoding gives the same tokens: {same}")
    return agree


def _downstream(checkpoint: Path, workdir: Path, config) -> None:
    """The demo's tasks on the random initialization and on the trained model, offline."""
    from megasmol.eval.runner import evaluate
    from megasmol.eval.scoring.scorers import megatron_scorer
    from megasmol.eval.tasks.registry import load_task
    from megasmol.model.init import init_checkpoint
    from megasmol.runtime.distributed import shutdown
    from megasmol.tokenizer import load_tokenizer
    from megasmol.utils.table import format_table

    tokenizer = load_tokenizer(run_tokenizer_dir(config))
    tasks = [load_task(name) for name in config.eval.tasks]
    init = workdir / "init"
    shutil.rmtree(init, ignore_errors=True)
    try:
        init_checkpoint(run_model_spec(config), init, seed=config.training.seed)
        scores = {}
        for label, path in (("random init", init), ("trained", checkpoint)):
            scores[label] = evaluate(tasks, megatron_scorer(path, tokenizer),
                                     limit=config.eval.tasks_limit, seed=config.training.seed)
    finally:
        shutdown()
    rows = [("task", "metric", "chance", "random init", "trained", "trained vs chance")]
    for before, after in zip(scores["random init"], scores["trained"]):
        for metric in ("acc", "acc_norm"):
            value, err = after.metrics[metric]
            rows.append((before.name, metric, f"{before.chance:.2f}",
                         f"{before.metrics[metric][0]:.3f} ± {before.metrics[metric][1]:.3f}",
                         f"{value:.3f} ± {err:.3f}", _versus_chance(value, err, after.chance)))
    print(f"[5/5] downstream tasks, {config.eval.tasks_limit} examples each "
          "(megasmol eval tasks; the same scores are logged in the loop at every checkpoint):")
    print("      " + format_table(rows).replace("\n", "\n      "))


def _versus_chance(value: float, err: float, chance: float) -> str:
    """How many standard errors above chance, and whether that is a signal (3 or more)."""
    sigmas = (value - chance) / err if err > 0 else 0.0
    return f"{sigmas:+.1f} SE" + (": above chance" if sigmas >= 3 else "")


DEFAULT_STEPS = 150
MIN_STEPS = 10


def scaled_plan(steps: int, workdir: Path, write: bool = True) -> list[str]:
    """Overrides that fit ``examples/tiny/demo.yaml``'s 150-step plan to ``steps``: warmup a
    tenth (at most 15), validation, checkpoints and in-loop scoring at each third, and the
    mixture's decay stage starting with the schedule's decay (the last third), in a copy of the
    ``demo`` recipe written (by rank 0) to ``workdir``."""
    if steps == DEFAULT_STEPS:
        return []
    path = workdir / f"demo-recipe-{steps}.yaml"
    if write:
        import yaml

        from megasmol.config.typed import load_yaml
        from megasmol.data.recipe import REPO_RECIPES
        from megasmol.utils.fs import atomic_write_text

        data = load_yaml(REPO_RECIPES / "demo.yaml")
        data["stages"][1]["start_step"] = steps * 2 // 3 + 1
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    third = max(1, steps // 3)
    return [f"data.recipe={path}", f"schedule.warmup_steps={min(15, max(1, steps // 10))}",
            f"eval.interval={third}", f"checkpoint.interval={third}"]


def required_fall(steps: int) -> float:
    """How far the mean loss of the last steps must sit below that of the first: 2 nats from 100
    steps on (the default run falls about 5), less for a shorter run (about 1 at 20 steps)."""
    return min(2.0, 0.05 * steps)


def run_demo(workdir: Path, steps: int = DEFAULT_STEPS, overrides: list[str] | None = None,
             code_mb: float = 3.0, math_problems: int = 20000) -> int:
    from megasmol.config.run import load_run_config
    from megasmol.runtime.distributed import init_distributed, shutdown
    from megasmol.train.loop import train
    from megasmol.utils.plot import line_chart

    started = time.time()
    workdir = Path(workdir).resolve()
    init_distributed()
    try:
        if _rank() == 0:
            tokens = corpus(workdir, code_mb=code_mb, math_problems=math_problems)
            shutil.rmtree(workdir / "run", ignore_errors=True)  # the demo always trains afresh
            scaled_plan(steps, workdir)
        torch.distributed.barrier()
        plan = scaled_plan(steps, workdir, write=False)
        tokens = workdir / "corpus" / "tokens"
        config = load_run_config(DEMO_CONFIG, [
            f"run_dir={workdir / 'run'}", f"data.root={tokens}", f"training.train_steps={steps}",
            *plan, *(overrides or [])])
        if _rank() == 0:
            print(f"[2/5] training {config.model} for {steps} steps on {_world()} process(es) "
                  f"({config.training.global_batch_size} x {config.data.seq_length} tokens per step)")
        result = train(config)
    finally:
        shutdown()
    if _rank() != 0:
        return 0
    train_losses, valid_losses = _losses(workdir / "run")
    window = max(1, min(10, steps // 5))
    first, last = result.first_and_last_loss(window)
    plot = line_chart(workdir / "loss.png", {"train loss": train_losses, "validation loss": valid_losses},
                      title=f"{config.model} on the demo mixture", x_label="step", y_label="loss")
    validation = (f"validation {', '.join(f'{s}: {v:.3f}' for s, v in valid_losses)}" if valid_losses
                  else "no validation (eval.interval is 0)")
    print(f"[3/5] loss {first:.3f} (first {window} steps) -> {last:.3f} (last {window} steps); "
          f"{validation}; plot {shown(plot)}")
    agree = _sample(result.checkpoint, workdir, compare_megatron=_world() == 1, steps=steps)
    _downstream(result.checkpoint, workdir, config)
    needed = required_fall(steps)
    learned = last < first - needed
    verdict = (f"the loss fell by {first - last:.2f} (at least {needed:.2f} expected in {steps} steps)"
               if learned else f"the loss did NOT fall as expected: by {first - last:.2f}, "
               f"at least {needed:.2f} expected in {steps} steps")
    print(f"demo finished in {time.time() - started:.0f}s: {verdict}")
    return 0 if learned and agree else 1
