"""megasmol: SmolLM3-style pretraining on Megatron-Core."""

import warnings as _warnings

from megasmol.utils.import_guard import install as _install_import_guard

__version__ = "0.1.0"

_install_import_guard()
# Known noise, in every process that imports megasmol (spawned checkpoint writers too, which do
# not go through the CLI): torch.cuda's import of the deprecated pynvml module on any machine
# where it is installed.
_warnings.filterwarnings("ignore", message=r"The pynvml package is deprecated", category=FutureWarning)
