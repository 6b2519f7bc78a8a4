"""ModelSpec: a model architecture as data (``model_specs/*.yaml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from megasmol.config.typed import ConfigError, from_dict, load_yaml

PRESET_DIR = Path(__file__).resolve().parents[2] / "model_specs"


@dataclass
class YarnSpec:
    """YaRN rotary scaling, applied at evaluation/export time to extend the context."""

    factor: float = 1.0
    """Context extension factor (SmolLM3 uses 2.0 over its 64k model for 128k)."""
    original_max_position_embeddings: int = 65536
    """Context length the model was trained at before YaRN."""
    beta_fast: float = 32.0
    """High-frequency boundary of the interpolation ramp (transformers' default)."""
    beta_slow: float = 1.0
    """Low-frequency boundary of the interpolation ramp (transformers' default)."""

    def validate(self) -> None:
        if self.factor < 1.0:
            raise ConfigError(f"yarn.factor must be >= 1, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("yarn.original_max_position_embeddings must be positive")


@dataclass
class ModelSpec:
    """A decoder-only transformer in the SmolLM3 / Llama family."""

    name: str
    """Preset name, e.g. ``smollm3-3b``."""
    architecture: Literal["smollm3", "llama"]
    """HF architecture family for export: ``smollm3`` (SmolLM3ForCausalLM) or ``llama``."""
    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Model width."""
    ffn_hidden_size: int
    """SwiGLU intermediate size."""
    num_attention_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA groups); equal to num_attention_heads for plain MHA."""
    vocab_size: int
    """Vocabulary size (no padding is added, so HF export keeps it exactly)."""
    head_dim: Optional[int] = None
    """Per-head dimension; defaults to hidden_size / num_attention_heads."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is meant to run at (written to the HF config)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency (SmolLM3: 50k in stages 1-3, 2M and 5M in long-context stages)."""
    nope_interval: Optional[int] = None
    """Skip RoPE on every N-th layer (1-indexed: layers N, 2N, ...). SmolLM3: 4."""
    nope_layers: Optional[list[int]] = None
    """Explicit 0-indexed layers without RoPE; exclusive with nope_interval."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    qk_norm: bool = False
    """RMSNorm on each query/key head before attention (a stability option)."""
    z_loss_coeff: float = 0.0
    """Weight of the z-loss (logsumexp(logits)^2) added to the LM loss; 0 turns it off."""
    init_std: float = 0.02
    """Normal init std for weights."""
    scaled_output_init: bool = True
    """Scale the std of output projections (o_proj, down_proj) by 1/sqrt(2*num_layers)."""
    yarn: Optional[YarnSpec] = None
    """YaRN rotary scaling (None: plain RoPE)."""
    attention_backend: Literal["auto", "te", "sdpa", "local"] = "auto"
    """``te``: Transformer Engine; ``sdpa``: megasmol's torch scaled_dot_product_attention;
    ``local``: Megatron-Core's reference attention; ``auto``: te when importable with a GPU,
    else sdpa."""
    bos_token_id: int = 128000
    """Beginning-of-sequence token."""
    eos_token_id: int = 128001
    """End-of-sequence token (appended to every document)."""
    pad_token_id: Optional[int] = 128004
    """Padding token written to the HF config."""
    source: str = ""
    """Where the numbers come from (a link)."""

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_kv_heads", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly"
            )
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            raise ConfigError(f"head_dim must be a positive even number, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.nope_interval is not None and self.nope_layers is not None:
            raise ConfigError("set nope_interval or nope_layers, not both")
        if self.nope_interval is not None:
            if self.nope_interval < 1 or self.num_layers % self.nope_interval:
                raise ConfigError(
                    f"nope_interval ({self.nope_interval}) must divide num_layers "
                    f"({self.num_layers})"
                )
        if self.nope_layers is not None:
            bad = [i for i in self.nope_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ConfigError(f"nope_layers has layers outside 0..{self.num_layers - 1}: {bad}")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("norm_eps and init_std must be > 0")
        if self.z_loss_coeff < 0:
            raise ConfigError(f"z_loss_coeff must be >= 0, got {self.z_loss_coeff}")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} ({getattr(self, name)}) is outside the vocabulary")

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def rope_skipped(self) -> list[bool]:
        """Per layer (0-indexed): True where RoPE is NOT applied (NoPE)."""
        if self.nope_interval:
            return [(i + 1) % self.nope_interval == 0 for i in range(self.num_layers)]
        skipped = set(self.nope_layers or [])
        return [i in skipped for i in range(self.num_layers)]

    def replace(self, **changes) -> ModelSpec:
        data = dataclasses.asdict(self)
        data.update(changes)
        return from_dict(ModelSpec, data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_spec_from_dict(data: dict) -> ModelSpec:
    return from_dict(ModelSpec, data, "")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_model_spec(name_or_path: str | Path) -> ModelSpec:
    """A preset name from ``model_specs/``, a path to a spec YAML, or a checkpoint directory
    (root or iteration: the spec it was written with)."""
    path = Path(name_or_path)
    if path.is_dir():
        from megasmol.ckpt.checkpoint import read_metadata

        meta = read_metadata(path)
        try:
            return model_spec_from_dict(meta["model_spec"])
        except (KeyError, ConfigError) as exc:
            raise ConfigError(f"{path}: its model spec is unusable ({exc})") from None
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown model spec {name_or_path!r}; presets: {', '.join(preset_names())}"
            )
    try:
        return model_spec_from_dict(load_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
