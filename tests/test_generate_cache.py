"""Decoding with Megatron-Core's KV cache gives what recomputing the whole prefix gives."""

import pytest
import torch

from megasmol.decode.cached import Decoder, generate, greedy_generate
from megasmol.model.load import single_process_model
from tests.specs import tiny_smollm3


def _new_tokens(model, prompts, limits, **kwargs):
    return [completion.tokens for completion in generate(model, prompts, limits, **kwargs)]


def _teacher_forced(model, prompt, tokens, use_cache):
    decoder = Decoder(model, prompt.shape[1] + len(tokens), use_cache)
    out = [decoder.start(prompt)]
    for token in tokens[:-1]:
        out.append(decoder.step(torch.tensor([[token]])))
    return torch.cat(out)


SPECS = pytest.mark.parametrize("changes", [
    {},  # NoPE on every 4th layer (layer 3 of 4)
    {"yarn": {"factor": 2.0, "original_max_position_embeddings": 64}, "max_position_embeddings": 128},
    {"attention_backend": "local"},
], ids=["nope", "yarn", "local-attention"])


@SPECS
def test_cached_decoding_matches_recomputing_the_prefix(megatron_runtime, changes):
    torch.manual_seed(0)
    spec = tiny_smollm3(init_std=0.5, **changes)  # large weights: sharp, varied predictions
    assert any(spec.rope_skipped())
    model = single_process_model(spec).eval()
    prompt = torch.randint(0, 5000, (1, 40))
    tokens = torch.randint(0, 5000, (30,)).tolist()  # past the YaRN original length (64)
    cached = _teacher_forced(model, prompt, tokens, use_cache=True)
    full = _teacher_forced(model, prompt, tokens, use_cache=False)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=3e-4)  # logits of size ~10
    greedy = greedy_generate(model, prompt, 12)
    assert greedy.tolist() == greedy_generate(model, prompt, 12, use_cache=False).tolist()
    assert len(set(greedy[0, 40:].tolist())) > 1  # the check can fail: the tokens vary


@SPECS
def test_a_batch_of_prompts_decodes_as_each_prompt_alone(megatron_runtime, changes):
    """Prompts of different lengths (the rows inside their prompts are fed the prompt), different
    limits and a stop rule (rows leave the batch and the cache is reordered): every row gets the
    tokens it gets alone, with the cache and without."""
    torch.manual_seed(1)
    model = single_process_model(tiny_smollm3(init_std=0.5, **changes)).eval()
    prompts = [torch.randint(0, 5000, (n,)).tolist() for n in (9, 40, 3, 23, 17)]
    limits = [12, 5, 30, 20, 1]

    def stop(row, new):  # row 3 stops at its 4th token, wherever that is
        return row == 3 and len(new) == 4

    alone = [greedy_generate(model, torch.tensor([p]), n, stop=lambda new, r=row: stop(r, new))[0, len(p):]
             .tolist() for row, (p, n) in enumerate(zip(prompts, limits))]
    assert [len(a) for a in alone] == [12, 5, 30, 4, 1] and len({tuple(a) for a in alone}) == 5
    for use_cache in (True, False):
        assert _new_tokens(model, prompts, limits, use_cache=use_cache, stop=stop) == alone
    # An end-of-sequence id ends a row: the first token row 2 generates, used as EOS.
    eos = alone[2][0]
    cut = _new_tokens(model, prompts, limits, eos_token_id=eos, stop=stop)
    assert cut[2] == [eos]
    assert cut == [a[:a.index(eos) + 1] if eos in a else a for a in alone]


def test_a_finished_row_leaves_the_batch_at_once(megatron_runtime):
    """The stop rule is checked after every token: once row 0 stops (its 2nd token), the model is
    fed row 1 alone, and ``on_step`` counts only the tokens generated (12, not 2 x 10)."""
    torch.manual_seed(2)
    model = single_process_model(tiny_smollm3(init_std=0.5)).eval()
    prompts = [torch.randint(0, 5000, (6,)).tolist() for _ in range(2)]
    fed, steps = [], []
    hook = model.embedding.register_forward_hook(
        lambda module, args, kwargs, out: fed.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        new = _new_tokens(model, prompts, [10, 10], stop=lambda row, ids: row == 0 and len(ids) == 2,
                          on_step=lambda tokens, finished: steps.append((tokens, finished)))
    finally:
        hook.remove()
    assert [len(ids) for ids in new] == [2, 10]
    assert steps == [(2, 0), (2, 1)] + [(1, 0)] * 7 + [(1, 1)]
    assert sum(tokens for tokens, _ in steps) == 12
    assert fed == [2, 2] + [1] * 8  # the prefill, the step both rows decode, then row 1 alone


def _fed_shapes(model, run):
    """The [rows, tokens] of every forward pass ``run()`` makes, and what it returns."""
    fed = []
    hook = model.embedding.register_forward_hook(
        lambda module, args, kwargs, out: fed.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        return fed, run()
    finally:
        hook.remove()


def test_uneven_prompts_and_copies_of_a_prompt_cost_no_extra_passes(megatron_runtime):
    """Left padding: prompts of 4 and 20 tokens cost one prefill (each distinct prompt once, the 3
    copies of the first sharing its keys and values) and one pass per new token, and every row
    (seeded, so the copies differ) gets what it gets alone."""
    from megasmol.decode.sampling import SamplingParams

    torch.manual_seed(3)
    model = single_process_model(tiny_smollm3(init_std=0.5)).eval()
    short, long = torch.randint(0, 5000, (4,)).tolist(), torch.randint(0, 5000, (20,)).tolist()
    prompts, seeds = [short, long, short, short], [1, 2, 3, 4]
    sampling = SamplingParams(temperature=1.0)
    fed, batch = _fed_shapes(model, lambda: generate(model, prompts, 6, sampling=sampling, seeds=seeds))
    assert fed == [(2, 20)] + [(4, 1)] * 5
    assert len({tuple(c.tokens) for c in batch}) == 4  # the copies sampled apart
    for prompt, seed, done in zip(prompts, seeds, batch):
        [alone] = generate(model, [prompt], 6, sampling=sampling, seeds=[seed])
        assert alone.tokens == done.tokens
        # float32 rounding of the shifted rotary angles, with weights this large (logits ~10)
        torch.testing.assert_close(alone.logprobs, done.logprobs, rtol=0, atol=1e-4)


def test_attention_without_explicit_masks_shares_one_cache_offset(megatron_runtime):
    """Transformer Engine's attention would not apply a padding mask: for such a backend the rows
    share one offset (the short prompt fed token by token), with the same tokens."""
    torch.manual_seed(4)
    model = single_process_model(tiny_smollm3(init_std=0.5)).eval()
    prompts = [torch.randint(0, 5000, (n,)).tolist() for n in (3, 9)]
    fed, padded = _fed_shapes(model, lambda: _new_tokens(model, prompts, 5))
    assert fed == [(2, 9)] + [(2, 1)] * 4
    model.attention_backend = "te"  # only what generate asks of it: the forward passes stay sdpa
    try:
        fed, shared = _fed_shapes(model, lambda: _new_tokens(model, prompts, 5))
    finally:
        model.attention_backend = "sdpa"
    assert fed == [(2, 3)] + [(2, 1)] * 4 + [(1, 1)] * 6  # 6 passes more: 9 - 3 prompt tokens
    assert shared == padded and len(set(padded[0] + padded[1])) > 2


def test_decoding_rotates_each_key_once_as_it_enters_the_cache(megatron_runtime, monkeypatch):
    """``model/cached_rotary.py``: after the prefill a pass rotates its one new key and query per
    rope layer, together in one call, not the whole cache (Megatron-Core's static path re-rotates
    every cached key), and decodes what recomputing the prefix decodes (the cached/uncached tests
    above, all specs)."""
    import megatron.core.transformer.attention as mcore_attention

    import megasmol.model.cached_rotary as cached_rotary

    torch.manual_seed(5)
    model = single_process_model(tiny_smollm3(init_std=0.5)).eval()
    rotated = []

    def recording(rotate):
        def apply(t, freqs, *args, **kwargs):
            rotated.append(tuple(t.shape[::2]))  # (positions, heads)
            return rotate(t, freqs, *args, **kwargs)
        return apply

    for module in (mcore_attention, cached_rotary):
        monkeypatch.setattr(module, "apply_rotary_pos_emb", recording(module.apply_rotary_pos_emb))
    prompt = torch.randint(0, 5000, (1, 12))
    out = greedy_generate(model, prompt, 6)
    rope_layers = sum(not skip for skip in model.config.no_rope_freq)
    heads = model.config.num_attention_heads + model.config.num_query_groups  # queries and keys
    prefill = rope_layers  # the 12 prompt tokens' queries and keys, in one call per layer
    assert rotated[:prefill] == [(12, heads)] * prefill
    assert rotated[prefill:] == [(1, heads)] * (rope_layers * 5)  # 5 passes after the prefill
    monkeypatch.undo()
    assert out.tolist() == greedy_generate(model, prompt, 6, use_cache=False).tolist()
