import pytest
import torch

from megasmol.config.parallel import ParallelLayout
from megasmol.config.typed import ConfigError
from megasmol.model.flops import flops_per_token, parameter_count
from megasmol.model.spec import load_model_spec, model_spec_from_dict, preset_names
from tests.specs import tiny_llama, tiny_smollm3


def test_presets_load_and_smollm3_numbers():
    assert {"smollm3-3b", "smollm3-tiny", "smollm2-135m", "smollm2-1.7b"} <= set(preset_names())
    spec = load_model_spec("smollm3-3b")
    assert (spec.num_layers, spec.hidden_size, spec.ffn_hidden_size) == (36, 2048, 11008)
    assert (spec.num_attention_heads, spec.num_kv_heads, spec.kv_channels) == (16, 4, 128)
    assert spec.vocab_size == 128256 and spec.rope_theta == 50000.0 and spec.tie_embeddings
    assert [i for i, s in enumerate(spec.rope_skipped()) if s] == list(range(3, 36, 4))
    for name in ("smollm2-135m", "smollm2-1.7b"):
        assert not any(load_model_spec(name).rope_skipped())


def test_unknown_and_bad_fields_are_named(tmp_path):
    data = tiny_smollm3().to_dict()
    with pytest.raises(ConfigError, match="num_heads"):
        model_spec_from_dict({**data, "num_heads": 4})
    with pytest.raises(ConfigError, match="num_kv_heads"):
        model_spec_from_dict({**data, "num_kv_heads": 3})
    with pytest.raises(ConfigError, match="hidden_size"):
        model_spec_from_dict({**data, "hidden_size": "wide"})
    with pytest.raises(ConfigError, match="nope_interval"):
        model_spec_from_dict({**data, "nope_interval": 3})
    with pytest.raises(ConfigError, match="unknown model spec"):
        load_model_spec("no-such-model")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_model_spec(bad)


def test_explicit_nope_layers():
    spec = tiny_smollm3(nope_interval=None, nope_layers=[0, 2])
    assert spec.rope_skipped() == [True, False, True, False]


def test_parallel_layout_errors_name_the_field():
    spec = load_model_spec("smollm3-3b")
    ParallelLayout(tensor_parallel=2).check(384, spec)
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ParallelLayout(tensor_parallel=8).check(64, spec)
    with pytest.raises(ConfigError, match="num_layers"):
        ParallelLayout(pipeline_parallel=5).check(10, spec)
    with pytest.raises(ConfigError, match="world size"):
        ParallelLayout(tensor_parallel=2).check(3, spec)
    with pytest.raises(ConfigError, match="context_parallel"):
        ParallelLayout(context_parallel=4).check(4, spec, seq_length=4100)


def _hf_parameter_count(hf_config: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec_fn", [lambda: load_model_spec("smollm3-3b"), tiny_llama,
                                     lambda: load_model_spec("smollm2-135m")])
def test_parameter_count_matches_transformers(spec_fn):
    from megasmol.convert.hf_config import hf_config

    spec = spec_fn()
    assert parameter_count(spec).total == _hf_parameter_count(hf_config(spec, "float32"))


def test_smollm3_3b_is_about_3_08b_and_flops_include_attention():
    spec = load_model_spec("smollm3-3b")
    total = parameter_count(spec).total
    assert 3.05e9 < total < 3.1e9
    short, long = flops_per_token(spec, 1024), flops_per_token(spec, 4096)
    # 4 * L * s * heads*head_dim per forward, times 3 for training.
    assert long - short == pytest.approx(3 * 4 * 36 * (4096 - 1024) * 2048)
    # 6N rule of thumb within the attention term.
    assert long > 6 * 2.8e9
