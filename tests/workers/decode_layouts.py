"""torchrun worker: seeded sampling (and greedy decoding) with ``decode.parallel`` under TP=2,
PP=2, CP=2 and DP=2 (each data-parallel replica its own prompts); rank 0 writes every layout's
completions as JSON."""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megasmol.config.parallel import ParallelLayout  # noqa: E402
from megasmol.decode.parallel import generate_parallel  # noqa: E402
from megasmol.decode.sampling import SamplingParams  # noqa: E402
from megasmol.model.load import load_checkpoint_model  # noqa: E402
from megasmol.runtime.distributed import shutdown  # noqa: E402

LAYOUTS = {"tp2": ParallelLayout(tensor_parallel=2), "pp2": ParallelLayout(pipeline_parallel=2),
           "cp2": ParallelLayout(context_parallel=2), "dp2": ParallelLayout()}


def main():
    checkpoint, case_file, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    case = json.loads(case_file.read_text())
    results = {}
    for name, layout in LAYOUTS.items():
        model, _, _ = load_checkpoint_model(checkpoint, layout=layout)
        rows = list(range(len(case["prompts"])))
        if name == "dp2":  # each replica decodes its own prompts
            rows = rows[torch.distributed.get_rank()::2]
        rules = {"sampled": SamplingParams(**case["sampling"]), "greedy": SamplingParams()}
        for label, sampling in rules.items():
            done = generate_parallel(model, model, [case["prompts"][r] for r in rows],
                                     [case["limits"][r] for r in rows], micro_batch_size=2,
                                     sampling=sampling, seeds=[case["seeds"][r] for r in rows],
                                     eos_token_id=case["eos"])
            mine = {r: dataclasses.asdict(c) for r, c in zip(rows, done)}
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, mine)
            results[f"{name}-{label}"] = {r: c for part in everyone for r, c in part.items()}
        torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
