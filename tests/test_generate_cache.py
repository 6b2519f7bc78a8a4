"""Decoding with Megatron-Core's KV cache gives what recomputing the whole prefix gives."""

import pytest
import torch

from megasmol.generate import Decoder, greedy_generate
from megasmol.model.load import single_process_model
from tests.specs import tiny_smollm3


def _teacher_forced(model, prompt, tokens, use_cache):
    decoder = Decoder(model, prompt.shape[1] + len(tokens), use_cache)
    out = [decoder.start(prompt)]
    for token in tokens[:-1]:
        out.append(decoder.step(torch.tensor([[token]])))
    return torch.cat(out)


@pytest.mark.parametrize("changes", [
    {},  # NoPE on every 4th layer (layer 3 of 4)
    {"yarn": {"factor": 2.0, "original_max_position_embeddings": 64}, "max_position_embeddings": 128},
    {"attention_backend": "local"},
], ids=["nope", "yarn", "local-attention"])
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
