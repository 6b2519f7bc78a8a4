"""Turn a ModelSpec into a Megatron-Core TransformerConfig and GPTModel."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megasmol.model.layer_specs import forward_only, layer_spec, resolve_attention_backend
from megasmol.model.linear_cross_entropy import output_layer_loss
from megasmol.model.spec import ModelSpec


@dataclass(frozen=True)
class CrossEntropyImpl:
    """How the model's training loss goes from the last hidden states to per-token losses."""

    config: dict[str, Any] = field(default_factory=dict)
    """TransformerConfig fields it sets (Megatron-Core's own fused cross-entropy)."""
    from_hidden_states: bool = False
    """The output layer and the loss in one chunked function (``model/linear_cross_entropy.py``),
    which never holds the ``[tokens, vocab]`` logits; else the output layer's logits, then the loss."""


CROSS_ENTROPY = {
    "plain": CrossEntropyImpl(),
    "chunked": CrossEntropyImpl(from_hidden_states=True),
    "te": CrossEntropyImpl(config={"cross_entropy_loss_fusion": True,
                                   "cross_entropy_fusion_impl": "te"}),
}
"""``training.cross_entropy``: the implementations by name (``te`` needs Transformer Engine)."""


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over a vocabulary split across tensor-parallel ranks ([..., v/tp] -> [...])."""
    logits = logits.float()
    local_max = logits.max(dim=-1).values.detach()
    global_max = local_max.clone()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(
            global_max, op=torch.distributed.ReduceOp.MAX,
            group=parallel_state.get_tensor_model_parallel_group(),
        )
    sum_exp = torch.exp(logits - global_max.unsqueeze(-1)).sum(dim=-1)
    # Forward all-reduce, identity backward: each rank's slice gets d lse / d logits locally.
    sum_exp = tensor_parallel.reduce_from_tensor_model_parallel_region(sum_exp)
    return global_max + torch.log(sum_exp)


class SmolGPTModel(GPTModel):
    """Megatron-Core's GPTModel plus the LM-logit z-loss (PaLM), which Megatron-Core lacks.

    The per-token loss returned with labels is ``CE + z_loss_coeff * logsumexp(logits)^2``.
    """

    def __init__(self, *args, z_loss_coeff: float = 0.0, attention_backend: str = "local",
                 loss_from_hidden_states: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.z_loss_coeff = z_loss_coeff
        self.logit_temperature = 1.0
        """The per-token loss is that of ``logits / logit_temperature`` (RL's sampling temperature,
        :func:`sampling_temperature`); 1 otherwise."""
        self.loss_from_hidden_states = loss_from_hidden_states
        """With labels, the loss comes from the hidden states and the output weight in chunks
        (``CrossEntropyImpl.from_hidden_states``): no logits are made."""
        self.attention_backend = attention_backend
        """The layer spec's backend (``layer_specs.LAYER_SPECS``), resolved."""
        self._logit_positions = None  # [s, b] bool while a forward scores only those positions
        self._loss_weights = None  # [b, s] while a training forward knows its loss's token weights
        if self.post_process:
            self.output_layer.register_forward_pre_hook(self._only_scored_positions, with_kwargs=True)

    def forward_only(self):
        """Context for forward passes that train nothing (``layer_specs.forward_only``)."""
        return forward_only(self.attention_backend)

    def forward(self, *args, loss_positions: Optional[torch.Tensor] = None,
                loss_weights: Optional[torch.Tensor] = None, **kwargs):
        """``loss_positions`` ([b, s] bool, forward-only scoring): the output layer and the loss
        run at those positions only (zeros elsewhere), instead of the whole vocabulary at every
        position. Ignored under sequence parallelism, whose output layer gathers the sequence.

        ``loss_weights`` ([b, s], training): the returned per-token loss will be back-propagated
        as ``c * sum(loss_weights * loss)`` for some scalar ``c`` (the objective's
        ``token_weights``); the chunked cross-entropy then computes the output layer's gradients
        in the forward instead of recomputing its logits in the backward (under DDP, with ``c``
        fixed by the config, :meth:`_known_loss_scale`, the output weight's straight into its
        ``main_grad``). The plain path ignores it."""
        use = (loss_positions is not None and self.post_process and bool(loss_positions.any())
               and not self.output_layer.sequence_parallel)
        self._logit_positions = loss_positions.t() if use else None
        self._loss_weights = loss_weights
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._logit_positions = None
            self._loss_weights = None

    def _only_scored_positions(self, module, args, kwargs):
        if self._logit_positions is None:
            return None
        hidden = args[0][self._logit_positions]  # [s, b, h] -> [n, h]
        return (hidden.unsqueeze(1), *args[1:]), kwargs

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if (not self.loss_from_hidden_states or labels is None or not self.post_process
                or kwargs.get("inference_context") is not None):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)

        def token_loss(hidden, labels, loss_weights=None):
            if self.logit_temperature != 1.0:  # no bias: (h / T) W^T = logits / T
                hidden = hidden / self.logit_temperature
            return output_layer_loss(hidden, weight, labels, z_loss_coeff=self.z_loss_coeff,
                                     sequence_parallel=self.output_layer.sequence_parallel,
                                     tp_group=self.pg_collection.tp, loss_weights=loss_weights,
                                     known_scale=self._known_loss_scale())

        positions = self._logit_positions
        if positions is not None:  # score the selected positions only
            return _scattered(positions, token_loss(hidden_states[positions].unsqueeze(1),
                                                    labels.t()[positions].unsqueeze(0))[0])
        return token_loss(hidden_states, labels, self._loss_weights)

    def _known_loss_scale(self) -> Optional[float]:
        """The scalar Megatron-Core's schedule back-propagates the objective's loss with, when the
        config fixes it: 1 with ``calculate_per_token_loss`` (the trainer's setting: no division
        by the micro-batch's tokens or count) and no ``grad_scale_func`` (no loss scaler); the
        chunked output layer then adds its weight's gradient to ``main_grad`` in the forward."""
        config = self.config
        if config.calculate_per_token_loss and getattr(config, "grad_scale_func", None) is None:
            return 1.0
        return None

    def compute_language_model_loss(self, labels, logits):
        positions = self._logit_positions
        if positions is not None:  # logits are [n, 1, v/tp] for the n selected positions
            picked = labels.t()[positions].unsqueeze(0)  # [1, n]
            return _scattered(positions, self._token_loss(picked, logits)[0])
        return self._token_loss(labels, logits)

    def _token_loss(self, labels, logits):
        if self.logit_temperature != 1.0:  # a new tensor: Megatron's CE shifts its input in place
            logits = logits / self.logit_temperature
        if not self.z_loss_coeff:
            return super().compute_language_model_loss(labels, logits)
        # Before the cross-entropy: Megatron's vocab-parallel CE shifts the logits in place.
        # logits are [s, b, v/tp]; the loss is [b, s].
        lse = vocab_parallel_logsumexp(logits).transpose(0, 1)
        loss = super().compute_language_model_loss(labels, logits)
        return loss + self.z_loss_coeff * lse.square()


def _scattered(positions: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """The loss ``[n]`` at the ``[s, b]`` selected positions as ``[b, s]`` (zeros elsewhere)."""
    full = loss.new_zeros(positions.shape)
    full[positions] = loss
    return full.t()


@contextlib.contextmanager
def plain_cross_entropy(model: torch.nn.Module) -> Iterator[None]:
    """Within it, ``model``'s per-token loss is plain cross-entropy, without the z-loss term:
    log-probabilities must be exact when they are the result (preference training, scoring).
    The spec's coefficient comes back on exit; a model without z-loss is left as it is."""
    coeff = getattr(model, "z_loss_coeff", None)
    if coeff is None:
        yield
        return
    model.z_loss_coeff = 0.0
    try:
        yield
    finally:
        model.z_loss_coeff = coeff


@contextlib.contextmanager
def sampling_temperature(model: torch.nn.Module, temperature: float) -> Iterator[None]:
    """Within it, ``model``'s per-token loss is the cross-entropy of ``logits / temperature``: the
    log-probabilities of a decoder sampling at that temperature (RL's policy loss, as TRL's)."""
    previous = model.logit_temperature
    model.logit_temperature = float(temperature)
    try:
        yield
    finally:
        model.logit_temperature = previous


def transformer_config(
    spec: ModelSpec,
    *,
    params_dtype: torch.dtype = torch.float32,
    cpu_initialization: bool = False,
    sequence_parallel: bool = False,
    recompute: Optional[str] = None,
    initialize: bool = True,
    fp8: Optional[str] = None,
    cross_entropy: str = "plain",
) -> TransformerConfig:
    """The Megatron-Core TransformerConfig for ``spec`` under the current parallel layout."""
    backend = resolve_attention_backend(spec.attention_backend)
    on_gpu = torch.cuda.is_available()
    te = backend == "te"
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rope_skipped = spec.rope_skipped()
    kwargs: dict[str, Any] = {"cross_entropy_loss_fusion": False, **CROSS_ENTROPY[cross_entropy].config}
    if fp8:
        # Transformer Engine FP8 GEMMs: "hybrid" = E4M3 forward, E5M2 gradients.
        kwargs.update(fp8=fp8)
    if recompute:
        kwargs.update(recompute_granularity=recompute)
        if recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=spec.qk_norm,
        no_rope_freq=[int(s) for s in rope_skipped] if any(rope_skipped) else None,
        init_method_std=spec.init_std,
        # Megatron scales output-layer init by 1/sqrt(2*num_layers) unless told otherwise.
        **({} if spec.scaled_output_init else {"output_layer_init_method": None}),
        attention_dropout=0.0,
        hidden_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=cpu_initialization,
        perform_initialization=initialize,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=sequence_parallel and tp > 1,
        pipeline_dtype=params_dtype,
        # Fused kernels need CUDA (and some need TE/Apex); the CPU path uses plain torch ops.
        masked_softmax_fusion=te,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=te,
        persist_layer_norm=False,
        gradient_accumulation_fusion=te,
        **kwargs,
    )


def build_model(spec: ModelSpec, **config_options) -> SmolGPTModel:
    """This rank's pipeline stage of the model (parallel_state must be initialized).

    ``config_options`` go to :func:`transformer_config` (params_dtype, cpu_initialization,
    sequence_parallel, recompute, fp8, cross_entropy (a ``CROSS_ENTROPY`` name), and
    initialize=False for inference models loaded right after: Megatron-Core sets the
    tensor-parallel attributes of weights only while initializing them, and training needs those
    for the gradient norm).
    """
    config = transformer_config(spec, **config_options)
    use_yarn = spec.yarn is not None and spec.yarn.factor > 1.0
    if use_yarn:
        config.yarn_rotary_scaling_factor = spec.yarn.factor
        config.yarn_original_max_position_embeddings = spec.yarn.original_max_position_embeddings
        config.yarn_beta_fast = spec.yarn.beta_fast
        config.yarn_beta_slow = spec.yarn.beta_slow
        config.yarn_mscale = 1.0
        config.yarn_mscale_all_dim = 0.0
        config.yarn_correction_range_round_to_int = True
    model = SmolGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec.attention_backend, spec.qk_norm),
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="yarn" if use_yarn else "rope",
        rotary_base=spec.rope_theta,
        z_loss_coeff=spec.z_loss_coeff,
        loss_from_hidden_states=CROSS_ENTROPY[
            config_options.get("cross_entropy", "plain")].from_hidden_states,
        attention_backend=resolve_attention_backend(spec.attention_backend),
    )
    if model.post_process and model.attention_backend == "sdpa":
        from megatron.core.tensor_parallel import ColumnParallelLinear

        from megasmol.model.forward_linear import ForwardOnlyColumnParallelLinear

        if type(model.output_layer) is ColumnParallelLinear:  # its forward only changes (no state)
            model.output_layer.__class__ = ForwardOnlyColumnParallelLinear
    return model
