"""Run-config sections for the training loop: optimizer, checkpoints, logging, eval, spikes.

Plain dataclasses (one docstring per field, ``validate`` raising ``ConfigError``); nothing here
imports Megatron-Core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megasmol.config.typed import PATH, ConfigError


@dataclass
class WeightDecayPolicy:
    """What weight decay applies to (SmolLM3's choices by default)."""

    decay_embeddings: bool = False
    """Decay the token embedding and output layer (SmolLM3: no)."""
    decay_norms: bool = True
    """Decay RMSNorm / QK-norm weights (SmolLM3 via nanotron: yes)."""
    decay_biases: bool = False
    """Decay biases (SmolLM3 has none; Megatron-Core's default: no)."""


@dataclass
class MuonSettings:
    """Muon (``optim.name: muon``): momentum orthogonalized by a Newton-Schulz iteration, on the
    2-D hidden matrices; embeddings, the output layer, norms and biases stay on AdamW with
    ``optim``'s betas, eps and weight decay (as Moonlight and Megatron-Core do)."""

    momentum: float = 0.95
    """Momentum of the gradient before it is orthogonalized (Moonlight, Megatron-Core: 0.95)."""
    nesterov: bool = True
    """Nesterov momentum: orthogonalize ``grad + momentum * buffer`` rather than the buffer."""
    ns_steps: int = 5
    """Newton-Schulz iterations (quintic coefficients of Keller Jordan's Muon, as
    emerging-optimizers' ``quintic`` set)."""
    scale_mode: Literal["spectral", "shape_scaling", "unit_rms_norm"] = "spectral"
    """Scale of the orthogonalized update of an ``m x n`` matrix: ``spectral`` sqrt(max(m, n))
    (Moonlight), ``shape_scaling`` sqrt(max(1, m/n)) (Keller Jordan), ``unit_rms_norm``
    sqrt(m/n) (Scion)."""
    extra_scale: float = 0.2
    """Multiplies the scale above. ``0.2`` with ``spectral`` gives an update RMS of about 0.2,
    AdamW's typical one (Moonlight), so AdamW's learning rate and weight decay carry over."""
    split_qkv: bool = True
    """Orthogonalize the query, key and value blocks of the fused QKV matrix separately
    (Megatron-Core's default)."""
    matmul_precision: Literal["highest", "high", "medium"] = "medium"
    """``torch.set_float32_matmul_precision`` during the iteration: ``medium`` runs it in bf16
    (Muon's usual choice, fast on GPUs), ``highest`` in fp32."""

    def validate(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optim.muon.momentum must be in [0, 1), got {self.momentum}")
        if self.ns_steps < 1:
            raise ConfigError(f"optim.muon.ns_steps must be >= 1, got {self.ns_steps}")
        if not self.extra_scale > 0:
            raise ConfigError(f"optim.muon.extra_scale must be > 0, got {self.extra_scale}")


@dataclass
class AdEMAMixSettings:
    """AdEMAMix (``optim.name: ademamix``): AdamW plus a slow EMA of the gradient (beta3) added to
    the fast one with weight alpha (Pagliardini et al., 2024). beta1, beta2, eps and weight decay
    are ``optim``'s. From the ``pytorch-optimizer`` library."""

    beta3: float = 0.9999
    """Decay of the slow momentum (paper: 0.9999)."""
    alpha: float = 5.0
    """Weight of the slow momentum in the update (paper: 5 to 8)."""
    warmup_steps: int = 0
    """Steps over which alpha rises linearly from 0 and beta3 from beta1 (the paper's
    T_alpha = T_beta3, which it sets to the run's length); 0: no warm-up."""

    def validate(self) -> None:
        if not 0.0 <= self.beta3 < 1.0:
            raise ConfigError(f"optim.ademamix.beta3 must be in [0, 1), got {self.beta3}")
        if self.alpha < 0:
            raise ConfigError(f"optim.ademamix.alpha must be >= 0, got {self.alpha}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.ademamix.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class OptimizerSettings:
    """The optimizer, through Megatron-Core's optimizer wrappers; the LR lives in ``schedule``."""

    name: Literal["adamw", "muon", "ademamix"] = "adamw"
    """``adamw`` (SmolLM3's), ``muon`` (Megatron-Core's design: Muon on hidden matrices, AdamW on
    the rest; see ``muon``) or ``ademamix`` (see ``ademamix``)."""
    beta1: float = 0.9
    """Adam beta1 (SmolLM3: 0.9)."""
    beta2: float = 0.95
    """Adam beta2 (SmolLM3: 0.95)."""
    eps: float = 1e-8
    """Adam epsilon (SmolLM3: 1e-8)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (SmolLM3: 0.1), applied per ``decay``."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    decay: WeightDecayPolicy = field(default_factory=WeightDecayPolicy)
    """Which parameter kinds are decayed (embeddings never, by default)."""
    distributed: bool = True
    """Shard optimizer states over data-parallel ranks: AdamW's with Megatron-Core's distributed
    optimizer (ZeRO-1), Muon's and AdEMAMix's by whole parameter with its layer-wise one."""
    muon: MuonSettings = field(default_factory=MuonSettings)
    """Muon's own hyper-parameters (``name: muon``)."""
    ademamix: AdEMAMixSettings = field(default_factory=AdEMAMixSettings)
    """AdEMAMix's own hyper-parameters (``name: ademamix``)."""

    def validate(self) -> None:
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")
        self.muon.validate()
        self.ademamix.validate()


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written, and where a run starts from."""

    dir: Optional[str] = field(default=None, metadata=PATH)
    """Checkpoint root (default: ``<run_dir>/checkpoints``): a directory, or ``s3://bucket/prefix``
    in S3-compatible storage (endpoint, credentials and retries from the standard AWS settings:
    ``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE``, ...; needs ``pip install 'megasmol[s3]'``). A bucket
    checkpoint is written to ``staging_dir`` first, then uploaded in the background; the bucket's
    ``latest`` moves once every object is uploaded and verified."""
    staging_dir: Optional[str] = field(default=None, metadata=PATH)
    """With an ``s3://`` ``dir``: the local directory checkpoints are written to before their upload,
    and downloaded to for a resume when the bucket's are newer (default:
    ``<run_dir>/checkpoints``). Every rank must see it (one node, or a shared file system)."""
    interval: int = 1000
    """Save every this many steps (0: only at the end and on signals)."""
    keep_last: int = 3
    """Keep this many newest checkpoints; older ones are deleted after a save (0: keep all)."""
    save_on_signal: bool = True
    """On SIGTERM or SIGUSR1 (preemption, Slurm ``--signal``), save after the current step and
    exit, so a requeued job resumes where it stopped."""
    save_at_end: bool = True
    """Save after the last step."""
    async_save: bool = False
    """Write checkpoint files in a background process while training goes on (Megatron-Core's
    asynchronous ``dist_checkpointing`` save); the checkpoint is renamed into place and
    ``latest`` moves only once every rank's files are complete."""
    resume: bool = True
    """Start from the latest complete checkpoint in ``dir`` when there is one."""
    init_from: Optional[str] = field(default=None, metadata=PATH)
    """Weights-only start from another run's checkpoint (root, iteration or run directory): new
    optimizer, schedule and data position. Ignored when resuming this run's own checkpoint."""
    branch_from: Optional[str] = field(default=None, metadata=PATH)
    """Start as a branch of another run: ``RUN_DIR@STEP`` (that run's checkpoint at STEP; without
    ``@STEP``, its latest) or a checkpoint directory; in a bucket, ``s3://bucket/prefix@STEP``
    (or a root or an iteration there), downloaded once into the local cache. Model AND optimizer
    state come from it; the
    data, the run directory and the step counter are this run's own, and ``schedule.kind:
    decay`` starts from the LR the source had at that step (annealing experiments, SmolLM3's
    stage 2/3 data choice, decaying a WSD run to compare it with a cosine one). The source is only
    read. Ignored once this run has its own checkpoint (it resumes from that)."""
    post_save_command: Optional[str] = None
    """Shell command run on rank 0 after each save, off the training thread and one at a time.
    The checkpoint reaches it as ``$MEGASMOL_CHECKPOINT`` and ``$MEGASMOL_STEP``; ``{path}`` and
    ``{step}`` are shorthands for them, safe bare or quoted (e.g. ``aws s3 sync {path}
    s3://bucket/run/iter_{step}``): a path is never read as shell syntax."""
    post_save_timeout_s: float = 3600.0
    """Stop a ``post_save_command`` still running after this many seconds (counted failed)."""
    signal_grace_s: float = 20.0
    """After SIGTERM or SIGUSR1, exit at most this many seconds after the signal: the save after
    the current step and a ``post_save_command`` still running share them, and the command (its
    whole process group) is stopped when they run out; the save itself is never cut short. Slurm
    kills a job ``KillWait`` seconds after its SIGTERM (default 30; ``scontrol show config`` shows
    the cluster's): keep this a few seconds below your scheduler's, for the step in progress and
    the exit. With ``sbatch --signal=USR1@N`` (SIGUSR1 N seconds before the time limit), up to
    about N."""
    delete_after_upload: bool = False
    """After ``post_save_command`` succeeds, delete the local copies of older checkpoints (the
    newest always stays, for resume and rollback)."""

    def validate(self) -> None:
        if self.interval < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.interval and checkpoint.keep_last must be >= 0")
        if not self.post_save_timeout_s > 0:
            raise ConfigError("checkpoint.post_save_timeout_s must be > 0")
        if not self.signal_grace_s > 0:
            raise ConfigError("checkpoint.signal_grace_s must be > 0")
        if self.branch_from is not None and self.init_from is not None:
            raise ConfigError("checkpoint.branch_from and checkpoint.init_from exclude each other "
                              "(a branch takes weights and optimizer state; init_from weights only)")
        if self.staging_dir is not None and not (self.dir or "").startswith("s3://"):
            raise ConfigError("checkpoint.staging_dir: only for an s3:// checkpoint.dir; a local "
                              "checkpoint.dir is written in place")
        if self.delete_after_upload and not self.post_save_command:
            raise ConfigError("checkpoint.delete_after_upload needs checkpoint.post_save_command")


@dataclass
class LoggingConfig:
    """What each log interval reports and where."""

    interval: int = 10
    """Steps between log lines (metrics are averaged over the interval)."""
    tensorboard: bool = True
    """Write TensorBoard event files to ``<run_dir>/tensorboard``."""
    trackers: list[Literal["wandb", "mlflow", "trackio"]] = field(default_factory=list)
    """More experiment trackers, each an optional extra (``pip install 'megasmol[wandb]'``): W&B
    (``WANDB_MODE=offline`` honoured), MLflow (a local file store unless
    ``mlflow_tracking_uri``), trackio (local). A restarted run continues the same tracker run."""
    project: Optional[str] = None
    """Tracker project / experiment name (default: the run directory's parent's name)."""
    run_name: Optional[str] = None
    """Tracker run name (default: the run directory's name)."""
    mlflow_tracking_uri: Optional[str] = None
    """MLflow server or store (default: ``MLFLOW_TRACKING_URI``, else ``<run_dir>/mlruns``). MLflow 3
    opens a file store only with ``MLFLOW_ALLOW_FILE_STORE=true``: read the default store with
    ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <run_dir>/mlruns``, or give
    ``sqlite:///<path>/mlflow.db`` (the full ``mlflow`` package) to log to SQLite instead."""
    jsonl: bool = True
    """Append one JSON object per log line to ``<run_dir>/metrics.jsonl``."""
    peak_tflops: Optional[float] = None
    """Per-device peak dense TFLOP/s for MFU (default: from the GPU model for H100/H200/A100,
    none on CPU)."""
    nvml: bool = True
    """Add per-GPU temperature, utilization, SM clock and throttle reasons when NVML works."""
    progress: bool = True
    """Show a progress bar with ETA for the run on rank 0."""
    expected_tokens_per_s_per_gpu: Optional[float] = None
    """Throughput this run should reach per device (SmolLM3-3B: ~13.8k on H100); a sustained drop
    below ``throughput_fraction`` of it is logged as a warning with the slowest GPU's throttle
    reasons (and pre-flight compares against it)."""
    throughput_fraction: float = 0.9
    """Share of the expected throughput below which steps count as slow."""
    throughput_window: int = 100
    """Slow steps in a row before the warning."""

    def validate(self) -> None:
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"logging.trackers lists a backend twice: {self.trackers}")
        if self.expected_tokens_per_s_per_gpu is not None and not self.expected_tokens_per_s_per_gpu > 0:
            raise ConfigError("logging.expected_tokens_per_s_per_gpu must be > 0")
        if not 0 < self.throughput_fraction <= 1:
            raise ConfigError("logging.throughput_fraction must be in (0, 1], got "
                              f"{self.throughput_fraction}")
        if self.throughput_window < 1:
            raise ConfigError("logging.throughput_window must be >= 1")
        if self.interval < 1:
            raise ConfigError(f"logging.interval must be >= 1, got {self.interval}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError("logging.peak_tflops must be > 0")


@dataclass
class EvalConfig:
    """Validation loss on the held-out split, and downstream tasks scored in the loop."""

    interval: int = 1000
    """Steps between validation runs (0: never)."""
    steps: int = 4
    """Global batches per validation run (always the same held-out samples)."""
    tasks: list[str] = field(default_factory=list)
    """Downstream tasks scored on the training model itself (names as for ``megasmol eval
    tasks``: built-in, a task YAML or a JSONL file, relative to this config)."""
    tasks_interval: int = 0
    """Steps between downstream evaluations (0: only with ``tasks_at_checkpoint``)."""
    tasks_at_checkpoint: Optional[bool] = None
    """Also score the tasks at every checkpoint step (``checkpoint.interval``) and the last step
    (true). false: not at checkpoints, so with ``tasks_interval`` 0 the one switch that turns
    in-loop scoring off (``tasks`` stay listed, unscored). Left unset with ``tasks`` and no
    ``tasks_interval``, the run is refused as a forgotten schedule."""
    tasks_limit: Optional[int] = 1000
    """A fixed, seeded subset of this many examples per task (the playbook used 1,000; null: all)."""
    tasks_num_fewshot: int = 0
    """Few-shot examples in each prompt, drawn with the run's seed from each task's few-shot split
    (as ``megasmol eval tasks --num-fewshot``)."""

    def validate(self) -> None:
        if min(self.interval, self.steps, self.tasks_interval, self.tasks_num_fewshot) < 0:
            raise ConfigError("eval.interval, eval.steps, eval.tasks_interval and "
                              "eval.tasks_num_fewshot must be >= 0")
        if self.tasks and not self.tasks_interval and self.tasks_at_checkpoint is None:
            raise ConfigError("eval.tasks is set but never scored: set eval.tasks_interval or "
                              "eval.tasks_at_checkpoint: true (or eval.tasks_at_checkpoint: false "
                              "to leave them unscored in the loop)")
        if self.tasks_limit is not None and self.tasks_limit < 1:
            raise ConfigError("eval.tasks_limit must be >= 1 (or null for every example)")

    @property
    def scores_tasks(self) -> bool:
        """Whether the loop scores ``tasks`` at all."""
        return bool(self.tasks and (self.tasks_interval or self.tasks_at_checkpoint))


@dataclass
class WatchdogConfig:
    """The hang watchdog (``train/callbacks/hang.py``): a step that runs far past its peers dumps every
    thread's stack to ``<run_dir>/hang-step<N>-rank<R>.txt`` and exits with code 75, which the
    launch scripts requeue (the job resumes from the last checkpoint)."""

    enabled: bool = True
    """Watch every training step on every rank."""
    factor: float = 10.0
    """A step is hung after this multiple of the median of the last 50 step times."""
    min_s: float = 300.0
    """... and never before this many seconds (a slow step is not a hang)."""
    first_step_s: float = 1800.0
    """Deadline while no step has finished yet (kernel compilation, communicator setup)."""
    limit_s: Optional[float] = None
    """An absolute deadline per step instead of the median rule."""
    nvrx_heartbeats: bool = False
    """Also send a heartbeat per step to NVRx's rank monitor (jobs started by ``ft_launcher`` of
    ``nvidia-resiliency-ext``, ``pip install 'megasmol[nvrx]'``), which restarts a hung rank."""

    def validate(self) -> None:
        for name in ("factor", "min_s", "first_step_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"watchdog.{name} must be > 0, got {getattr(self, name)}")
        if self.factor < 2:
            raise ConfigError(f"watchdog.factor must be >= 2 (ordinary step-time jitter), got {self.factor}")
        if self.limit_s is not None and not self.limit_s > 0:
            raise ConfigError(f"watchdog.limit_s must be > 0, got {self.limit_s}")


@dataclass
class SpikeConfig:
    """Loss-spike detection and what to do about one (PaLM / Falcon practice)."""

    policy: Literal["log", "skip", "rollback"] = "log"
    """log: report only; skip: drop the step's update; rollback: reload the last checkpoint and
    skip the data from there to the spike."""
    window: int = 50
    """Steps in the running window the loss is compared against."""
    threshold: float = 4.0
    """A loss more than this many standard deviations above the window mean is a spike."""
    min_relative_rise: float = 0.05
    """... and at least this much above the mean, relatively (ignores tiny-variance windows)."""
    warmup_steps: int = 20
    """No detection before the window has this many losses. NaN/inf losses always count."""
    max_rollbacks: int = 5
    """Give up (stop with an error) after this many rollbacks in one process."""
    max_nonfinite_steps: int = 5
    """A step whose loss or gradient is inf/NaN applies no update; this many such steps in a row
    stop the run with an error (the checkpoints keep the last finite weights)."""
    skip_batches: list[list[int]] = field(default_factory=list)
    """Step ranges ``[first, last]`` (inclusive) whose data is skipped: no forward, no update,
    the step counter and LR schedule still advance (Megatron-LM's iterations-to-skip)."""

    def validate(self) -> None:
        if self.window < 2 or self.warmup_steps < 2:
            raise ConfigError("spikes.window and spikes.warmup_steps must be >= 2")
        if self.threshold <= 0:
            raise ConfigError("spikes.threshold must be > 0")
        if self.max_nonfinite_steps < 1:
            raise ConfigError("spikes.max_nonfinite_steps must be >= 1")
        for i, pair in enumerate(self.skip_batches):
            if len(pair) != 2 or not 1 <= pair[0] <= pair[1]:
                raise ConfigError(f"spikes.skip_batches[{i}]: expected [first, last] with "
                                  f"1 <= first <= last, got {pair}")
