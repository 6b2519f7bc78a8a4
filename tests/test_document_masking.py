"""Document masking: a packed sequence's loss is the sum of its documents' own losses."""

import pytest
import torch

from megasmol.data.masking import (
    BACKEND_MASK_FORMAT,
    cu_seqlens,
    document_ids,
    model_inputs,
    pad_documents,
    restarted_positions,
)
from megasmol.model.gpt import build_model
from megasmol.runtime.distributed import set_seed
from tests.specs import tiny_smollm3

EOS = 2
VOCAB = 256


def _documents():
    gen = torch.Generator().manual_seed(3)
    lengths = [7, 12, 5, 9]  # EOS included; the last one is cut by the sample boundary
    docs = [torch.cat([torch.randint(3, VOCAB, (n - 1,), generator=gen), torch.tensor([EOS])])
            for n in lengths]
    return docs


def _packed_batch(docs, seq):
    text = torch.cat(docs)[: seq + 1]
    tokens, labels = text[:-1].unsqueeze(0), text[1:].unsqueeze(0)
    loss_mask = (tokens != EOS).float()  # what GPTDataset's eod_mask_loss produces
    positions = torch.arange(seq).unsqueeze(0)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": positions}


def _summed_loss(model, inputs):
    per_token = model(inputs.tokens, inputs.position_ids, inputs.attention_mask,
                      labels=inputs.labels, packed_seq_params=inputs.packed_seq_params)
    return (per_token.float() * inputs.loss_mask).sum()


def _isolated_loss(model, doc):
    # The document alone: every next-token prediction inside it, EOS included as a target.
    tokens, labels = doc[:-1].unsqueeze(0), doc[1:].unsqueeze(0)
    positions = torch.arange(tokens.size(1)).unsqueeze(0)
    return model(tokens, positions, None, labels=labels).float().sum()


def _inputs(batch, mask_format):
    # "thd-padded": every document padded to a multiple of 8 tokens, as for TE context
    # parallelism with CP=4; RoPE restarts at each padded offset, padding gets no loss.
    if mask_format == "thd-padded":
        return pad_documents(model_inputs(batch, EOS, True, "thd"), 8)
    return model_inputs(batch, EOS, True, mask_format)


@pytest.mark.parametrize("backend,mask_format", [("sdpa", "sbhd"), ("sdpa", "thd"), ("sdpa", "thd-padded"),
                                                 ("local", "dense")])
def test_packed_loss_equals_sum_of_documents(megatron_runtime, backend, mask_format):
    spec = tiny_smollm3(vocab_size=VOCAB, eos_token_id=EOS, bos_token_id=1, pad_token_id=0,
                        attention_backend=backend)
    set_seed(7)
    model = build_model(spec).eval()
    docs = _documents()
    seq = sum(len(d) for d in docs[:3]) + 4  # three whole documents and 4 tokens of the fourth
    batch = _packed_batch(docs, seq)
    with torch.no_grad():
        masked = _summed_loss(model, _inputs(batch, mask_format))
        plain = _summed_loss(model, model_inputs(batch, EOS, False, "sbhd"))
        expected = sum(_isolated_loss(model, d) for d in docs[:3])
        # The sample holds 4 tokens of the fourth document; its extra label token is the 5th.
        expected = expected + _isolated_loss(model, docs[3][:5])
    assert torch.allclose(masked, expected, rtol=1e-5, atol=1e-4), (masked, expected)
    # Without document masking, later documents attend to earlier ones: the loss differs.
    assert not torch.allclose(plain, expected, rtol=1e-3, atol=1e-3)


def test_backends_map_to_formats():
    assert BACKEND_MASK_FORMAT == {"te": "thd", "sdpa": "sbhd", "local": "dense"}


def test_boundaries_positions_and_thd_flattening():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, 8], [9, EOS, 4, 4, 4, EOS]])
    assert document_ids(tokens, EOS).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 1]]
    # Row boundaries (0, 6, 12) plus one after every EOS except where a row ends anyway.
    assert cu_seqlens(tokens, EOS).tolist() == [0, 3, 5, 6, 8, 12]
    assert restarted_positions(tokens, EOS).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(2, 6),
             "position_ids": torch.arange(6).expand(2, -1)}
    thd = model_inputs(batch, EOS, True, "thd")
    assert thd.tokens.shape == (1, 12) and thd.packed_seq_params.qkv_format == "thd"
    assert thd.packed_seq_params.max_seqlen_q == 4
    reset = model_inputs(batch, EOS, True, "sbhd", reset_position_ids=True)
    assert reset.position_ids.tolist()[1] == [0, 1, 0, 1, 2, 3]
    dense = model_inputs(batch, EOS, True, "dense")
    # Token 3 of row 0 (a new document) must not see tokens 0-2.
    assert dense.attention_mask[0, 0, 3, :3].all() and not dense.attention_mask[0, 0, 3, 3]


def test_documents_padded_for_context_parallelism_keep_their_tokens_in_place():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, 8], [9, EOS, 4, 4, 4, EOS]])
    batch = {"tokens": tokens, "labels": tokens + 100, "loss_mask": torch.ones(2, 6),
             "position_ids": torch.arange(6).expand(2, -1)}
    padded = pad_documents(model_inputs(batch, EOS, True, "thd"), 4)
    params = padded.packed_seq_params
    # Real lengths 3, 2, 1, 2, 4 -> padded 4, 4, 4, 4, 4.
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 6, 8, 12]
    assert params.cu_seqlens_q_padded.tolist() == [0, 4, 8, 12, 16, 20]
    assert params.max_seqlen_q == 4
    assert padded.tokens.tolist() == [[5, 6, EOS, 0, 7, EOS, 0, 0, 8, 0, 0, 0,
                                       9, EOS, 0, 0, 4, 4, 4, EOS]]
    assert padded.labels[0, :3].tolist() == [105, 106, 102]
    assert padded.loss_mask.sum() == 12 and padded.loss_mask[0, 3] == 0
    with pytest.raises(ValueError, match="THD"):
        pad_documents(model_inputs(batch, EOS, True, "sbhd"), 4)
