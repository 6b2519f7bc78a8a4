"""Parameter counts and model FLOPs per token: the one place MFU, planning and pre-flight use."""

from __future__ import annotations

from dataclasses import dataclass

from megasmol.model.spec import ModelSpec


@dataclass(frozen=True)
class ParameterCount:
    embedding: int
    output_layer: int
    per_layer: int
    final_norm: int
    num_layers: int

    @property
    def transformer(self) -> int:
        return self.per_layer * self.num_layers

    @property
    def total(self) -> int:
        """Unique parameters (a tied output layer is not counted twice)."""
        return self.embedding + self.output_layer + self.transformer + self.final_norm

    @property
    def matmul(self) -> int:
        """Parameters that take part in a matrix product per token (the LM head always does)."""
        return self.transformer + self.embedding  # output projection, tied or not


def parameter_count(spec: ModelSpec) -> ParameterCount:
    h, d, f = spec.hidden_size, spec.kv_channels, spec.ffn_hidden_size
    attention = h * spec.num_attention_heads * d * 2 + h * spec.num_kv_heads * d * 2
    qk_norm = 2 * d if spec.qk_norm else 0
    per_layer = attention + 3 * h * f + 2 * h + qk_norm
    embedding = spec.vocab_size * h
    return ParameterCount(
        embedding=embedding,
        output_layer=0 if spec.tie_embeddings else embedding,
        per_layer=per_layer,
        final_norm=h,
        num_layers=spec.num_layers,
    )


def flops_per_token(spec: ModelSpec, seq_length: int, training: bool = True) -> float:
    """Model FLOPs per token, PaLM convention (arXiv 2204.02311, appendix B).

    Forward = 2 x matmul parameters + 4 x layers x seq x (heads x head_dim) for QK^T and AV,
    without discounting the causal mask (as Megatron-LM and the published SmolLM3 MFU do).
    Training (forward + backward) is 3x the forward.  Recomputation is not model FLOPs.
    """
    counts = parameter_count(spec)
    d_attn = spec.num_attention_heads * spec.kv_channels
    forward = 2 * (counts.transformer - spec.num_layers * 2 * spec.hidden_size) + 2 * counts.embedding
    forward += 4 * spec.num_layers * seq_length * d_attn
    return float(forward * (3 if training else 1))
