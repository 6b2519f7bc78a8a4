"""Checkpoints from TP=2 / PP=2 runs (2 gloo processes), layout-free loading, TP seeding."""

import pytest
import torch
from safetensors.torch import load_file

from megasmol.ckpt.reader import CheckpointReader
from megasmol.convert.export import export_hf
from megasmol.model.init import init_checkpoint
from megasmol.model.load import load_checkpoint_model
from tests.conftest import WORKERS, run_torchrun
from tests.test_convert import megatron_logits, relative_error

SPEC = "smollm3-tiny"


def torchrun_init(out, *flags):
    run_torchrun(["-m", "megasmol", "init", "--spec", SPEC, "--out", str(out), *flags])


# Checkpoints written by TP=2 and PP=2 training runs export with logit parity: see
# tests/test_train.py::test_two_process_layouts_match_single_process (PP=2) and
# ::test_tensor_parallel_resumes_a_tp1_checkpoint_as_the_same_run (TP=2).


def test_tp1_checkpoint_loads_under_tp2(tmp_path):
    from megasmol.model.spec import load_model_spec

    init_checkpoint(load_model_spec(SPEC), tmp_path / "ckpt", seed=3)
    model, spec, _ = load_checkpoint_model(tmp_path / "ckpt")
    ids = torch.randint(0, spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    run_torchrun([str(WORKERS / "load_tp2_logits.py"), str(tmp_path / "ckpt"),
                  str(tmp_path / "ids.pt"), str(tmp_path / "tp2.pt")])
    tp2 = torch.load(tmp_path / "tp2.pt")
    assert relative_error(tp2, megatron_logits(model, ids)) < 1e-5


def test_cpu_initialization_gives_the_same_weights_for_tp1_and_tp2(tmp_path):
    from megasmol.model.spec import load_model_spec

    init_checkpoint(load_model_spec(SPEC), tmp_path / "tp1", seed=5, cpu_initialization=True)
    torchrun_init(tmp_path / "tp2", "--tensor-parallel", "2", "--seed", "5", "--cpu-init")
    for name in ("tp1", "tp2"):
        export_hf(tmp_path / name, tmp_path / f"{name}-hf", show_progress=False)
    a = load_file(tmp_path / "tp1-hf" / "model.safetensors")
    b = load_file(tmp_path / "tp2-hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_tp_ranks_initialize_from_distinct_seeds(tmp_path):
    """The playbook's TP seed bug: identical seeds on TP ranks make shards copies of each other."""
    torchrun_init(tmp_path / "tp2", "--tensor-parallel", "2", "--seed", "5")
    reader = CheckpointReader(tmp_path / "tp2")
    for key in ("decoder.layers.self_attention.linear_qkv.weight",
                "decoder.layers.mlp.linear_fc2.weight"):
        weight = reader.read(key, layer=0)
        split_dim = 0 if "linear_qkv" in key else 1  # column- vs row-parallel
        rank0, rank1 = weight.chunk(2, dim=split_dim)
        assert not torch.equal(rank0, rank1), key
        corr = torch.corrcoef(torch.stack([rank0.flatten(), rank1.flatten()]))[0, 1]
        assert abs(corr) < 0.05, (key, corr)
        assert rank0.std().item() == pytest.approx(rank1.std().item(), rel=0.2)
