"""HF export/import: logit parity, exact round trips, greedy generation, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from megasmol.ckpt.checkpoint import CheckpointError
from megasmol.config.typed import ConfigError
from megasmol.convert.export import export_hf
from megasmol.convert.import_hf import import_hf
from megasmol.decode.cached import greedy_generate
from megasmol.model.init import init_checkpoint
from megasmol.model.load import load_checkpoint_model
from tests.conftest import cli_in_process, run_cli
from tests.specs import tiny_llama, tiny_smollm3


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def megatron_logits(model, ids):
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None)


@pytest.mark.parametrize("make_spec", [tiny_smollm3, tiny_llama], ids=["smollm3", "llama"])
def test_exported_model_has_the_same_logits(tmp_path, make_spec):
    spec = make_spec()
    init_checkpoint(spec, tmp_path / "ckpt", seed=7)
    report = export_hf(tmp_path / "ckpt", tmp_path / "hf", show_progress=False)
    assert report.shards == 1 and not (tmp_path / "hf.partial").exists()
    model, _, _ = load_checkpoint_model(tmp_path / "ckpt")
    hf = hf_model(tmp_path / "hf")
    expected_class = {"smollm3": "SmolLM3ForCausalLM", "llama": "LlamaForCausalLM"}
    assert type(hf).__name__ == expected_class[spec.architecture]
    ids = torch.randint(0, spec.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    ours, theirs = megatron_logits(model, ids), hf(ids).logits
    assert relative_error(ours, theirs) < 1e-5
    if spec.architecture == "smollm3":
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert config["no_rope_layers"] == [1, 1, 1, 0]  # 1 = RoPE applied (transformers)
        # Negative control: Megatron's polarity written as is would change the logits.
        config["no_rope_layers"] = [0, 0, 0, 1]
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
        assert relative_error(ours, hf_model(tmp_path / "hf")(ids).logits) > 1e-3


def test_sdpa_mlp_runs_the_gated_halves_as_two_matmuls_without_autograd(tmp_path, caplog):
    from megatron.core.transformer.mlp import MLP

    from megasmol.model.mlp import SplitGateMLP

    init_checkpoint(tiny_smollm3(), tmp_path / "ckpt", seed=7)
    with caplog.at_level("WARNING"):
        model, spec, _ = load_checkpoint_model(tmp_path / "ckpt")
    assert "Unknown MLP type" not in caplog.text  # built as Megatron-Core builds its own MLP
    mlp = model.decoder.layers[0].mlp
    assert isinstance(mlp, SplitGateMLP)
    fc1, calls = mlp.linear_fc1, []
    fused = fc1.forward
    fc1.forward = lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs)
    x = torch.randn(5, 2, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        split, _ = mlp(x)
    assert calls == []  # the fused [gate; up] matmul did not run
    reference, _ = MLP.forward(mlp, x)
    assert calls == [1]
    torch.testing.assert_close(split, reference.detach(), rtol=1e-5, atol=1e-6)
    trained, _ = mlp(x)  # with autograd: Megatron-Core's own forward, gradients as before
    assert calls == [1, 1] and torch.equal(trained, reference)
    trained.sum().backward()
    assert fc1.weight.grad is not None and fc1.weight.grad.abs().sum() > 0


def test_sdpa_linears_are_a_bare_matmul_without_autograd(tmp_path):
    """Without autograd on one TP rank the sdpa spec's linears skip Megatron-Core's autograd
    function and its identity regions: the whole model's logits are bitwise those of Megatron-Core's
    own linear forward (the same matmul), which still runs, and trains, under autograd."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, layers

    from megasmol.model.forward_linear import ForwardOnlyColumnParallelLinear, ForwardOnlyRowParallelLinear

    init_checkpoint(tiny_smollm3(attention_backend="sdpa"), tmp_path / "ckpt", seed=7)
    model, spec, _ = load_checkpoint_model(tmp_path / "ckpt")
    attention = model.decoder.layers[0].self_attention
    assert isinstance(attention.linear_qkv, ForwardOnlyColumnParallelLinear)
    assert isinstance(attention.linear_proj, ForwardOnlyRowParallelLinear)
    assert isinstance(model.decoder.layers[0].mlp.linear_fc2, ForwardOnlyRowParallelLinear)
    assert isinstance(model.output_layer, ForwardOnlyColumnParallelLinear)  # given the tied weight
    function, calls = layers.LinearWithGradAccumulationAndAsyncCommunication, []
    apply = function.apply
    ids = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    try:
        function.apply = lambda *args: calls.append(1) or apply(*args)
        fast = megatron_logits(model, ids)
        assert calls == []  # the output layer too (GPTModel's own, of this class: gpt.build_model)
        bare = ForwardOnlyColumnParallelLinear.forward, ForwardOnlyRowParallelLinear.forward
        ForwardOnlyColumnParallelLinear.forward = ColumnParallelLinear.forward
        ForwardOnlyRowParallelLinear.forward = RowParallelLinear.forward
        try:
            reference = megatron_logits(model, ids)
        finally:
            ForwardOnlyColumnParallelLinear.forward, ForwardOnlyRowParallelLinear.forward = bare
        assert len(calls) == 1 + 3 * spec.num_layers  # the check can fail: Megatron-Core's path ran
        assert torch.equal(fast, reference)
        calls.clear()
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        model(ids, positions, None).sum().backward()  # with autograd: Megatron-Core's forward
        assert len(calls) == 1 + 4 * spec.num_layers  # and the MLP its fused fc1 (model/mlp.py)
        assert attention.linear_qkv.weight.grad.abs().sum() > 0
    finally:
        function.apply = apply


def test_sharded_export_writes_an_index(tmp_path):
    init_checkpoint(tiny_llama(), tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=100_000, show_progress=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "hf" / f).is_file() for f in files)
    assert "lm_head.weight" in index["weight_map"]  # untied output layer
    assert hf_model(tmp_path / "hf") is not None


def make_hf_model(path, architecture, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(3)
    if architecture == "smollm3":
        config = SmolLM3Config(vocab_size=128256, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512)
        model = SmolLM3ForCausalLM(config)
    else:
        config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             tie_word_embeddings=False, rope_theta=20000.0)
        model = LlamaForCausalLM(config)
    model.to(dtype).save_pretrained(path)
    return model


@pytest.mark.parametrize("architecture,dtype", [("smollm3", torch.float32),
                                                ("llama", torch.bfloat16)])
def test_import_then_export_reproduces_hf_tensors(tmp_path, architecture, dtype):
    make_hf_model(tmp_path / "orig", architecture, dtype)
    import_hf(tmp_path / "orig", tmp_path / "ckpt", show_progress=False)
    export_hf(tmp_path / "ckpt", tmp_path / "back", show_progress=False)
    original = load_file(tmp_path / "orig" / "model.safetensors")
    exported = load_file(tmp_path / "back" / "model.safetensors")
    if architecture == "smollm3":
        original.pop("lm_head.weight", None)  # tied: HF may or may not store it
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == dtype
        assert torch.equal(exported[name], tensor), name
    cfg_a = json.loads((tmp_path / "orig" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert cfg_a[key] == cfg_b[key], key


def test_greedy_generate_matches_transformers(tmp_path, llama_tokenizer_dir):
    hf = make_hf_model(tmp_path / "hf", "smollm3", torch.float32).eval()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_bytes((llama_tokenizer_dir / name).read_bytes())
    import_hf(tmp_path / "hf", tmp_path / "ckpt", show_progress=False)
    assert (tmp_path / "ckpt" / "iter_0000000" / "tokenizer" / "tokenizer.json").is_file()
    model, spec, _ = load_checkpoint_model(tmp_path / "ckpt")
    prompt = torch.tensor([[128000, 791, 4062, 14198, 39935]])
    ours = greedy_generate(model, prompt, 12, eos_token_id=None)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert ours.tolist() == theirs.tolist()
    # The CLI decodes with the tokenizer stored at import.
    out = run_cli("generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt",
                  "The quick brown fox", "--max-new-tokens", "6", "--show-ids")
    assert "continuation:" in out.stdout
    printed = [int(t) for t in out.stdout.split("token ids:")[1].split()]
    expected = greedy_generate(model, torch.tensor([printed[:5]]), 6, spec.eos_token_id)
    assert printed == expected[0].tolist()


def test_import_rejects_bad_input_and_writes_nothing(tmp_path):
    make_hf_model(tmp_path / "hf", "llama", torch.float32)
    out = tmp_path / "ckpt"
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())

    def fails(match, error=(CheckpointError, ConfigError)):
        with pytest.raises(error, match=match):
            import_hf(tmp_path / "hf", out, show_progress=False)
        assert not out.exists()

    config_path.write_text(json.dumps({**config, "model_type": "gpt2"}))
    fails("model_type 'gpt2'")
    config_path.write_text(json.dumps({**config, "vocab_size": 512}))
    fails("vocabulary size mismatch")
    config_path.write_text(json.dumps({**config, "intermediate_size": 80}))
    fails("gate_proj.weight has shape")
    config_path.write_text(json.dumps({**config, "num_hidden_layers": 3}))
    fails("missing tensors")
    config_path.write_text("{not json")
    fails("config.json")
    config_path.unlink()
    fails("config.json: no such file")
    config_path.write_text(json.dumps(config))
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    fails("never loaded")


def test_export_rejects_bad_input(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        export_hf(tmp_path / "missing", tmp_path / "hf", show_progress=False)
    init_checkpoint(tiny_llama(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "iter_0000000.partial").mkdir()
    with pytest.raises(CheckpointError, match="interrupted save"):
        export_hf(tmp_path / "ckpt" / "iter_0000000.partial", tmp_path / "hf", show_progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_hf(tmp_path / "ckpt", tmp_path / "busy", show_progress=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    meta = tmp_path / "ckpt" / "iter_0000000" / "megasmol.json"
    meta.write_text("{broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", show_progress=False)
    assert not (tmp_path / "hf").exists()
    proc = cli_in_process("export-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                          str(tmp_path / "hf"))
    assert proc.returncode == 2 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_help_for_every_command():
    for command in ("info", "init", "export-hf", "import-hf", "generate", "demo"):
        assert "usage: megasmol " + command in run_cli(command, "--help").stdout


def test_yarn_spec_builds_and_export_writes_rope_scaling(tmp_path):
    from megasmol.model.spec import YarnSpec

    spec = tiny_smollm3(yarn=YarnSpec(factor=2.0, original_max_position_embeddings=64).__dict__)
    init_checkpoint(spec, tmp_path / "ckpt")
    model, loaded, _ = load_checkpoint_model(tmp_path / "ckpt")
    assert type(model.rotary_pos_emb).__name__ == "YarnRotaryEmbedding"
    ids = torch.randint(0, 1000, (1, 80))
    assert torch.isfinite(megatron_logits(model, ids)).all()
    export_hf(tmp_path / "ckpt", tmp_path / "hf", show_progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_scaling"]["factor"] == 2.0
    assert config["rope_parameters"]["original_max_position_embeddings"] == 64
    # --yarn-factor on a plain checkpoint writes the block too.
    init_checkpoint(tiny_smollm3(), tmp_path / "plain")
    export_hf(tmp_path / "plain", tmp_path / "plain-hf", yarn=YarnSpec(factor=2.0),
              show_progress=False)
    config = json.loads((tmp_path / "plain-hf" / "config.json").read_text())
    assert config["rope_scaling"]["original_max_position_embeddings"] == 65536
    assert config["max_position_embeddings"] == 131072


_LOAD_AND_USE = r"""
import json, logging, sys, warnings

logged = []


class Keep(logging.Handler):
    def emit(self, record):
        logged.append(f"{record.name}: {record.getMessage()}")


with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("transformers").addHandler(Keep())
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([[300, 301, 302, 303]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    decoded = tokenizer.decode(out[0]) + tokenizer.decode(tokenizer(text).input_ids)
print(json.dumps({"warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
                  "logged": logged, "decoded": decoded}))
"""


def test_an_export_loads_and_decodes_in_transformers_without_a_warning(tmp_path, llama_tokenizer_dir):
    """The export's tokenizer_config says what its tokenizer does (a BPE tokenizer does no
    clean-up of spaces; the bundled Llama-3.2 config says `true`, and transformers then warns at
    every decode), so loading it, templating, generating and decoding in a fresh process raise no
    Python warning (the `pynvml` one of `import torch` included) and log none."""
    import os
    import subprocess
    import sys

    assert json.loads((llama_tokenizer_dir / "tokenizer_config.json").read_text())[
        "clean_up_tokenization_spaces"] is True  # what the export has to correct
    init_checkpoint(tiny_smollm3(), tmp_path / "ckpt", seed=3)
    export_hf(tmp_path / "ckpt", tmp_path / "hf", tokenizer=llama_tokenizer_dir, chat_template="smollm3",
              show_progress=False)
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["clean_up_tokenization_spaces"] is False
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-c", _LOAD_AND_USE, str(tmp_path / "hf")], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(proc.stdout.splitlines()[-1])
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in result["decoded"]
    assert result["warnings"] == [] and result["logged"] == [], result
