"""Typed configuration: one tree of dataclasses, filled from defaults, a TOML recipe and
the command line (in that order of increasing precedence).

    python train.py --job.config_file train_configs/debug_model.toml --training.steps 20

Every field's docstring (the string literal under it) is its `--help` text. Unknown
sections or keys, wrong types and impossible values raise `ConfigError`, whose message
is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A user error in the recipe or the command line; its message is one line."""


@dataclass
class Job:
    config_file: str | None = None
    """TOML recipe to load (command-line values override it)."""
    dump_folder: str = "./outputs"
    """Folder for everything the run writes: checkpoints, metrics, config, traces."""
    description: str = ""
    """Free text describing the run (logged and saved with the config)."""
    dry_run: bool = False
    """Resolve the config, model, mesh and batch plan, print them and exit without training."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Record torch.profiler traces."""
    save_traces_folder: str = "profile_traces"
    """Trace folder, under the dump folder."""
    profile_freq: int = 10
    """Record one profiled step every this many steps."""


@dataclass
class Metrics:
    log_freq: int = 10
    """Log metrics every this many steps."""
    enable_tensorboard: bool = False
    """Also write TensorBoard scalars."""
    save_tb_folder: str = "tb"
    """TensorBoard folder, under the dump folder."""


@dataclass
class Model:
    name: str = "llama3"
    """Model family; only 'llama3' exists."""
    flavor: str = "debugmodel"
    """Model size: debugmodel, 1B, 8B or 70B."""
    norm_type: str = "rmsnorm"
    """Normalization layer; only 'rmsnorm' (Llama's) is implemented."""
    attn_impl: str = "auto"
    """Attention kernel: auto (FA3 > flash-attn 2 > SDPA, as importable), sdpa, flash3, flash2."""


@dataclass
class Optimizer:
    name: str = "AdamW"
    """Optimizer; only AdamW is implemented."""
    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms)."""
    fused: bool = True
    """Use the fused AdamW kernel when the device supports it."""


@dataclass
class LRScheduler:
    decay_type: str = "cosine"
    """Shape of the decay after warmup: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of the peak learning rate."""


@dataclass
class Training:
    batch_size: int = 8
    """Sequences per micro-batch on each data-parallel rank."""
    global_batch_size: int = -1
    """Sequences per optimizer step over all ranks; -1 = batch_size x DP degree (no accumulation)"""
    seq_len: int = 2048
    """Tokens per sequence (the model's context length)."""
    vocab_size: int = 256
    """Vocabulary size; 256 for spike-count tokens."""
    warmup_steps: int = 200
    """Linear learning-rate warmup steps."""
    max_norm: float = 1.0
    """Clip the global gradient norm to this value (<= 0 disables clipping)."""
    steps: int = 10000
    """Total optimizer steps."""
    data_parallel_replicate_degree: int = 1
    """HSDP replicas (the outer mesh dimension)."""
    data_parallel_shard_degree: int = -1
    """FSDP shard group size; -1 = the ranks left after the other degrees."""
    tensor_parallel_degree: int = 1
    """Tensor parallelism; only 1 is implemented."""
    compile: bool = False
    """torch.compile each transformer block."""
    dataset: str = "synthetic"
    """Dataset: primate, rodent, synthetic, or a name used with dataset_path."""
    dataset_path: str | None = None
    """Local directory, parquet/arrow files or Hub id to read instead of the named dataset."""
    seed: int = 0
    """Seed for initialization, data order and dropout-free randomness."""
    deterministic: bool = False
    """Ask PyTorch for deterministic kernels (slower)."""
    mixed_precision_param: str = "bfloat16"
    """Compute dtype of FSDP-gathered parameters: bfloat16 or float32 (CPU runs use float32)."""
    mixed_precision_reduce: str = "float32"
    """Dtype of gradient reduction: float32 or bfloat16."""
    max_consecutive_bad_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class Data:
    split: str = "train"
    """Dataset split to train on: train or test."""
    source_datasets: list[str] = field(default_factory=list)
    """Keep only rows whose source_dataset is in this list (empty = all)."""
    streaming: bool = False
    """Stream rows (IterableDataset) instead of using the cached map-style dataset."""
    shuffle: bool = True
    """Reshuffle rows (map-style) or shards (streaming) each epoch, seeded by training.seed."""
    prefetch: int = 4
    """Batches prepared ahead by the background loader thread."""
    synthetic_rows: int = 64
    """Train rows of the synthetic dataset generated on first use (test: a tenth, at least 4)."""
    stream_shards: int = 256
    """Shards of a local dataset when streaming (a resume re-reads at most one); >= DP ranks."""


@dataclass
class Experimental:
    pipeline_parallel_degree: int = 1
    """Pipeline parallelism; only 1 is implemented."""
    context_parallel_degree: int = 1
    """Context parallelism; only 1 is implemented."""


@dataclass
class Checkpoint:
    enable_checkpoint: bool = False
    """Save and resume DCP checkpoints."""
    folder: str = "checkpoint"
    """Checkpoint folder, under the dump folder."""
    interval_type: str = "steps"
    """Unit of the save interval: steps or seconds."""
    interval: int = 500
    """Save every this many steps (or seconds)."""
    model_weights_only: bool = False
    """Make the last save a model-only export in export_dtype instead of the full state."""
    export_dtype: str = "float32"
    """Dtype of the model-only export: float32, bfloat16 or float16."""
    async_mode: str = "disabled"
    """disabled, async or async_with_pinned_mem (training continues while a save is written)."""
    keep_latest_k: int = 3
    """Keep this many newest complete step directories (0 = keep all)."""
    load_step: int = -1
    """Step to resume from; -1 = the newest complete one."""
    initial_load_path: str | None = None
    """DCP directory to initialize model weights from when the run has no checkpoint yet."""
    exclude_from_loading: list[str] = field(default_factory=list)
    """States not to restore on resume: model, optimizer, lr_scheduler, dataloader, train_state."""
    fallback_on_corruption: bool = False
    """If the newest checkpoint is corrupted, load the previous complete one instead of stopping."""


@dataclass
class ActivationCheckpoint:
    mode: str = "selective"
    """Activation checkpointing: none, selective or full."""
    selective_ac_option: str = "2"
    """For selective: 'op' (save matmul outputs, recompute the rest) or N (every N-th block)."""


@dataclass
class Float8:
    enable_float8_linear: bool = False
    """Float8 linear layers; not implemented yet."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    profiling: Profiling = field(default_factory=Profiling)
    metrics: Metrics = field(default_factory=Metrics)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    data: Data = field(default_factory=Data)
    experimental: Experimental = field(default_factory=Experimental)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    float8: Float8 = field(default_factory=Float8)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ----------------------------------------------------------------------------- schema

SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(JobConfig)}
_SECTION_CLASSES = {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its attribute docstring)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _type_name(tp: Any) -> str:
    if tp in (int, float, str, bool):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin is list:
        return "list of " + _type_name(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or none"
    return str(tp)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, tp: Any, from_cli: bool) -> Any:
    """Check (TOML) or convert (command line) one value to its field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if value is None or (from_cli and str(value).lower() in ("none", "")):
            return None
        return _coerce(key, value, inner, from_cli)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if from_cli and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list of {_type_name(inner)}")
        return [_coerce(key, v, inner, from_cli) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in ("true", "1", "yes"):
            return True
        if from_cli and str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_cli:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. selective_ac_option = 2
        raise ConfigError(f"{key} = {value!r}: expected a string")
    raise AssertionError(f"unsupported config type {tp} for {key}")


def _set(cfg: JobConfig, dotted: str, value: Any, from_cli: bool) -> None:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise ConfigError(
            f"unknown config section '{section}'{_suggest(section, list(SECTIONS))}; "
            f"sections are: {', '.join(SECTIONS)}"
        )
    obj = getattr(cfg, section)
    types_ = _field_types(type(obj))
    if key not in types_:
        close = difflib.get_close_matches(key, list(types_), n=1, cutoff=0.6)
        hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
        raise ConfigError(
            f"unknown config key '{dotted}'{hint}; [{section}] has: {', '.join(types_)}"
        )
    setattr(obj, key, _coerce(dotted, value, types_[key], from_cli))


def _load_toml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job.config_file = {path!r}: no such file")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def _parse_cli(argv: list[str]) -> list[tuple[str, Any]]:
    """`--a.b=v`, `--a.b v`, bare `--a.flag` and `--a.no_flag` into (key, raw value) pairs."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(
                f"unexpected argument {arg!r}: options look like --section.key=value (see --help)"
            )
        name, eq, value = arg[2:].partition("=")
        section, _, key = name.partition(".")
        key = key.replace("-", "_")
        cls = _SECTION_CLASSES.get(section)
        types_ = _field_types(cls) if cls else {}
        is_bool = types_.get(key) is bool
        if not eq and not is_bool and key.startswith("no_") and types_.get(key[3:]) is bool:
            if section and key[3:]:
                pairs.append((f"{section}.{key[3:]}", False))
                i += 1
                continue
        if eq:
            pairs.append((f"{section}.{key}", value))
            i += 1
        elif is_bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            pairs.append((f"{section}.{key}", True))
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((f"{section}.{key}", argv[i + 1]))
            i += 2
        else:
            raise ConfigError(f"--{name} needs a value (--{name}=VALUE)")
    return pairs


def format_help() -> str:
    lines = [
        "usage: train.py --job.config_file FILE [--section.key=VALUE ...]",
        "",
        "Command line overrides the TOML file, which overrides the defaults below.",
        "Booleans also take bare --section.flag / --section.no_flag; lists are comma-separated.",
    ]
    for section, cls in _SECTION_CLASSES.items():
        lines.append(f"\n[{section}]")
        docs = _field_docs(cls)
        defaults = cls()
        for name, tp in _field_types(cls).items():
            default = getattr(defaults, name)
            lines.append(f"  --{section}.{name} ({_type_name(tp)}, default {default!r})")
            lines.append(f"      {docs.get(name, '')}")
    return "\n".join(lines)


def load_config(argv: list[str]) -> JobConfig:
    """Build the config from defaults, then the TOML file named by --job.config_file,
    then the other command-line overrides; validate what needs no runtime information."""
    pairs = _parse_cli(argv)
    cfg = JobConfig()
    for key, value in pairs:  # find the recipe file first
        if key == "job.config_file":
            cfg.job.config_file = value
    if cfg.job.config_file:
        for section, values in _load_toml(cfg.job.config_file).items():
            if not isinstance(values, dict):
                raise ConfigError(f"{section} = {values!r}: top-level keys must be [sections]")
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value, from_cli=False)
    for key, value in pairs:
        _set(cfg, key, value, from_cli=True)
    validate(cfg)
    return cfg


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{key} = {value!r}: must be one of {', '.join(allowed)}"
            f"{_suggest(value, list(allowed))}"
        )


def validate(cfg: JobConfig) -> None:
    """Checks that need only the config (the mesh checks need the world size: see
    `titan.distributed.ParallelDims`)."""
    from titan.models.llama import FLAVORS  # local: the model module imports torch

    t, m = cfg.training, cfg.model
    _choice("model.name", m.name, ("llama3",))
    _choice("model.flavor", m.flavor, tuple(FLAVORS))
    _choice("model.norm_type", m.norm_type, ("rmsnorm",))
    _choice("model.attn_impl", m.attn_impl, ("auto", "sdpa", "flash3", "flash2"))
    _choice("optimizer.name", cfg.optimizer.name, ("AdamW",))
    _choice(
        "lr_scheduler.decay_type", cfg.lr_scheduler.decay_type, ("cosine", "linear", "constant")
    )
    _choice("training.mixed_precision_param", t.mixed_precision_param, ("bfloat16", "float32"))
    _choice("training.mixed_precision_reduce", t.mixed_precision_reduce, ("float32", "bfloat16"))
    _choice("data.split", cfg.data.split, ("train", "test"))
    _choice("checkpoint.interval_type", cfg.checkpoint.interval_type, ("steps", "seconds"))
    _choice(
        "checkpoint.async_mode",
        cfg.checkpoint.async_mode,
        ("disabled", "async", "async_with_pinned_mem"),
    )
    _choice(
        "checkpoint.export_dtype", cfg.checkpoint.export_dtype, ("float32", "bfloat16", "float16")
    )
    _choice(
        "activation_checkpoint.mode", cfg.activation_checkpoint.mode, ("none", "selective", "full")
    )
    opt = cfg.activation_checkpoint.selective_ac_option
    if not (opt == "op" or (opt.isdigit() and int(opt) > 0)):
        raise ConfigError(
            f"activation_checkpoint.selective_ac_option = {opt!r}: must be 'op' or a positive "
            "integer N (checkpoint every N-th block)"
        )
    for states in cfg.checkpoint.exclude_from_loading:
        _choice(
            "checkpoint.exclude_from_loading",
            states,
            ("model", "optimizer", "lr_scheduler", "dataloader", "train_state"),
        )

    positive = {
        "training.batch_size": t.batch_size,
        "training.seq_len": t.seq_len,
        "training.vocab_size": t.vocab_size,
        "training.steps": t.steps,
        "training.max_consecutive_bad_steps": t.max_consecutive_bad_steps,
        "metrics.log_freq": cfg.metrics.log_freq,
        "profiling.profile_freq": cfg.profiling.profile_freq,
        "checkpoint.interval": cfg.checkpoint.interval,
        "data.synthetic_rows": cfg.data.synthetic_rows,
        "data.prefetch": cfg.data.prefetch,
        "data.stream_shards": cfg.data.stream_shards,
        "training.data_parallel_replicate_degree": t.data_parallel_replicate_degree,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} = {value}: must be a positive integer")
    for key, value in {
        "training.warmup_steps": t.warmup_steps,
        "checkpoint.keep_latest_k": cfg.checkpoint.keep_latest_k,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} = {value}: must be >= 0")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr = {cfg.optimizer.lr}: must be positive")
    if not 0 <= cfg.lr_scheduler.min_lr_ratio <= 1:
        raise ConfigError(
            f"lr_scheduler.min_lr_ratio = {cfg.lr_scheduler.min_lr_ratio}: must be in [0, 1]"
        )
    if t.data_parallel_shard_degree == 0 or t.data_parallel_shard_degree < -1:
        raise ConfigError(
            f"training.data_parallel_shard_degree = {t.data_parallel_shard_degree}: "
            "must be -1 (the remaining ranks) or a positive integer"
        )
    if t.global_batch_size == 0 or t.global_batch_size < -1:
        raise ConfigError(
            f"training.global_batch_size = {t.global_batch_size}: must be -1 "
            "(batch_size x DP degree) or a positive integer"
        )
    not_implemented = {
        "training.tensor_parallel_degree": t.tensor_parallel_degree,
        "experimental.pipeline_parallel_degree": cfg.experimental.pipeline_parallel_degree,
        "experimental.context_parallel_degree": cfg.experimental.context_parallel_degree,
    }
    for key, value in not_implemented.items():
        if value != 1:
            raise ConfigError(
                f"{key} = {value}: only 1 is implemented in titan; use FSDP/HSDP "
                "(training.data_parallel_shard_degree / data_parallel_replicate_degree) instead"
            )
    if cfg.float8.enable_float8_linear:
        raise ConfigError(
            "float8.enable_float8_linear = true: float8 training is not implemented yet; "
            "set it to false"
        )
    if cfg.profiling.enable_profiling and cfg.profiling.profile_freq > t.steps:
        raise ConfigError(
            f"profiling.profile_freq = {cfg.profiling.profile_freq} exceeds training.steps = "
            f"{t.steps}: no step would be profiled"
        )
