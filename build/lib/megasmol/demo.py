"""``megasmol demo``: the end-to-end path on a CPU machine, with nothing downloaded.

Today it runs the model path: a SmolLM3-architecture checkpoint (``smollm3-tiny``) through
Megatron-Core, greedy generation with the Megatron model, export to Hugging Face format, and
the same generation with transformers, checking that the two agree.  Training joins here when
the training loop lands.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from megasmol.convert.export import export_hf
from megasmol.generate import greedy_generate
from megasmol.model.flops import parameter_count
from megasmol.model.init import init_checkpoint
from megasmol.model.load import load_checkpoint_model
from megasmol.model.spec import load_model_spec
from megasmol.runtime.distributed import shutdown
from megasmol.tokenizer import default_tokenizer_dir, load_tokenizer

PROMPT = "The SmolLM3 recipe trains a three billion parameter model on"


def run_demo(workdir: Path, steps: int = 300) -> int:
    try:
        return _run(workdir)
    finally:
        shutdown()


def _run(workdir: Path) -> int:
    started = time.time()
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    spec = load_model_spec("smollm3-tiny")
    tokenizer_path = default_tokenizer_dir()
    print(f"[1/4] init {spec.name}: {parameter_count(spec).total:,} parameters, "
          f"NoPE layers {[i for i, s in enumerate(spec.rope_skipped()) if s]}")
    ckpt = init_checkpoint(spec, workdir / "checkpoints", tokenizer=tokenizer_path)
    print(f"      checkpoint: {ckpt}")
    model, spec, _ = load_checkpoint_model(ckpt)
    tokenizer = load_tokenizer(tokenizer_path)
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    ours = greedy_generate(model, prompt_ids, 16, eos_token_id=None)
    print(f"[2/4] Megatron-Core greedy continuation (random weights, so gibberish): "
          f"{tokenizer.decode(ours[0, prompt_ids.shape[1]:])!r}")
    report = export_hf(ckpt, workdir / "hf", show_progress=False)
    print(f"[3/4] exported to {report.out_dir} ({report.total_bytes / 1e6:.1f} MB, "
          f"tokenizer {'included' if report.tokenizer else 'missing'})")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(report.out_dir, dtype=torch.float32).eval()
    theirs = hf.generate(prompt_ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=spec.pad_token_id, attention_mask=torch.ones_like(prompt_ids))
    with torch.no_grad():
        positions = torch.arange(prompt_ids.shape[1]).unsqueeze(0)
        reference = hf(prompt_ids).logits
        rel = ((model(prompt_ids, positions, None) - reference).norm() / reference.norm()).item()
    same = theirs.tolist() == ours.tolist()
    print(f"[4/4] transformers {type(hf).__name__}: same tokens: {same}; "
          f"logit relative error {rel:.2e}")
    print(f"demo finished in {time.time() - started:.0f}s "
          "(training steps arrive with the training loop; --steps is reserved for it)")
    return 0 if same and rel < 1e-5 else 1
