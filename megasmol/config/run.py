"""The run config: one YAML file, typed sections, ``--set section.field=value`` overrides."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

import yaml

from megasmol.config.parallel import ParallelLayout
from megasmol.config.preference import PreferenceConfig
from megasmol.config.resilience import ResilienceConfig, default_local_dir
from megasmol.config.rewards import RewardsConfig
from megasmol.config.rl import RLConfig
from megasmol.config.schedule import ScheduleConfig
from megasmol.config.sections import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    OptimizerSettings,
    SpikeConfig,
    WatchdogConfig,
)
from megasmol.config.typed import NAME_OR_PATH, PATH, ConfigError, from_dict, load_yaml, path_fields, to_dict


@dataclass
class DataConfig:
    """What the run trains on and how sequences are formed."""

    recipe: str = field(metadata=NAME_OR_PATH)
    """Data recipe: a name from the repository's data/ folder or a YAML path (relative to this config)."""
    root: Optional[str] = field(default=None, metadata=PATH)
    """Override the recipe's ``root`` (where its dataset prefixes live)."""
    seq_length: int = 4096
    """Tokens per training sequence (a stage may set its own)."""
    document_masking: bool = True
    """Attention stays inside each document of a packed sequence, and the token predicted from a
    document's EOS gets no loss (SmolLM3 default)."""
    reset_position_ids: bool = False
    """Restart position ids at each document (SmolLM3 does not: RoPE is relative)."""
    validation_fraction: float = 0.01
    """Share of each dataset's documents held out for validation loss (0 disables)."""
    cache_dir: Optional[str] = field(default=None, metadata=PATH)
    """Where the sample indices are cached (default: ``<run_dir>/data_cache``)."""
    max_epochs: float = 4.0
    """The audit warns when the plan repeats a dataset more than this many times."""
    prefetch: int = 2
    """Batches prepared ahead by a background thread (0: none)."""
    tokenizer: Optional[str] = field(default="auto", metadata=NAME_OR_PATH)
    """Tokenizer the data was made with, copied into every checkpoint so export, generate and
    chat find it: a directory, ``bundled`` (the Llama-3.2 tokenizer SmolLM3 uses), ``auto`` (the
    tokenizer stored with the recipe's chat data by ``prepare-chat``, else ``bundled``), or null."""
    packing: Literal["ffd", "none"] = "ffd"
    """How chat datasets (``prepare-chat`` output) fill sequences: ``ffd`` packs whole
    conversations first-fit-decreasing (needs ``document_masking``), ``none`` pads each one to
    its own sequence. Plain token data is unaffected."""

    def validate(self) -> None:
        if self.seq_length < 2:
            raise ConfigError(f"data.seq_length must be >= 2, got {self.seq_length}")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ConfigError("data.validation_fraction must be in [0, 0.5), got "
                              f"{self.validation_fraction}")
        if self.max_epochs <= 0:
            raise ConfigError("data.max_epochs must be > 0")
        if self.prefetch < 0:
            raise ConfigError("data.prefetch must be >= 0")


@dataclass
class BatchRampup:
    """Grow the global batch linearly at the start of a run (GPT-3, Megatron-LM practice)."""

    start: int
    """Global batch (sequences) at step 1."""
    increment: int
    """Sequences added per level; each level lasts ``steps / levels`` steps."""
    steps: int
    """Steps until the full ``training.global_batch_size`` is reached."""

    def validate(self) -> None:
        if self.start < 1 or self.increment < 1 or self.steps < 1:
            raise ConfigError("training.batch_rampup: start, increment and steps must be >= 1")


@dataclass
class TrainingConfig:
    """Batch geometry and length of the run."""

    train_steps: int
    """Optimizer steps in the run (the last stage ends here)."""
    global_batch_size: int
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one rank."""
    seed: int = 1234
    """Seed for initialization, data order and dropout."""
    precision: Literal["fp32", "bf16", "fp8"] = "bf16"
    """Parameter/compute precision: bf16 keeps fp32 master weights and gradients reduced in
    fp32; fp8 adds Transformer Engine FP8 GEMMs (needs the te attention backend on Hopper or
    newer). CPU runs use fp32."""
    recompute: Optional[Literal["selective", "full"]] = None
    """Activation recomputation: selective (attention core) or full (whole layers)."""
    cross_entropy: Literal["plain", "chunked", "te"] = "plain"
    """How the training loss is computed from the last hidden states: ``plain`` (the output
    layer's ``[tokens, vocab]`` logits, then Megatron-Core's vocab-parallel cross-entropy),
    ``chunked`` (output layer and loss in one function over chunks of positions: the logits are
    never held, same losses and gradients, any layout; for token-weighted losses (pretraining,
    SFT) the gradients are made in the forward, for the preference and RL losses the backward
    recomputes the logits) or ``te``
    (Megatron-Core's fused cross-entropy in Transformer Engine, on the logits; needs TE and a GPU).
    ``plain`` stays the default until ``chunked`` is measured on a GPU and its recomputing
    variant (preference, RL: 1.10x plain's CPU time) is no slower: under DDP ``chunked`` adds the
    output weight's gradient straight to ``main_grad`` and saves 1.24x the logits in fp32 (more
    than the bf16 logits in bf16), and on a CPU its step took plain's CPU time (medians: 0.94x
    with 10% of the positions masked, 1.00x with none; single pairs 0.85-1.08x, the machine's
    noise); not measured on a GPU (bench/RESULTS.md). Use ``chunked`` when the logits do not
    fit."""
    batch_rampup: Optional[BatchRampup] = None
    """Start with a smaller global batch and grow it (none: full batch from step 1)."""
    stop_after_step: Optional[int] = None
    """Save and stop after this step, e.g. at a data-stage boundary; the schedule and data plan
    still span ``train_steps``, and the same command later resumes from here."""
    collective_timeout_s: float = 600.0
    """How long any collective waits for the other ranks before the job fails with an error
    naming the rank that stopped answering (a frozen or dead peer), instead of hanging; keep it
    above the longest checkpoint save and validation run."""
    attention_backend: Optional[Literal["auto", "te", "sdpa", "local"]] = None
    """Attention implementation for this run, instead of the model spec's (checkpoints are the
    same for all three): e.g. sdpa for all-gather-KV context parallelism without TE."""
    objective: Optional[Literal["next_token", "preference", "rl"]] = None
    """What the run trains: ``next_token`` (token or chat data: pretraining, mid-training, SFT),
    ``preference`` (``prepare-preferences`` pairs, with the ``preference:`` section's loss) or
    ``rl`` (``prepare-prompts`` prompt sets: completions sampled by the model, scored by the
    ``rewards:``, trained with the ``rl:`` section's policy loss). Default: the objective whose
    section the config gives (``preference:``; ``rl:`` or ``rewards:``), else ``next_token``.
    Every dataset of the recipe must be data the objective trains on."""

    def validate(self) -> None:
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"training.collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"training.seed must be in [0, 2**31), got {self.seed}")
        for name in ("train_steps", "global_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_after_step is not None and not 1 <= self.stop_after_step <= self.train_steps:
            raise ConfigError(f"training.stop_after_step must be in [1, train_steps={self.train_steps}]")
        ramp = self.batch_rampup
        if ramp is not None and ramp.start >= self.global_batch_size:
            raise ConfigError(f"training.batch_rampup.start={ramp.start} must be below "
                              f"training.global_batch_size={self.global_batch_size}")
        if self.cross_entropy == "te" and importlib.util.find_spec("transformer_engine") is None:
            raise ConfigError("training.cross_entropy=te needs Transformer Engine (pip install "
                              "'megasmol[gpu]', on a GPU); use chunked or plain")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"training.global_batch_size={self.global_batch_size} is not a "
                              f"multiple of training.micro_batch_size={self.micro_batch_size}")

    def micro_batches_per_step(self, data_parallel: int) -> int:
        per_step = self.micro_batch_size * data_parallel
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size x data_parallel = {self.micro_batch_size} x {data_parallel}")
        return self.global_batch_size // per_step


@dataclass
class RopeSettings:
    """RoPE for this run, when it differs from the model spec (long-context stages: RoPE ABF)."""

    theta: Optional[float] = None
    """RoPE base for this run, e.g. 2e6 for SmolLM3's 32k stage and 5e6 for 64k (default: the
    spec's ``rope_theta``). Recorded in every checkpoint, so export writes it."""
    max_position_embeddings: Optional[int] = None
    """Longest sequence the model is trained for (default: the spec's); must cover
    ``data.seq_length``."""

    def validate(self) -> None:
        if self.theta is not None and not self.theta > 0:
            raise ConfigError(f"rope.theta must be > 0, got {self.theta}")
        if self.max_position_embeddings is not None and self.max_position_embeddings < 1:
            raise ConfigError("rope.max_position_embeddings must be >= 1")


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
"""A value with a scheme (``s3://``, ``gs://``, ``https://``): not a path."""
BUCKET_FIELDS = ("checkpoint.dir", "checkpoint.init_from", "checkpoint.branch_from")
"""The path fields that also take ``s3://bucket/prefix`` (``ckpt/remote.py``; ``branch_from``
with its ``@STEP``)."""


SECTION_OBJECTIVES = {"preference": "preference", "rl": "rl", "rewards": "rl"}
"""Config sections that belong to one objective (and make it the default)."""


@dataclass
class RunConfig:
    """A training run."""

    data: DataConfig
    """Data recipe and sequence options."""
    training: TrainingConfig
    """Steps, batch sizes, seed."""
    model: Optional[str] = field(default=None, metadata=NAME_OR_PATH)
    """Model spec: a preset name (model_specs/), a spec YAML path, or a checkpoint directory
    (its spec); omitted, the spec of ``checkpoint.init_from``. ``rope`` and
    ``training.attention_backend`` apply on top."""
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    """Tensor / pipeline / context parallel sizes; data parallel takes the remaining ranks."""
    rope: RopeSettings = field(default_factory=RopeSettings)
    """RoPE base and position range for this run (long-context stages change them)."""
    optim: OptimizerSettings = field(default_factory=OptimizerSettings)
    """The optimizer (AdamW, Muon or AdEMAMix), its hyper-parameters and weight-decay groups."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning rate and its schedule over this run's steps (a new run is a fresh schedule)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, resuming and ``init_from``."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console, JSONL and TensorBoard metrics."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out validation loss."""
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    """Loss-spike detection, policy and data ranges to skip."""
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    """The hang watchdog: stack dumps and a requeue-able exit when a step hangs."""
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    """In-process restart (NVRx): heal a failed or frozen rank without restarting the job."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """The loss on preference pairs (DPO / IPO / APO) of ``training.objective: preference``
    (its default when this section is given; refused with ``next_token``)."""
    rl: RLConfig = field(default_factory=RLConfig)
    """Sampling, advantages and the policy loss (GRPO family, TRL's names) of
    ``training.objective: rl`` (its default when this section is given)."""
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    """What scores an RL completion (``training.objective: rl``)."""
    run_dir: str = field(default="runs/default", metadata=PATH)
    """Where checkpoints, logs and caches go (relative to the config file)."""
    paths_from: Optional[str] = field(default=None, metadata=PATH)
    """Directory that relative paths in this config are taken from (default: the config file's
    own); ``megasmol ablate`` writes it so generated configs keep using the base config's files."""
    config_dir: str = field(default=".", init=False, repr=False)
    """Directory of the config file; relative paths in the config are taken from it."""
    given_sections: ClassVar[frozenset] = frozenset()
    """The top-level keys the config file and ``--set`` wrote (not a field: never saved); tells
    a section left at its defaults from one written out (``load_run_config`` sets it)."""

    def validate(self) -> None:
        for key in path_fields(RunConfig):
            value = self
            for part in key.split("."):
                value = getattr(value, part)
            if isinstance(value, str) and key in BUCKET_FIELDS and value.startswith("s3://"):
                from megasmol.utils.s3_url import StoreError, parse

                where = value.rpartition("@")[0] if key == "checkpoint.branch_from" else ""
                try:
                    parse(where or value, key)
                except StoreError as exc:
                    raise ConfigError(str(exc)) from None
            elif isinstance(value, str) and URL.match(value):
                raise ConfigError(
                    f"{key}: {value} is a URL, and this field takes a path on a file system (it "
                    "would make a local folder named after it); s3:// URLs are taken by "
                    f"{', '.join(BUCKET_FIELDS)}")
        start = self.checkpoint.init_from or self.checkpoint.branch_from
        if self.model is None and start is None:
            raise ConfigError("model is missing: name a preset, a spec YAML or a checkpoint "
                              "(or set checkpoint.init_from or branch_from to start from one)")
        if self.schedule.kind == "decay" and self.checkpoint.branch_from is None:
            raise ConfigError("schedule.kind=decay decays from the LR of the run this one branches "
                              "from: set checkpoint.branch_from (RUN_DIR@STEP)")
        self.schedule.check_against(self.training.train_steps)
        self.resilience.check_against(self.training.collective_timeout_s, self.watchdog.enabled,
                                      self.watchdog.min_s)
        if self.eval.interval and self.eval.steps and not self.data.validation_fraction:
            raise ConfigError("eval.interval is set but data.validation_fraction is 0: there is no "
                              "held-out split to evaluate on (set eval.interval=0 or a fraction)")

    @property
    def objective(self) -> str:
        """``training.objective``, or its default: the objective whose section the config gives
        (:data:`SECTION_OBJECTIVES`), else ``next_token``."""
        if self.training.objective is not None:
            return self.training.objective
        given = [SECTION_OBJECTIVES[s] for s in SECTION_OBJECTIVES if s in self.given_sections]
        return given[0] if given else "next_token"

    def check_objective(self) -> None:
        """A section of one objective (``preference:``, ``rl:``, ``rewards:``) with another
        objective would go unused without a word."""
        for section, objective in SECTION_OBJECTIVES.items():
            if section in self.given_sections and self.objective != objective:
                raise ConfigError(f"{section}: is set but training.objective is {self.objective}, "
                                  f"which does not use it: set training.objective: {objective}, or "
                                  f"remove the {section}: section")

    def to_dict(self) -> dict:
        """The resolved config (saved with every checkpoint; ``training.objective`` resolved)."""
        tree = to_dict(self)
        tree["training"]["objective"] = self.objective
        return {**tree, "config_dir": self.config_dir}

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints are written on this machine: ``checkpoint.dir``, or with an ``s3://``
        one its ``checkpoint.staging_dir``."""
        if self.checkpoint_url:
            if self.checkpoint.staging_dir:
                return self.path(self.checkpoint.staging_dir)
        elif self.checkpoint.dir:
            return self.path(self.checkpoint.dir)
        return self.path(self.run_dir) / "checkpoints"

    @property
    def local_checkpoint_dir(self) -> Path:
        """Where this machine keeps the local copies of ``resilience.local_checkpoint_every``."""
        given = self.resilience.local_checkpoint_dir
        return self.path(given) if given else default_local_dir()

    @property
    def checkpoint_url(self) -> Optional[str]:
        """``checkpoint.dir`` when it is in a bucket (``s3://``)."""
        value = self.checkpoint.dir
        return value if value and value.startswith("s3://") else None

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (Path(self.config_dir) / p).resolve()

    @property
    def cache_dir(self) -> Path:
        if self.data.cache_dir:
            return self.path(self.data.cache_dir)
        return self.path(self.run_dir) / "data_cache"

    def recipe_reference(self) -> str:
        candidate = self.path(self.data.recipe)
        return str(candidate) if candidate.is_file() else self.data.recipe


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {dotted}: cannot parse value {raw!r}: {exc}") from None


def cli_override(item: str) -> str:
    """One ``--set KEY=VALUE`` from a command line: a relative path in a path field is made
    absolute from the current directory, as every command-line tool does (paths written inside
    a config file stay relative to that file)."""
    if "=" not in item:
        return item  # load_run_config names the mistake
    key, raw = item.split("=", 1)
    value = raw.strip()
    if not value or value in ("null", "~") or value.startswith(("/", "~", "[", "{", "$")) or URL.match(value):
        return item  # (a URL is refused by RunConfig.validate, naming the field)
    kind = path_fields(RunConfig).get(key.strip())  # the fields marked PATH / NAME_OR_PATH
    if kind == "path" or (kind == "name_or_path" and Path(value).exists()):
        return f"{key}={os.path.abspath(value)}"
    return item


def load_run_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load and validate a run config; ``overrides`` are ``section.field=value`` strings."""
    data = load_yaml(path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected section.field=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), raw)
    config = from_dict(RunConfig, data, where="")
    config.given_sections = frozenset(data)
    config.check_objective()
    here = Path(path).resolve().parent
    config.config_dir = str((here / Path(config.paths_from).expanduser()).resolve()
                            if config.paths_from else here)
    config.resilience.check_local_dir(config.local_checkpoint_dir, config.checkpoint_dir)
    if config.checkpoint.post_save_command:
        from megasmol.config.post_save import check_command

        check_command(config.checkpoint.post_save_command, config.checkpoint_dir)
    return config
