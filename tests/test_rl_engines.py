"""``rl.engine``: the registry, what each engine refuses before anything runs, and the parts of the
Megatron-Core adapter that do not need a GPU (its sampling settings, its seed, the temperature on
the logits, how a finished request becomes a completion). The engine itself runs only on CUDA:
``megasmol rl check-engine`` compares it with megasmol's decoder on a GPU node."""

from types import SimpleNamespace

import pytest
import torch

from megasmol.config.rl import RLConfig
from megasmol.config.typed import ConfigError, from_dict
from megasmol.decode.megatron_dynamic import _completion, call_seed, divided_logits, megatron_sampling
from megasmol.decode.sampling import SamplingParams
from megasmol.errors import RunFailure
from megasmol.train.rollout_engines import ROLLOUT_ENGINES
from tests.rl_fixtures import write_rl_run

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(),
                              reason="checks the refusal on a machine without CUDA")


def test_the_engines_are_a_registry_and_an_unknown_name_is_refused_naming_the_field():
    import typing

    assert list(ROLLOUT_ENGINES) == ["megasmol", "megatron-dynamic"]
    # The config (below the training room) names the engines; the registry has exactly those.
    assert list(typing.get_args(typing.get_type_hints(RLConfig)["engine"])) == list(ROLLOUT_ENGINES)
    assert RLConfig().engine == "megasmol"
    assert ROLLOUT_ENGINES["megasmol"].reports_entropy
    assert not ROLLOUT_ENGINES["megatron-dynamic"].reports_entropy
    from_dict(RLConfig, {"engine": "megatron-dynamic"}, "rl").validate()  # a name it knows
    with pytest.raises(ConfigError, match="rl.engine") as refused:
        from_dict(RLConfig, {"engine": "vllm"}, "rl").validate()
    assert "'vllm'" in str(refused.value) and "megatron-dynamic" in str(refused.value)


def _check(tmp_path, *sets):
    from megasmol.config.run import load_run_config
    from megasmol.train.objectives import objective_kind

    config = load_run_config(write_rl_run(tmp_path, steps=2), list(sets))
    objective_kind(config.objective).check(config, True)


@CPU_ONLY
def test_megatron_dynamic_is_refused_at_start_without_cuda(tmp_path):
    _check(tmp_path / "default")  # megasmol's own engine runs here
    refusal = r"^rl.engine megatron-dynamic needs CUDA .* use rl.engine: megasmol$"
    with pytest.raises(ConfigError, match=refusal):
        _check(tmp_path / "dynamic", "rl.engine=megatron-dynamic")


def test_what_megatron_core_cannot_take_is_refused_naming_the_field(tmp_path):
    """Whatever the machine: fp32, top_k with top_p, no flash-attn (the CUDA check comes first
    at start; these are the limits behind it)."""
    import importlib.util

    from megasmol.config.run import load_run_config
    from megasmol.train.rollout_engines import dynamic_engine_limits

    path = write_rl_run(tmp_path, steps=2)
    for sets, message in ((["training.precision=fp32"], "needs training.precision bf16"),
                          (["training.precision=bf16", "rl.top_k=5", "rl.top_p=0.9"],
                           "takes rl.top_k or rl.top_p, not both")):
        with pytest.raises(ConfigError, match=f"^rl.engine megatron-dynamic {message}"):
            dynamic_engine_limits(load_run_config(path, sets))
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="needs flash-attn >= 2.7.3"):
            dynamic_engine_limits(load_run_config(path, ["training.precision=bf16"]))


def test_megasmol_sampling_becomes_megatron_cores():
    sampled = megatron_sampling(SamplingParams(temperature=0.7, top_p=0.9), 12, 2, [5])
    # the temperature divides the logits (divided_logits), so the engine's log-probs are at T
    assert (sampled.temperature, sampled.top_k, sampled.top_p) == (1.0, 0, 0.9)
    assert sampled.return_log_probs and sampled.skip_prompt_log_probs
    assert (sampled.num_tokens_to_generate, sampled.termination_id, sampled.stop_words) == (12, 2, ["5"])
    whole = megatron_sampling(SamplingParams(temperature=1.0, top_k=7), 3, None, [])
    assert (whole.top_k, whole.top_p, whole.termination_id, whole.stop_words) == (7, 0.0, -1, None)
    greedy = megatron_sampling(SamplingParams(temperature=0.0, top_p=0.5), 3, 2, [])
    assert (greedy.top_k, greedy.top_p) == (1, 0.0)  # Megatron-Core's greedy is top_k 1
    with pytest.raises(ValueError, match="top_k or top_p, not both"):
        megatron_sampling(SamplingParams(temperature=1.0, top_k=5, top_p=0.9), 3, 2, [])


def test_the_call_seed_repeats_for_the_same_seeds_and_changes_with_any_of_them():
    assert call_seed([1, 2, 3]) == call_seed([1, 2, 3])
    assert len({call_seed([1, 2, 3]), call_seed([1, 2, 4]), call_seed([3, 2, 1]), call_seed([1, 2])}) == 4
    assert 0 <= call_seed([2**62, 7]) < 2**63


class _Head(torch.nn.Module):
    """The shape of Megatron-Core's output layer: ``(logits, bias)``."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, hidden):
        return hidden @ self.weight.t(), None


def test_the_logits_are_divided_by_the_temperature_only_inside():
    model = torch.nn.Module()
    model.output_layer = _Head()
    hidden = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    plain = model.output_layer(hidden)[0]
    with divided_logits(model, 0.5):
        assert torch.allclose(model.output_layer(hidden)[0], plain / 0.5)
    assert torch.equal(model.output_layer(hidden)[0], plain)
    with divided_logits(model, 1.0):  # nothing to do
        assert torch.equal(model.output_layer(hidden)[0], plain)


def _request(tokens, logps, status=None):
    from megatron.core.inference.inference_request import Status

    return SimpleNamespace(generated_tokens=tokens, generated_log_probs=logps,
                           status=status or Status.COMPLETED, events=[])


def test_a_finished_request_becomes_a_completion():
    eos, stops = 2, {9}
    done = _completion(_request([4, 5, 2], [-0.1, -0.2, -0.3]), 0, 8, eos, stops)
    assert (done.tokens, done.logprobs, done.finish_reason) == ([4, 5, 2], [-0.1, -0.2, -0.3], "eos")
    # a stop word ends the request one engine step late: the extra log-prob goes
    late = _completion(_request([4, 9], [-0.1, -0.2, -0.4]), 1, 8, eos, stops)
    assert (late.tokens, late.logprobs, late.finish_reason) == ([4, 9], [-0.1, -0.2], "stop")
    cut = _completion(_request([4, 5, 6], [-0.1, -0.2, -0.3]), 2, 3, eos, stops)
    assert cut.finish_reason == "length" and cut.entropies == []


def test_a_failed_or_short_request_is_a_run_failure():
    from megatron.core.inference.inference_request import Status

    with pytest.raises(RunFailure, match="failed request 3"):
        _completion(_request([], [], Status.FAILED), 3, 8, 2, set())
    with pytest.raises(RunFailure, match="returned 1 log-probs for 2 tokens of request 0"):
        _completion(_request([4, 5], [-0.1]), 0, 8, 2, set())


@CPU_ONLY
def test_check_engine_without_cuda_is_one_line_and_has_help(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("rl", "check-engine", "--config", str(write_rl_run(tmp_path, steps=2)), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "megasmol rl: error: check-engine needs CUDA (Megatron-Core's DynamicInferenceEngine runs on "
        "GPUs only) and this machine has none: run it on a GPU node"]
    shown = run_cli("rl", "check-engine", "--help")
    assert "token_mult_prob_error" in shown.stdout and "--checkpoint" in shown.stdout


def test_the_check_scores_completions_as_the_trainer_and_can_fail():
    """The check's teacher-forced scoring (the RL loss's cross-entropy of logits / T) of megasmol's
    own sampled completions gives back the decoder's log-probs (fp32, CPU), so the comparison
    passes; scored at the wrong temperature, the same tokens fail it."""
    from megasmol.decode.cached import generate
    from megasmol.model.load import single_process_model
    from megasmol.preflight.engine_check import teacher_forced_logps
    from megasmol.rl.logp_agreement import PASS_BELOW, compare_logps, padded
    from tests.specs import tiny_llama

    torch.manual_seed(0)
    model = single_process_model(tiny_llama(init_std=0.1)).eval()
    prompts = [[5, 17, 300, 41], [9, 8, 7, 6, 5, 4, 3]]
    done = generate(model, prompts, 8, sampling=SamplingParams(temperature=0.7), seeds=[1, 2])
    sampled, mask = padded([c.logprobs for c in done])
    right, _ = padded([teacher_forced_logps(model, p, c.tokens, 0.7) for p, c in zip(prompts, done)])
    result = compare_logps(right, sampled, mask, PASS_BELOW)
    assert result.tokens == sum(len(c.tokens) for c in done) > 0
    assert result.max_abs_diff <= 1e-5 and result.passed
    wrong, _ = padded([teacher_forced_logps(model, p, c.tokens, 1.0) for p, c in zip(prompts, done)])
    assert not compare_logps(wrong, sampled, mask, 1.0001).passed


def test_the_table_shows_each_engine_and_the_verdict():
    from megasmol.preflight.engine_check import EngineTiming, table
    from megasmol.rl.logp_agreement import LogpComparison

    lines = table([EngineTiming("megatron-dynamic", 500, 2.0), EngineTiming("megasmol", 480, 6.0)],
                  LogpComparison(500, 0.25, 0.01, 1.012, 1.05))
    assert lines[1].split() == ["megatron-dynamic", "500", "2.00", "250.0"]
    assert lines[2].split() == ["megasmol", "480", "6.00", "80.0"]
    assert "  token_mult_prob_error    1.0120   (pass: <= 1.05)" in lines
    assert lines[-1] == "verdict: PASS"
    failed = table([], LogpComparison(500, 0.25, 0.05, 1.06, 1.05))
    assert failed[-1] == "verdict: FAIL"
