"""The shared decoder (``megasmol.decode``): seeded sampling per row, log-probabilities of what it
chose that equal a fresh forward pass (what RL's trainer recomputes), top_k / top_p restrictions."""

import json
import math

import pytest
import torch

from megasmol.config.typed import ConfigError
from megasmol.decode.cached import generate
from megasmol.decode.completion import Completion
from megasmol.decode.sampling import SamplingParams, choose
from megasmol.model.load import single_process_model
from tests.specs import tiny_llama

SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.95)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return single_process_model(tiny_llama(init_std=0.1)).eval()


def _prompts(*lengths):
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


def test_a_seeded_row_is_the_same_alone_or_in_any_batch(model):
    prompts, seeds, limits = _prompts(5, 11, 3, 8), [7, 8, 9, 10], [6, 9, 7, 4]
    batch = generate(model, prompts, limits, sampling=SAMPLED, seeds=seeds)
    assert [len(c.tokens) for c in batch] == limits
    assert all(c.finish_reason == "length" for c in batch)
    for row, (prompt, seed, limit) in enumerate(zip(prompts, seeds, limits)):
        [alone] = generate(model, [prompt], limit, sampling=SAMPLED, seeds=[seed])
        assert alone.tokens == batch[row].tokens
        # float32 rounding only: other batch shapes, the prompt fed token by token past the
        # shortest one instead of in the prefill
        torch.testing.assert_close(alone.logprobs, batch[row].logprobs, rtol=1e-6, atol=1e-6)
    # The same prompt with another seed (and greedily) goes elsewhere: the check can fail.
    [other] = generate(model, prompts[:1], limits[0], sampling=SAMPLED, seeds=[11])
    [greedy] = generate(model, prompts[:1], limits[0])
    assert len({tuple(batch[0].tokens), tuple(other.tokens), tuple(greedy.tokens)}) == 3


@pytest.mark.parametrize("sampling", [SAMPLED, SamplingParams()], ids=["sampled", "greedy"])
def test_log_probs_equal_a_fresh_full_forward_pass(model, sampling):
    """RL's on-policy check: the trainer's uncached pass over prompt + completion gives each
    completion token log_softmax(logits / T) (T = 1 when greedy) within 1e-5 of the decoder's; the
    decoder's entropies are TRL's ``entropy_from_logits(logits / T)`` of the same pass (the whole
    vocabulary, before top_k / top_p)."""
    from trl.trainer.utils import entropy_from_logits

    prompts = _prompts(4, 9)
    done = generate(model, prompts, 8, sampling=sampling, seeds=[1, 2])
    for prompt, completion in zip(prompts, done):
        ids = torch.tensor([prompt + completion.tokens])
        with torch.no_grad(), model.forward_only():
            logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)[0].float()
        scale = sampling.temperature or 1.0
        fresh = torch.log_softmax(logits / scale, dim=-1)[len(prompt) - 1:-1]
        expected = fresh.gather(-1, torch.tensor(completion.tokens).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, rtol=0, atol=1e-5)
        assert min(completion.logprobs) < -0.5  # not a certain distribution: the check can fail
        entropies = entropy_from_logits(logits / scale)[len(prompt) - 1:-1]
        torch.testing.assert_close(torch.tensor(completion.entropies), entropies, rtol=0, atol=1e-5)
        if sampling.top_k:  # the whole vocabulary's, not that of the top_k set (at most log top_k)
            assert max(completion.entropies) > math.log(sampling.top_k)
        if sampling.temperature == 0:
            assert completion.tokens == fresh.argmax(-1).tolist()


def test_top_k_1_is_greedy(model):
    prompts = _prompts(6, 2, 10)
    greedy = generate(model, prompts, 6)
    top1 = generate(model, prompts, 6, sampling=SamplingParams(temperature=1.0, top_k=1), seeds=[3, 4, 5])
    assert top1 == greedy


def test_rows_end_at_eos_a_stop_rule_or_their_limit(model):
    prompts = _prompts(5, 7, 4)
    free = generate(model, prompts, 6, sampling=SAMPLED, seeds=[1, 2, 3])
    eos = free[0].tokens[2]
    done = generate(model, prompts, [6, 6, 0], sampling=SAMPLED, seeds=[1, 2, 3], eos_token_id=eos,
                    stop=lambda row, new: row == 1 and len(new) == 2)
    assert done[0] == Completion(free[0].tokens[:3], free[0].logprobs[:3], "eos", free[0].entropies[:3])
    assert done[1].tokens == free[1].tokens[:2] and done[1].finish_reason == "stop"
    assert done[2] == Completion([], [], "length")


def _allowed(probs: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """The tokens transformers' top-k then top-p warpers keep (no ties in random logits)."""
    order = probs.argsort(descending=True)[:top_k or None]
    kept = probs[order] / probs[order].sum()
    before = kept.cumsum(0) - kept
    return set(order[before < top_p].tolist())


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (12, 0.8), (1, 0.3)])
def test_sampling_draws_only_inside_the_top_k_top_p_set_in_proportion(top_k, top_p):
    """4,000 rows with the same logits and a generator each: every draw is in the restricted set,
    the frequencies follow the renormalized probabilities, and the log-probability reported is the
    unrestricted one at the temperature."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 2
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    rows = 4000
    tokens, log_probs = choose(logits.expand(rows, -1), params,
                               [torch.Generator().manual_seed(i) for i in range(rows)])
    probs = torch.softmax(logits / 0.7, dim=-1)
    allowed = _allowed(probs, top_k, top_p)
    assert set(tokens.tolist()) == allowed
    inside = torch.tensor(sorted(allowed))
    frequencies = torch.bincount(tokens, minlength=50)[inside].float() / rows
    torch.testing.assert_close(frequencies, probs[inside] / probs[inside].sum(), rtol=0, atol=0.03)
    torch.testing.assert_close(log_probs, probs.log()[tokens], rtol=0, atol=1e-5)


@pytest.mark.parametrize("implementation", ["draw", "_draw_torch"])
def test_the_blockwise_draw_is_the_inverse_transform_and_never_picks_a_zero(implementation):
    """``draw`` sums by blocks of the vocabulary, then inside one: the same tokens as one float64
    cumulative sum over the whole vocabulary (a 5,000-entry vocabulary, 20 blocks, whole blocks and
    block edges at probability 0), and at the extreme numbers the first and last possible token;
    on a CPU in numpy past the block sums, elsewhere in torch calls (both checked here)."""
    from megasmol.decode import sampling
    from megasmol.decode.sampling import BLOCK

    draw = getattr(sampling, implementation)

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5000, generator=g) ** 4
    probs[:BLOCK + 3] = 0  # the first block and the next one's start
    probs[3 * BLOCK - 5:5 * BLOCK] = 0  # whole blocks
    probs[-7:] = 0
    uniform = torch.cat([torch.rand(3000, dtype=torch.float64, generator=g),
                         torch.tensor([0.0, 1 - 2 ** -53], dtype=torch.float64)])
    rows = probs.expand(len(uniform), -1)
    tokens = draw(rows, uniform)
    cdf = probs.double().cumsum(0)
    reference = torch.searchsorted(cdf, (uniform * cdf[-1]).clamp(max=cdf[-1].item() * (1 - 2 ** -52)),
                                   right=True)
    assert tokens.tolist() == reference.tolist()
    assert bool((probs[tokens] > 0).all())
    assert tokens[-2].item() == BLOCK + 3 and tokens[-1].item() == 5000 - 8
    assert len(set(tokens.tolist())) > 1000  # draws spread over the blocks: the check can fail
    assert tokens.dtype == torch.long


def test_a_rows_numbers_drawn_by_chunks_are_those_drawn_one_per_token():
    """``UniformStreams`` draws ``CHUNK`` numbers per call: the same numbers in the same order as
    one ``torch.rand`` per token from the row's generator (the per-request seeding RL relies on),
    past a chunk's end and with rows drawing at different paces."""
    from megasmol.decode.sampling import UniformStreams

    streams = UniformStreams([torch.Generator().manual_seed(seed) for seed in (5, 6, 7)])
    got: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for step in range(2 * UniformStreams.CHUNK + 9):
        rows = [0, 2] if step % 3 else [0, 1, 2]  # row 1 draws on every third step only
        for row, number in zip(rows, streams.next(rows)):
            got[row].append(number)
    for row, seed in enumerate((5, 6, 7)):
        g = torch.Generator().manual_seed(seed)
        assert got[row] == [torch.rand((), dtype=torch.float64, generator=g).item() for _ in got[row]]
    assert len(got[1]) < UniformStreams.CHUNK < len(got[0]) and got[0][:5] != got[2][:5]


@pytest.mark.parametrize("temperature", [None, 1.0, 0.7])
def test_log_probs_over_a_large_vocabulary_are_exact_to_float_rounding(temperature):
    """On a SmolLM3-size vocabulary (128,256) with one dominant logit, as a trained model's, the
    reported log-probability equals float64's within 2e-6 (torch's fp32 CPU ``log_softmax`` is
    off by about 5e-5 here, which RL's on-policy check would see)."""
    logits = torch.randn(8, 128256, generator=torch.Generator().manual_seed(0))
    logits[:, 0] = 16.0
    params = SamplingParams() if temperature is None else SamplingParams(temperature=temperature)
    generators = None if temperature is None else [torch.Generator().manual_seed(i) for i in range(8)]
    tokens, log_probs = choose(logits, params, generators)
    exact = torch.log_softmax(logits.double() / (temperature or 1.0), dim=-1)
    torch.testing.assert_close(log_probs.double(), exact.gather(-1, tokens[:, None])[:, 0],
                               rtol=0, atol=2e-6)


@pytest.mark.parametrize("changes,field", [({"temperature": -1.0}, "temperature"),
                                           ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                           ({"top_k": -2}, "top_k"), ({"top_k": 2.5}, "top_k")])
def test_bad_sampling_parameters_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**changes).validate()


def test_parallel_layouts_sample_what_one_process_does(tmp_path):
    """``decode.parallel`` under TP=2 (the whole vocabulary gathered before sampling), PP=2 (the
    last stage chooses), CP=2 and DP=2 (a replica's own prompts), 2 gloo processes: the same
    tokens and finish reasons as the one-process KV-cache decoder, log-probabilities and entropies
    (over the whole vocabulary: under TP, the gathered one) within 1e-5, sampled with seeds and
    greedy."""
    from megasmol.model.init import init_checkpoint
    from megasmol.model.load import load_checkpoint_model
    from megasmol.runtime.distributed import shutdown
    from tests.conftest import WORKERS, run_torchrun

    init_checkpoint(tiny_llama(init_std=0.1), tmp_path / "ckpt", seed=4)
    prompts, limits, seeds = _prompts(5, 11, 3), [6, 4, 7], [21, 22, 23]
    try:
        model, _, _ = load_checkpoint_model(tmp_path / "ckpt")
        eos = generate(model, prompts, limits)[2].tokens[3]  # greedy row 2 ends at its 4th token
        expected = {label: generate(model, prompts, limits, sampling=sampling, seeds=seeds, eos_token_id=eos)
                    for label, sampling in (("sampled", SAMPLED), ("greedy", SamplingParams()))}
    finally:
        shutdown()
    assert expected["greedy"][2].finish_reason == "eos"
    assert expected["sampled"][0].tokens != expected["greedy"][0].tokens
    case = {"prompts": prompts, "limits": limits, "seeds": seeds, "eos": eos,
            "sampling": {"temperature": SAMPLED.temperature, "top_k": SAMPLED.top_k, "top_p": SAMPLED.top_p}}
    (tmp_path / "case.json").write_text(json.dumps(case))
    run_torchrun([str(WORKERS / "decode_layouts.py"), str(tmp_path / "ckpt"), str(tmp_path / "case.json"),
                  str(tmp_path / "out.json")])
    results = json.loads((tmp_path / "out.json").read_text())
    for layout in ("tp2", "pp2", "cp2", "dp2"):
        for label, completions in expected.items():
            got = results[f"{layout}-{label}"]
            for row, want in enumerate(completions):
                have = got[str(row)]
                assert (have["tokens"], have["finish_reason"]) == (want.tokens, want.finish_reason), \
                    (layout, label, row)
                torch.testing.assert_close(have["logprobs"], want.logprobs, rtol=0, atol=1e-5)
                torch.testing.assert_close(have["entropies"], want.entropies, rtol=0, atol=1e-5)


def test_chat_samples_with_the_decode_rooms_rule(tmp_path, llama_tokenizer_dir):
    """``megasmol chat``'s session: a seed repeats a sampled reply, top_k=1 is the greedy reply."""
    from megasmol.chat.session import ChatSession
    from megasmol.model.init import init_checkpoint
    from megasmol.runtime.distributed import shutdown
    from tests.specs import tiny_smollm3

    init_checkpoint(tiny_smollm3(init_std=0.1), tmp_path / "ckpt", seed=5, tokenizer=llama_tokenizer_dir)

    def reply(sampling, seed=None):
        session = ChatSession.from_checkpoint(tmp_path / "ckpt", template="chatml", max_new_tokens=8,
                                              sampling=sampling, seed=seed)
        session.messages.append({"role": "user", "content": "hello"})
        return session.generate(session.prompt_ids())

    try:
        greedy = reply(SamplingParams())
        sampled = [reply(SamplingParams(temperature=1.0), seed) for seed in (1, 1, 2)]
        top1 = reply(SamplingParams(temperature=1.0, top_k=1), seed=3)
    finally:
        shutdown()
    assert sampled[0] == sampled[1] != sampled[2] and sampled[0] != greedy
    assert top1 == greedy and len(greedy) == 8
