"""What the RL objective wires at set-up: the rollout context (prompts, the ``rl.engine`` on the
run's own model, the rewards) and the forward-only passes for old and reference log-probs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megasmol.config.typed import ConfigError
from megasmol.rl.rollout import RolloutContext
from megasmol.utils.fs import shown_paths

if TYPE_CHECKING:
    from megasmol.train.setup import TrainingSetup


def prompt_sets(setup: TrainingSetup) -> list:
    """Each planned stage's prompt set (``prepare-prompts`` output), by stage index."""
    from megasmol.data.prompts.store import read_prompts
    from megasmol.data.recipe import load_recipe

    config = setup.config
    recipe = load_recipe(config.recipe_reference())
    root = config.data.root and str(config.path(config.data.root))
    return [read_prompts(recipe.dataset_prefix(plan.stage.datasets[0], root))
            for plan in setup.batches.plans]


def _tokenizer(setup: TrainingSetup, prompts) -> Any:
    """The run's tokenizer (``data.tokenizer``; ``auto``: the prompt set's), which decodes
    completions for the rewards."""
    from transformers import AutoTokenizer

    from megasmol.data.run_tokenizer import run_tokenizer_dir

    source = run_tokenizer_dir(setup.config) or prompts.tokenizer_dir
    return AutoTokenizer.from_pretrained(str(source))


def rollout_context(setup: TrainingSetup) -> RolloutContext:
    from megatron.core import parallel_state

    from megasmol.rl.rewards import build_rewards
    from megasmol.train.rollout_engines import rollout_engine

    config, rl = setup.config, setup.config.rl
    sets = prompt_sets(setup)
    for plan, prompts in zip(setup.batches.plans, sets):
        longest = max((len(record.prompt_ids) for record in prompts), default=0)
        if longest + rl.max_completion_length > plan.seq_length:
            raise ConfigError(f"rl.max_completion_length ({rl.max_completion_length}) plus the longest "
                              f"prompt of stage {plan.stage.name} ({longest} tokens) exceeds "
                              f"data.seq_length ({plan.seq_length}): raise data.seq_length or shorten "
                              "completions")
    tokenizer = _tokenizer(setup, sets[0])
    stops = stop_ids(tokenizer, setup.spec.eos_token_id)
    rewards = setup.hold(build_rewards(config.rewards))
    def say(line: str) -> None:
        if setup.is_logging_rank:
            print(shown_paths(line), flush=True)

    for line in rl.cautions():
        say(f"note: {line}")

    def score(records: list, completions: list[list[int]], truncated: list[bool]):
        texts = [tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=False)
                 for ids in completions]
        result = rewards.score(records, texts, [len(ids) for ids in completions], truncated)
        for line in result.notes:
            say(line)
        return result

    return RolloutContext(
        generate=rollout_engine(rl.engine).bind(setup, stops), prompt_sets=sets, score=score, rl=rl,
        seed=config.training.seed,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(), say=say)


def stop_ids(tokenizer, eos_token_id: int) -> set[int]:
    """The ids that end a completion: the model's EOS and the chat template's end of turn."""
    ids = {int(eos_token_id)}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return ids


def attach_token_logps(setup: TrainingSetup, model: torch.nn.Module, micro: list[dict], name: str) -> None:
    """``micro[i][name]``: each completion token's log-prob of its label under ``model`` (0
    elsewhere), from one forward-only pass in the training packing, its output layer at the
    completion tokens only as in the training step (``PolicyLoss.scored_only``: the same GEMM
    shapes, the same rounding), on the last pipeline stage, the one that needs it."""
    from megasmol.data.masking import device_inputs
    from megasmol.runtime.pipeline import forward_only_outputs

    def collect(inputs, output_tensor):
        zero = output_tensor.new_zeros(())
        return zero, torch.tensor(0, dtype=torch.int), {"logps": (-output_tensor).detach().float()}

    data = setup.config.data
    inputs = device_inputs(micro, setup.spec.eos_token_id, data.document_masking, setup.mask_format,
                           data.reset_position_ids)
    outputs = forward_only_outputs(model, inputs, collect, scored_only=True)
    for mb, item in zip(micro, outputs):
        mb[name] = item["logps"].cpu().reshape(mb["tokens"].shape).double()


def reference_model(setup: TrainingSetup) -> torch.nn.Module:
    """The reference policy for ``rl.beta`` > 0: the ``checkpoint.init_from`` weights in a second
    model of the run's layout (forward only, plain cross-entropy at the sampling temperature)."""
    from megasmol.ckpt.checkpoint import load_model_weights
    from megasmol.model.gpt import build_model

    config = setup.config
    assert config.checkpoint.init_from is not None, "checked by the objective's check()"
    source = Path(config.path(config.checkpoint.init_from))
    model = build_model(setup.spec, params_dtype=setup.params_dtype,
                        sequence_parallel=config.parallel.sequence_parallel,
                        cross_entropy=config.training.cross_entropy)
    load_model_weights(model, source)
    model.z_loss_coeff = 0.0
    model.logit_temperature = config.rl.temperature
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
