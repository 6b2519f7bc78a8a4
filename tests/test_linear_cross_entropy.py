"""The chunked linear cross-entropy (``training.cross_entropy: chunked``): the same per-token
losses and gradients as the plain path, without holding the ``[tokens, vocab]`` logits."""

import json

import pytest
import torch

from megasmol.config.run import TrainingConfig
from megasmol.config.typed import ConfigError
from megasmol.model.linear_cross_entropy import default_chunk_size, linear_cross_entropy
from tests.conftest import WORKERS, cli_in_process, run_torchrun
from tests.linear_ce_check import (
    ddp_step_errors,
    function_errors,
    model_errors,
    objective_errors,
    plain_token_loss,
    rel,
)
from tests.specs import tiny_smollm3
from tests.train_fixtures import step_losses, torchrun_train, train, write_training_run

TOL = 1e-6  # relative, fp32


def small_spec():
    return tiny_smollm3(vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize("in_forward", [True, False], ids=["grads-in-forward", "recompute"])
@pytest.mark.parametrize("z_loss_coeff", [0.0, 1e-2])
@pytest.mark.parametrize("chunk_size", [5, 16, 1000])  # 39 positions: 5 and 16 do not divide it
def test_loss_and_gradients_equal_the_plain_path(megatron_runtime, z_loss_coeff, chunk_size, in_forward):
    errors = function_errors(z_loss_coeff, chunk_size, in_forward=in_forward)
    assert max(errors.values()) < TOL, errors


def test_gradients_made_in_the_forward_are_scaled_by_the_upstream_scalar(megatron_runtime):
    """Megatron-Core's schedule back-propagates the loss times a scalar (loss scale, 1 / the
    number of micro-batches): the stored gradients follow it."""
    errors = function_errors(1e-2, 16, scale=0.37)
    assert max(errors.values()) < TOL, errors


def test_an_upstream_gradient_unlike_the_weights_is_refused():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(10, 8, generator=gen, requires_grad=True)
    w = torch.randn(40, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 40, (10,), generator=gen)
    loss = linear_cross_entropy(h, w, labels, chunk_size=3, loss_weights=torch.ones(10))
    with pytest.raises(RuntimeError, match="not proportional to the loss weights"):
        loss.square().sum().backward()  # not linear in the per-token loss


def test_all_zero_weights_give_zero_gradients():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(6, 8, generator=gen, requires_grad=True)
    w = torch.randn(40, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 40, (6,), generator=gen)
    weights = torch.zeros(6)
    (linear_cross_entropy(h, w, labels, loss_weights=weights) * weights).sum().backward()
    assert not h.grad.any() and not w.grad.any()


def _matmul_rows(prof, weight_shape) -> dict:
    """Rows of the logits' matmuls (``hidden @ weight.T``), of the hidden-state gradient's
    (``grad_logits @ weight``) and of the weight gradient's (``addmm_``) the profile recorded."""
    v, h = weight_shape
    rows = {"logits": 0, "grad_hidden": 0, "grad_weight": 0}
    for event in prof.events():
        shapes = event.input_shapes
        if event.name == "aten::mm" and shapes[1] == [h, v]:
            rows["logits"] += shapes[0][0]
        elif event.name == "aten::mm" and shapes[1] == [v, h]:
            rows["grad_hidden"] += shapes[0][0]
        elif event.name == "aten::addmm_":
            rows["grad_weight"] += shapes[2][0]
    return rows


@pytest.mark.parametrize("in_forward", [True, False], ids=["grads-in-forward", "recompute"])
def test_masked_positions_skip_their_gradient_matmuls(in_forward):
    """A position with a zero loss weight (or upstream gradient, recomputing) has zero gradients:
    its gradient matmuls are skipped (recomputing, its logits too), and the gradients are still
    the plain path's, exact zeros included."""
    gen = torch.Generator().manual_seed(8)
    h, w = torch.randn(10, 8, generator=gen), torch.randn(40, 8, generator=gen)
    labels = torch.randint(0, 40, (10,), generator=gen)
    mask = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 1, 0, 1])  # 6 weighted, in every chunk of 3
    h_p, w_p = h.clone().requires_grad_(), w.clone().requires_grad_()
    (plain_token_loss(h_p @ w_p.t(), labels, 1e-2) * mask).sum().backward()
    h_c, w_c = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.profiler.profile(record_shapes=True) as prof:
        loss = linear_cross_entropy(h_c, w_c, labels, z_loss_coeff=1e-2, chunk_size=3,
                                    loss_weights=mask if in_forward else None)
        (loss * mask).sum().backward()
    recomputed = 0 if in_forward else 6  # the backward's logits, weighted positions only
    assert _matmul_rows(prof, w.shape) == {"logits": 10 + recomputed, "grad_hidden": 6, "grad_weight": 6}
    assert rel(h_c.grad, h_p.grad) < TOL and rel(w_c.grad, w_p.grad) < TOL
    assert not h_c.grad[mask == 0].any()


def test_the_default_chunk_under_main_grad_is_half_the_weight():
    """Without a separate weight gradient (it goes into ``main_grad``) the default chunk is
    ``hidden / 2`` positions where that is more than ``2^25`` logits: 1,024 at SmolLM3-3B's
    shape instead of 261, so the step holds half the weight's gradient in logits at most."""
    assert default_chunk_size(128256, 2048) == 261
    assert default_chunk_size(128256, 2048, into_main_grad=True) == 1024
    assert default_chunk_size(1000, 64, into_main_grad=True) == (1 << 25) // 1000  # never smaller


def _weight_with_main_grad(w: torch.Tensor) -> torch.Tensor:
    """``w`` as Megatron-Core's DDP leaves a parameter: an fp32 ``main_grad`` (here holding an
    earlier micro-batch's gradient, ones) and ``grad_added_to_main_grad`` False."""
    w = w.clone().requires_grad_()
    w.main_grad = torch.ones_like(w)
    w.grad_added_to_main_grad = False
    return w


@pytest.mark.parametrize("path", ["in-forward", "in-forward-scale-unknown", "recompute"])
def test_the_weight_gradient_is_added_to_main_grad(path):
    """A weight with DDP's ``main_grad``: made in the forward with the upstream scalar declared
    (``known_scale``), the weight's gradient is in ``main_grad`` before the backward runs;
    recomputed, in the backward; either way the weight gets no ``.grad`` and is marked
    ``grad_added_to_main_grad``, so DDP's hook does not add one. With the scalar undeclared the
    gradient is held and returned as ``.grad``, as without DDP, and may be scaled freely."""
    gen = torch.Generator().manual_seed(6)
    h, w = torch.randn(11, 8, generator=gen), torch.randn(40, 8, generator=gen)
    labels = torch.randint(0, 40, (11,), generator=gen)
    mask = (torch.rand(11, generator=gen) > 0.3).float()
    scale = 0.37 if path == "in-forward-scale-unknown" else 1.0
    h_p, w_p = h.clone().requires_grad_(), w.clone().requires_grad_()
    (scale * (plain_token_loss(h_p @ w_p.t(), labels, 1e-2) * mask).sum()).backward()

    h_c, w_c = h.clone().requires_grad_(), _weight_with_main_grad(w)
    options = {"in-forward": {"loss_weights": mask, "known_scale": 1.0},
               "in-forward-scale-unknown": {"loss_weights": mask}, "recompute": {}}[path]
    loss = linear_cross_entropy(h_c, w_c, labels, z_loss_coeff=1e-2, chunk_size=4, **options)
    assert bool((w_c.main_grad != 1).any()) == (path == "in-forward")  # written in the forward
    (scale * (loss * mask).sum()).backward()
    assert rel(h_c.grad, h_p.grad) < TOL
    if path == "in-forward-scale-unknown":
        assert not w_c.grad_added_to_main_grad and rel(w_c.grad, w_p.grad) < TOL
        assert bool((w_c.main_grad == 1).all())
    else:
        assert w_c.grad is None and w_c.grad_added_to_main_grad
        assert rel(w_c.main_grad - 1, w_p.grad) < TOL


def test_an_upstream_scalar_unlike_the_declared_one_is_refused():
    """The weight's gradient went into ``main_grad`` in the forward for the declared scalar: a
    backward that brings another (a loss scaled by the caller) is an error, not a wrong step."""
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(10, 8, generator=gen, requires_grad=True)
    w = _weight_with_main_grad(torch.randn(40, 8, generator=gen))
    labels = torch.randint(0, 40, (10,), generator=gen)
    loss = linear_cross_entropy(h, w, labels, chunk_size=3, loss_weights=torch.ones(10), known_scale=1.0)
    with pytest.raises(RuntimeError, match="main_grad in the forward for an upstream gradient of 1 x"):
        (0.5 * loss.sum()).backward()


@pytest.mark.parametrize("in_forward", [True, False], ids=["grads-in-forward", "recompute"])
@pytest.mark.parametrize("z_loss_coeff", [0.0, 1e-2])
def test_chunked_model_equals_plain_model(megatron_runtime, z_loss_coeff, in_forward):
    errors = model_errors(small_spec(), z_loss_coeff, in_forward)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("in_forward", [True, False], ids=["grads-in-forward", "recompute"])
def test_bf16_inputs_match_the_fp32_loss_to_bf16_precision(in_forward):
    """bf16 hidden states and weight (as SmolLM3 trains): the matmuls in bf16 through the reused
    bf16 buffer, the loss and the weight's gradient in fp32; loss and gradients agree with the
    fp32 computation on the same (bf16) inputs to bf16 precision, as the plain path's do."""
    gen = torch.Generator().manual_seed(4)
    tokens, hidden, vocab = 37, 16, 300
    h32 = torch.randn(tokens, hidden, generator=gen).bfloat16().float()
    w32 = (0.5 * torch.randn(vocab, hidden, generator=gen)).bfloat16().float()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    mask = (torch.rand(tokens, generator=gen) > 0.2).float()

    def run(h, w, chunked):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        if chunked:
            loss = linear_cross_entropy(h, w, labels, z_loss_coeff=1e-2, chunk_size=8,
                                        loss_weights=mask if in_forward else None)
        else:
            loss = plain_token_loss((h @ w.t()).float(), labels, 1e-2)
        (loss * mask).sum().backward()
        return loss.float(), h.grad.float(), w.grad.float()

    expected = run(h32, w32, chunked=False)
    chunked = run(h32.bfloat16(), w32.bfloat16(), chunked=True)
    plain_bf16 = run(h32.bfloat16(), w32.bfloat16(), chunked=False)
    assert chunked[1].dtype == torch.float32  # .float() of the bf16 gradients
    for got, plain, want in zip(chunked, plain_bf16, expected):
        error = ((got - want).abs().max() / want.abs().max()).item()
        plain_error = ((plain - want).abs().max() / want.abs().max()).item()
        assert error < 2e-2 and error <= 2 * plain_error + 1e-3, (error, plain_error)


def test_z_loss_and_ignored_labels_change_the_loss():
    gen = torch.Generator().manual_seed(1)
    h, w = torch.randn(6, 8, generator=gen), torch.randn(50, 8, generator=gen)
    labels = torch.tensor([3, -100, 7, 49, 0, 12])
    with_z = linear_cross_entropy(h, w, labels, z_loss_coeff=0.1, chunk_size=4)
    without = linear_cross_entropy(h, w, labels, chunk_size=4)
    assert torch.allclose(with_z, plain_token_loss(h @ w.t(), labels, 0.1), rtol=TOL)
    assert (with_z - without).abs().min() > 1e-3
    assert torch.allclose(without[1], torch.logsumexp(h[1] @ w.t(), dim=-1), rtol=TOL)


def _largest_saved(fn) -> int:
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return max(sizes)


def test_forward_saves_no_tokens_by_vocab_tensor():
    tokens, hidden, vocab = 96, 16, 3000
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    chunked = _largest_saved(lambda: linear_cross_entropy(h, w, labels, z_loss_coeff=1e-2, chunk_size=32))
    plain = _largest_saved(lambda: plain_token_loss(h @ w.t(), labels, 1e-2))
    assert plain >= tokens * vocab  # what is measured: the plain path keeps the logits
    assert chunked < tokens * vocab
    assert chunked == vocab * hidden  # the largest it keeps is the output weight


@pytest.fixture(scope="module")
def parallel_layouts(tmp_path_factory):
    """One launch of 2 gloo processes for both tests that need one: TP=2, then PP=2 and CP=2
    (``workers/linear_ce_layouts.py``); its results and output."""
    out = tmp_path_factory.mktemp("layouts") / "result.json"
    proc = run_torchrun([str(WORKERS / "linear_ce_layouts.py"), str(out)])
    return json.loads(out.read_text()), proc.stdout


def test_tensor_parallel_chunked_equals_single_process_plain(parallel_layouts):
    results, stdout = parallel_layouts[0]["tp2"], parallel_layouts[1]
    assert len(results) == 8
    for case, errors in results.items():
        assert max(errors.values()) < TOL, (case, errors, stdout)


def test_te_needs_transformer_engine():
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ConfigError, match="training.cross_entropy=te"):
        TrainingConfig(train_steps=1, global_batch_size=1, cross_entropy="te").validate()
    TrainingConfig(train_steps=1, global_batch_size=1, cross_entropy="chunked").validate()


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A 4-step single-process run from a saved initial checkpoint (same weights in any layout)."""
    root = tmp_path_factory.mktemp("plain")
    config = _short_run(root, "plain")
    init = cli_in_process("init", "--spec", str(root / "spec.yaml"), "--out", str(root / "init"),
                          "--seed", "3")
    assert init.returncode == 0, init.stderr
    train(config, f"checkpoint.init_from={root / 'init'}")
    return root / "init", step_losses(root / "run")


def _short_run(root, cross_entropy):
    return write_training_run(root, steps=4, checkpoint={"interval": 0}, schedule={"warmup_steps": 1},
                              eval={"interval": 0}, training={"cross_entropy": cross_entropy})


def _assert_same_losses(losses, plain):
    assert sorted(plain) == [1, 2, 3, 4]
    for step, loss in plain.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5)
    # The chunked path did run: its sums go in another order, so the losses are not bit-identical.
    assert losses != plain


def test_training_with_chunked_cross_entropy_matches_plain(plain_run, tmp_path):
    init, plain = plain_run
    train(_short_run(tmp_path, "chunked"), f"checkpoint.init_from={init}")
    _assert_same_losses(step_losses(tmp_path / "run"), plain)


@pytest.mark.parametrize("layout", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
def test_parallel_training_with_chunked_cross_entropy_matches_plain(plain_run, tmp_path, layout):
    init, plain = plain_run
    torchrun_train(_short_run(tmp_path, "chunked"), f"checkpoint.init_from={init}", layout)
    _assert_same_losses(step_losses(tmp_path / "run"), plain)


@pytest.mark.parametrize("objective, path", [("pretraining", "_GradientsInForward"),
                                             ("sft", "_GradientsInForward"),
                                             ("preference", "_RecomputeInBackward")])
def test_a_training_step_takes_the_path_its_objective_allows(megatron_runtime, monkeypatch, objective, path):
    """Token-weighted losses (pretraining, SFT) give the chunked output layer their weights, so
    it makes its gradients in the forward; the preference loss does not (the logits are
    recomputed in the backward). Either way, the step equals the plain path's."""
    from megasmol.model import linear_cross_entropy as module

    taken = []
    for cls in (module._GradientsInForward, module._RecomputeInBackward):
        def forward(ctx, *args, _forward=cls.forward, _name=cls.__name__):
            taken.append(_name)
            return _forward(ctx, *args)
        monkeypatch.setattr(cls, "forward", staticmethod(forward))
    errors = objective_errors(small_spec().replace(z_loss_coeff=1e-2), objective)
    assert set(taken) == {path} and len(taken) == 2  # one per micro-batch
    assert errors["loss_sum"] > 0 and max(errors["loss"], errors["grads"]) < TOL, errors


def test_pipeline_and_context_parallel_steps_equal_the_plain_path(parallel_layouts):
    """PP=2 and CP=2 (2 gloo processes): a training step's loss and every rank's gradients, for
    the pretraining, SFT and preference losses, chunked vs plain; and under DDP with PP=2 (the
    tied output weight on the last stage, its ``main_grad`` summed with the embedding's across
    stages) and DP=2 (``main_grad`` reduced over ranks), two steps' losses, ``main_grad`` and
    updated weights."""
    results, stdout = parallel_layouts[0]["layouts"], parallel_layouts[1]
    plain_cases = [f"{layout} {objective}" for layout in ("pp2", "cp2")
                   for objective in ("pretraining", "sft", "preference")]
    ddp_cases = [f"{layout} ddp {objective}" for layout in ("pp2", "dp2")
                 for objective in ("pretraining", "preference")]
    assert sorted(results) == sorted(plain_cases + ddp_cases)
    for case, errors in results.items():
        assert errors["loss_sum"] > 0, (case, errors)
        if case in ddp_cases:
            assert errors["main_grad_marked"] == 1.0, (case, errors)
            assert max(errors["loss"], errors["main_grads"], errors["weights"]) < TOL, (case, errors)
        else:
            assert max(errors["loss"], errors["grads"]) < TOL, (case, errors, stdout)


@pytest.mark.parametrize("objective, tied", [("pretraining", True), ("pretraining", False), ("sft", True),
                                             ("preference", True), ("preference", False)])
def test_steps_under_ddp_write_the_output_weight_gradient_into_main_grad(megatron_runtime, objective, tied):
    """Under Megatron-Core's DDP (as the trainer wraps the model) the chunked path adds the
    output weight's gradient to its ``main_grad`` (in the forward for pretraining and SFT, in the
    backward for preference) instead of holding a separate gradient: two steps of two
    micro-batches give the plain path's losses, ``main_grad`` buffers and updated weights, with
    tied embeddings (the embedding's gradient and the output layer's in one ``main_grad``) and
    without."""
    spec = small_spec().replace(z_loss_coeff=1e-2, tie_embeddings=tied)
    errors = ddp_step_errors(spec, objective)
    assert errors["loss_sum"] > 0 and errors["main_grad_marked"] == 1.0, errors
    assert max(errors["loss"], errors["main_grads"], errors["weights"]) < TOL, errors
