"""Tiny model specs used across tests."""

from megasmol.model.spec import load_model_spec, model_spec_from_dict


def tiny_smollm3(**changes):
    return load_model_spec("smollm3-tiny").replace(**changes)


def tiny_llama(**changes):
    data = dict(
        name="llama-tiny", architecture="llama", num_layers=2, hidden_size=48,
        ffn_hidden_size=96, num_attention_heads=6, num_kv_heads=2, head_dim=8,
        vocab_size=512, max_position_embeddings=256, norm_eps=1e-5, rope_theta=10000.0,
        tie_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    data.update(changes)
    return model_spec_from_dict(data)
