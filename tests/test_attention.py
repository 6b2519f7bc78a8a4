import pytest

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


def test_sdpa_refuses_context_parallel_and_thd(megatron_runtime):
    from megatron.core.packed_seq_params import PackedSeqParams
    import torch

    from megasmol.model.gpt import build_model

    layer = build_model(small_spec()).decoder.layers[0].self_attention.core_attention
    q = torch.zeros(8, 1, 2, 16)
    with pytest.raises(ValueError, match="THD"):
        layer(q, q[:, :, :1], q[:, :, :1], None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
