"""torchrun worker (2 gloo processes): the chunked cross-entropy vs the plain path under TP=2 (the
vocabulary-parallel function and model, with and without z-loss, gradients made in the forward or
recomputed), then PP=2 and CP=2 for the pretraining, SFT and preference losses (each rank's share;
the largest error over ranks), and under Megatron-Core's DDP (the output weight's gradient into
``main_grad``) with PP=2 and DP=2, two optimizer steps, for the pretraining and preference losses.
One launch for both tests of ``tests/test_linear_cross_entropy.py`` that need one."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megasmol.config.parallel import ParallelLayout  # noqa: E402
from megasmol.runtime.distributed import init_parallel, shutdown  # noqa: E402
from tests.linear_ce_check import (  # noqa: E402
    ddp_step_errors,
    function_errors,
    model_errors,
    objective_errors,
)
from tests.specs import tiny_smollm3  # noqa: E402


def tensor_parallel() -> dict:
    spec = tiny_smollm3(vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    init_parallel(ParallelLayout(tensor_parallel=2), spec)
    results = {}
    for z in (0.0, 1e-2):
        for in_forward in (True, False):
            results[f"function z={z} in_forward={in_forward}"] = function_errors(
                z, chunk_size=5, in_forward=in_forward)
            results[f"model z={z} in_forward={in_forward}"] = model_errors(spec, z, in_forward)
    torch.distributed.barrier()
    return results


def pipeline_and_context_parallel() -> dict:
    spec = tiny_smollm3(vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        attention_backend="sdpa", z_loss_coeff=1e-2)
    results = {}
    for name, layout in (("pp2", ParallelLayout(pipeline_parallel=2)),
                         ("cp2", ParallelLayout(context_parallel=2)), ("dp2", ParallelLayout())):
        init_parallel(layout, spec)
        for objective in ("pretraining", "sft", "preference") if name != "dp2" else ():
            errors = objective_errors(spec, objective)
            packed = torch.tensor([errors["loss"], errors["grads"], errors["loss_sum"]], dtype=torch.float64)
            torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
            results[f"{name} {objective}"] = dict(zip(("loss", "grads", "loss_sum"), packed.tolist()))
        # Under DDP (main_grad): PP=2 puts the tied output weight on its own stage, summed with
        # the embedding's gradient by finalize_model_grads; DP=2 reduces main_grad over ranks.
        for objective in ("pretraining", "preference") if name != "cp2" else ():
            errors = ddp_step_errors(spec, objective)
            keys = ("loss", "main_grads", "weights", "loss_sum")
            packed = torch.tensor([errors[k] for k in keys] + [-errors["main_grad_marked"]],
                                  dtype=torch.float64)  # the MAX of -marked: -(every rank's AND)
            torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
            results[f"{name} ddp {objective}"] = {**dict(zip(keys, packed.tolist())),
                                                  "main_grad_marked": -packed[-1].item()}
        torch.distributed.barrier()
    return results


def main():
    results = {"tp2": tensor_parallel(), "layouts": pipeline_and_context_parallel()}
    if torch.distributed.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
