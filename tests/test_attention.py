from megasmol.model.attention import SDPACoreAttention
from tests.attention_check import compare
from tests.conftest import WORKERS, run_torchrun
from tests.specs import tiny_smollm3
from tests.zloss_check import zloss_error


def small_spec():
    return tiny_smollm3(vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def test_sdpa_is_the_default_without_transformer_engine(megatron_runtime):
    from megasmol.model.gpt import build_model

    model = build_model(small_spec())
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, SDPACoreAttention)


def test_sdpa_matches_megatron_local_attention(megatron_runtime):
    results = compare(small_spec())
    for case in ("causal", "document_dense_mask", "document_cu_seqlens"):
        logits_err, grad_err = results[case]
        assert logits_err < 1e-5, case
        assert grad_err < 1e-4, case
    assert results["mask_effect"] > 1e-3


def test_sdpa_and_zloss_with_tp2(tmp_path):
    proc = run_torchrun([str(WORKERS / "attention_tp2.py"), str(tmp_path / "result.json")])
    import json

    results = json.loads((tmp_path / "result.json").read_text())
    for case in ("causal", "document_dense_mask", "document_cu_seqlens"):
        logits_err, grad_err = results[case]
        assert logits_err < 1e-5 and grad_err < 1e-4, (case, proc.stdout)
    assert results["mask_effect"] > 1e-3
    assert results["zloss_error"] < 1e-5


def test_zloss_is_added_to_the_lm_loss(megatron_runtime):
    assert zloss_error(small_spec()) < 1e-5


def test_sdpa_thd_layout_matches_sbhd(megatron_runtime):
    """Transformer Engine's THD layout ([t, heads, d]) gives the sbhd result with b = 1."""
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    from megasmol.model.gpt import build_model

    layer = build_model(small_spec()).decoder.layers[0].self_attention.core_attention
    gen = torch.Generator().manual_seed(0)
    heads, groups = layer.heads_per_partition, layer.groups_per_partition
    q = torch.randn(10, 1, heads, 16, generator=gen)
    k, v = (torch.randn(10, 1, groups, 16, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)

    def params(fmt):
        return PackedSeqParams(qkv_format=fmt, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=10, max_seqlen_kv=10)

    sbhd = layer(q, k, v, None, packed_seq_params=params("sbhd"))
    thd = layer(q.squeeze(1), k.squeeze(1), v.squeeze(1), None, packed_seq_params=params("thd"))
    assert thd.shape == (10, heads * 16)
    assert torch.allclose(thd, sbhd.squeeze(1))
    # The second document (tokens 4..9) does not see the first.
    q2 = q.clone()
    k2, v2 = k.clone(), v.clone()
    k2[:4] += 1.0
    v2[:4] += 1.0
    moved = layer(q2, k2, v2, None, packed_seq_params=params("sbhd"))
    assert torch.allclose(moved[4:], sbhd[4:]) and not torch.allclose(moved[:4], sbhd[:4])


def test_flex_context_parallel_masks_match_dense_masks():
    """The FlexAttention mask the GPU takes for CP (queries at one rank's load-balanced
    positions, K/V gathered rank by rank) equals the dense mask the CPU takes (forward only:
    FlexAttention has no CPU backward). Half a document masked away would change the result."""
    import torch
    import torch.nn.functional as F

    from megasmol.model.attention import _flex_positional_attention, context_parallel_positions

    gen = torch.Generator().manual_seed(0)
    b, heads, groups, dim, seq, cp = 2, 4, 2, 16, 256, 2
    q = torch.randn(b, heads, seq // cp, dim, generator=gen)
    k, v = (torch.randn(b, groups, seq, dim, generator=gen) for _ in range(2))
    q_pos = context_parallel_positions(seq, cp, 1)
    k_pos = torch.cat([context_parallel_positions(seq, cp, r) for r in range(cp)])
    assert q_pos.tolist() == list(range(64, 192))
    doc = torch.cumsum((torch.rand(b, seq, generator=gen) < 0.03).long(), 1)
    causal = (q_pos[:, None] >= k_pos[None, :]).expand(b, -1, -1)
    same_doc = doc[:, q_pos][:, :, None] == doc[:, k_pos][:, None, :]
    for docs, allowed in ((doc, causal & same_doc), (None, causal)):
        flex = _flex_positional_attention(q, k, v, q_pos, k_pos, docs, 0.25)
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1), scale=0.25,
                                               enable_gqa=True)
        assert (flex - dense).abs().max() < 1e-5
    assert (_flex_positional_attention(q, k, v, q_pos, k_pos, None, 0.25) - flex).abs().max() == 0
    assert not torch.allclose(_flex_positional_attention(q, k, v, q_pos, k_pos, doc, 0.25), flex, atol=1e-3)
