"""ModelSpec <-> Hugging Face ``config.json``."""

from __future__ import annotations

from typing import Optional

from megasmol.config.typed import ConfigError
from megasmol.model.spec import ModelSpec, YarnSpec, model_spec_from_dict

HF_ARCHITECTURES = {"smollm3": "SmolLM3ForCausalLM", "llama": "LlamaForCausalLM"}


def rope_block(spec: ModelSpec, yarn: Optional[YarnSpec]) -> tuple[dict, Optional[dict]]:
    """(rope_parameters as transformers >= 5 reads it, rope_scaling as 4.x reads it)."""
    parameters = {"rope_type": "default", "rope_theta": spec.rope_theta}
    scaling = None
    if yarn is not None and yarn.factor > 1.0:
        scaling = {
            "rope_type": "yarn",
            "factor": yarn.factor,
            "original_max_position_embeddings": yarn.original_max_position_embeddings,
            "beta_fast": yarn.beta_fast,
            "beta_slow": yarn.beta_slow,
        }
        parameters = {**scaling, "rope_theta": spec.rope_theta}
    return parameters, scaling


def hf_config(spec: ModelSpec, torch_dtype: str, yarn: Optional[YarnSpec] = None) -> dict:
    if spec.qk_norm:
        raise ConfigError(
            f"{spec.name}: qk_norm has no equivalent in {HF_ARCHITECTURES[spec.architecture]}; "
            "this model cannot be exported to Hugging Face format"
        )
    yarn = yarn if yarn is not None else spec.yarn
    rope_parameters, rope_scaling = rope_block(spec, yarn)
    max_positions = spec.max_position_embeddings
    if rope_scaling is not None:
        max_positions = max(max_positions, int(yarn.factor * yarn.original_max_position_embeddings))
    config = {
        "architectures": [HF_ARCHITECTURES[spec.architecture]],
        "model_type": spec.architecture,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "initializer_range": spec.init_std,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_parameters": rope_parameters,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "pad_token_id": spec.pad_token_id,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }
    skipped = spec.rope_skipped()
    if spec.architecture == "smollm3":
        # transformers' polarity: 1 where RoPE IS applied (the opposite of Megatron's
        # no_rope_freq, which is 1 where it is skipped).
        config["no_rope_layers"] = [0 if s else 1 for s in skipped]
        config["no_rope_layer_interval"] = spec.nope_interval or 4
        config["use_sliding_window"] = False
        config["sliding_window"] = None
    elif any(skipped):
        raise ConfigError(f"{spec.name}: NoPE layers need architecture smollm3, not llama")
    return config


def spec_from_hf_config(config: dict, name: str) -> ModelSpec:
    """A ModelSpec from an HF config.json dict (SmolLM3 or Llama architecture)."""
    model_type = config.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(HF_ARCHITECTURES)})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConfigError(f"config.json: {flag}=true is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {config['hidden_act']!r} is not supported")
    if config.get("use_sliding_window"):
        raise ConfigError("config.json: use_sliding_window=true is not supported")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type") == "yarn" else None)
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    yarn = None
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        if scaling.get("rope_type", scaling.get("type")) != "yarn":
            raise ConfigError(f"config.json: rope scaling {scaling!r} is not supported")
        yarn = {
            "factor": float(scaling["factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
            "beta_fast": float(scaling.get("beta_fast", 32.0)),
            "beta_slow": float(scaling.get("beta_slow", 1.0)),
        }
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "vocab_size", "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = config.get(key)
        required = key in ("num_hidden_layers", "hidden_size", "intermediate_size",
                           "num_attention_heads", "vocab_size")
        if value is None and required:
            raise ConfigError(f"config.json: {key} is missing")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"config.json: {key} must be a positive integer, got {value!r}")
    heads = config["num_attention_heads"]
    data = {
        "name": name,
        "architecture": model_type,
        "num_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "ffn_hidden_size": config["intermediate_size"],
        "num_attention_heads": heads,
        "num_kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "vocab_size": config["vocab_size"],
        "max_position_embeddings": config.get("max_position_embeddings", 4096),
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": float(theta),
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)),
        "init_std": config.get("initializer_range", 0.02),
        "bos_token_id": config.get("bos_token_id") if config.get("bos_token_id") is not None else 0,
        "eos_token_id": _first(config.get("eos_token_id"), 0),
        "pad_token_id": config.get("pad_token_id"),
        "yarn": yarn,
    }
    if model_type == "smollm3":
        layers = config["num_hidden_layers"]
        applied = config.get("no_rope_layers")
        if applied is None:
            interval = config.get("no_rope_layer_interval", 4)
            applied = [int((i + 1) % interval != 0) for i in range(layers)]
        skipped = [i for i, a in enumerate(applied) if not a]
        interval = config.get("no_rope_layer_interval")
        if interval and skipped == [i for i in range(layers) if (i + 1) % interval == 0]:
            data["nope_interval"] = interval
        elif skipped:
            data["nope_layers"] = skipped
    return model_spec_from_dict(data)


def _first(value, default):
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value
