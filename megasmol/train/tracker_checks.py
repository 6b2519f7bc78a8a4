"""What the selected experiment trackers need, checked on rank 0 before step 1, one line each:
W&B's credentials (or an offline mode) and its server, a remote MLflow server. Without this a
missing key is a traceback from inside ``wandb.init`` and an unreachable MLflow server minutes
of retries, both after the model was built."""

from __future__ import annotations

import netrc
import os
from typing import Optional
from urllib.parse import urlparse

TIMEOUT_S = 5.0


def _unreachable(url: str) -> Optional[str]:
    from megasmol.utils.hub import unreachable

    return unreachable(url, TIMEOUT_S)


def wandb_problem(env=os.environ) -> Optional[str]:
    if env.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return None
    base = env.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not env.get("WANDB_API_KEY"):
        try:
            login = netrc.netrc().authenticators(urlparse(base).hostname or "api.wandb.ai")
        except (FileNotFoundError, netrc.NetrcParseError):
            login = None
        if login is None:
            return ("logging.trackers: wandb has no API key (run `wandb login` or set WANDB_API_KEY), "
                    "or set WANDB_MODE=offline to write under the run directory for `wandb sync`")
    why = _unreachable(base)
    return None if why is None else (f"logging.trackers: wandb {why}; set WANDB_MODE=offline to log "
                                     "locally and `wandb sync` later")


def mlflow_problem(tracking_uri: Optional[str], env=os.environ) -> Optional[str]:
    uri = tracking_uri or env.get("MLFLOW_TRACKING_URI")
    if not uri or urlparse(uri).scheme not in ("http", "https"):
        return None  # a local store (file, sqlite): nothing to reach
    why = _unreachable(uri)
    return None if why is None else f"logging.mlflow_tracking_uri {uri}: {why}"


def tracker_problems(logging_config) -> list[str]:
    problems = []
    if "wandb" in logging_config.trackers:
        problems.append(wandb_problem())
    if "mlflow" in logging_config.trackers:
        problems.append(mlflow_problem(logging_config.mlflow_tracking_uri))
    return [p for p in problems if p]
