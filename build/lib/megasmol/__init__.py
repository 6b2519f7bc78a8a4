"""megasmol: SmolLM3-style pretraining on Megatron-Core."""

__version__ = "0.1.0"
