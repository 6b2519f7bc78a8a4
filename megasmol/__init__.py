"""megasmol: SmolLM3-style pretraining on Megatron-Core."""

from megasmol.utils.import_guard import install as _install_import_guard

__version__ = "0.1.0"

_install_import_guard()
