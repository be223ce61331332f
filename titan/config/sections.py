"""The config schema: one dataclass per recipe section, each field with its type, default,
allowed values and a docstring (the string under it, which `--help` shows).

Allowed values live on the field: `typing.Literal[...]` for a fixed set of strings and
`Annotated[int, Rule(...)]` for ranges, checked whenever a value is set from a recipe or
the command line (`titan.config.loading`). A rule that uses a module (e.g. `math`) is a
module-level alias: `typing.get_type_hints` evaluates a class's annotations with the class
namespace as globals. Checks that relate several fields live in
`titan.config.loading.check_combinations`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Annotated, Any, Literal


@dataclass(frozen=True)
class Rule:
    """A range or shape a value must have; `allowed` completes "must be ..."."""

    ok: Callable[[Any], bool]
    allowed: str


PositiveInt = Annotated[int, Rule(lambda v: 0 < v < 2**53, "a positive integer (below 2**53)")]
Seconds = Annotated[
    int, Rule(lambda v: 0 < v <= 10**8, "a positive number of seconds, at most 10**8")
]
NonNegativeInt = Annotated[int, Rule(lambda v: v >= 0, ">= 0")]
PositiveFloat = Annotated[float, Rule(lambda v: 0 < v < math.inf, "a positive finite number")]
NonNegativeFloat = Annotated[float, Rule(lambda v: 0 <= v < math.inf, "a finite number >= 0")]
Fraction = Annotated[float, Rule(lambda v: 0 <= v <= 1, "in [0, 1]")]
BelowOne = Annotated[float, Rule(lambda v: 0 <= v < 1, "in [0, 1)")]
ClipNorm = Annotated[float, Rule(lambda v: not math.isnan(v), "a number, not NaN")]
JsonPath = Annotated[str, Rule(lambda v: PurePath(v).suffix == ".json", "a path ending in .json")]
Dtype = Literal["float32", "bfloat16"]

AttnImpl = Literal["auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "flash4", "flash3", "flash2"]
ACMode = Literal["none", "selective", "full", "auto"]
StateName = Literal["model", "optimizer", "lr_scheduler", "dataloader", "train_state"]

GPUS: dict[str, float] = {
    "h100-80gb": 79.2,
    "h100-94gb": 93.1,
    "gh200-96gb": 95.0,
    "h200-141gb": 139.7,
    "gh200-144gb": 139.7,
    "a100-80gb": 79.2,
    "b200-180gb": 178.4,
}
"""Usable device memory in GiB (what torch reports as total_memory) of the GPUs
`job.plan_for` knows by name; any "<N>gib" also works."""


def gpu_gib(name: str) -> float | None:
    """GiB of a GPU named as in `job.plan_for` (a GPUS key or e.g. "75gib"), else None."""
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key]
    number = key.removesuffix("gib")
    if number != key and number.replace(".", "", 1).isdigit() and float(number) > 0:
        return float(number)
    return None


GpuList = Annotated[
    list[str],
    Rule(
        lambda v: all(gpu_gib(n) for n in v) and len({n.strip().lower() for n in v}) == len(v),
        f"distinct GPU names ({', '.join(GPUS)}) or sizes like 80gib",
    ),
]


@dataclass
class Job:
    config_file: str | None = None
    """TOML recipe to load (command-line values override it)."""
    dump_folder: Annotated[str, Rule(lambda v: v.strip() != "", "a folder path")] = "./outputs"
    """Folder for everything the run writes: checkpoints, metrics, config, traces."""
    description: str = ""
    """Free text describing the run (logged and saved with the config)."""
    dry_run: bool = False
    """Resolve the config, model, mesh and batch plan, print them and exit without training."""
    plan_for: GpuList = field(default_factory=list)
    """GPUs the dry run prints a memory plan for, e.g. h100-80gb,gh200-96gb,h200-141gb."""
    init_timeout_s: Seconds = 1800
    """Seconds a collective may take during set-up, the first step and checkpoint saves."""
    collective_timeout_s: Seconds = 600
    """Seconds a collective may take once training runs; past it the run ends with exit
    status 5 (a rank is stuck or gone) instead of waiting for init_timeout_s."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Record torch.profiler traces."""
    save_traces_folder: str = "profile_traces"
    """Trace folder, under the dump folder."""
    profile_freq: PositiveInt = 10
    """Record one profiled step every this many steps."""


@dataclass
class Metrics:
    log_freq: PositiveInt = 10
    """Log metrics every this many steps."""
    enable_tensorboard: bool = False
    """Also write TensorBoard scalars."""
    save_tb_folder: str = "tb"
    """TensorBoard folder, under the dump folder."""


@dataclass
class Model:
    name: Literal["llama3"] = "llama3"
    """Model family; only 'llama3' exists."""
    flavor: str = "debugmodel"
    """Model size: debugmodel, 1B, 8B or 70B."""
    norm_type: Literal["rmsnorm"] = "rmsnorm"
    """Normalization layer; only 'rmsnorm' (Llama's) is implemented."""
    attn_impl: AttnImpl = "auto"
    """Attention kernel: auto (the fastest measured on the GPU at start-up; SDPA on CPU), sdpa,
    sdpa_cudnn, sdpa_flash, flash4, flash3 or flash2."""


@dataclass
class Optimizer:
    name: Literal["AdamW"] = "AdamW"
    """Optimizer; only AdamW is implemented."""
    lr: PositiveFloat = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    beta1: BelowOne = 0.9
    """AdamW beta1."""
    beta2: BelowOne = 0.95
    """AdamW beta2."""
    eps: PositiveFloat = 1e-8
    """AdamW epsilon."""
    weight_decay: NonNegativeFloat = 0.1
    """Decoupled weight decay on matrices (not on norms)."""
    fused: bool = True
    """Use the fused AdamW kernel when the device supports it."""


@dataclass
class LRScheduler:
    decay_type: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warmup: cosine, linear or constant."""
    min_lr_ratio: Fraction = 0.1
    """Floor of the decay as a fraction of the peak learning rate."""


@dataclass
class Training:
    batch_size: PositiveInt = 8
    """Sequences per micro-batch on each data-parallel rank."""
    global_batch_size: Annotated[
        int, Rule(lambda v: v == -1 or v > 0, "-1 (batch_size x DP degree) or a positive integer")
    ] = -1
    """Sequences per optimizer step over all ranks; -1 = batch_size x DP degree (no accumulation)"""
    seq_len: PositiveInt = 2048
    """Tokens per sequence (the model's context length)."""
    vocab_size: Annotated[
        int, Rule(lambda v: v >= 256, ">= 256 (spike data has tokens up to 255, the separator)")
    ] = 256
    """Vocabulary size; 256 for spike-count tokens."""
    warmup_steps: NonNegativeInt = 200
    """Linear learning-rate warmup steps."""
    max_norm: ClipNorm = 1.0
    """Clip the global gradient norm to this value (<= 0 disables clipping)."""
    steps: PositiveInt = 10000
    """Total optimizer steps."""
    data_parallel_replicate_degree: PositiveInt = 1
    """HSDP replicas (the outer mesh dimension)."""
    data_parallel_shard_degree: Annotated[
        int, Rule(lambda v: v == -1 or v > 0, "-1 (the remaining ranks) or a positive integer")
    ] = -1
    """FSDP shard group size; -1 = the ranks left after the other degrees."""
    tensor_parallel_degree: int = 1
    """Tensor parallelism; only 1 is implemented."""
    compile: bool = False
    """torch.compile each transformer block."""
    dataset: str = "synthetic"
    """Dataset: primate, rodent, synthetic, or a name used with dataset_path."""
    dataset_path: str | None = None
    """Local directory, parquet/arrow files or Hub id to read instead of the named dataset."""
    seed: Annotated[int, Rule(lambda v: 0 <= v < 2**63, "in 0 .. 2**63 - 1")] = 0
    """Seed for initialization, data order and dropout-free randomness."""
    deterministic: bool = False
    """Ask PyTorch for deterministic kernels (slower)."""
    mixed_precision_param: Dtype = "bfloat16"
    """Compute dtype of FSDP-gathered parameters: bfloat16 or float32 (CPU runs use float32)."""
    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"
    """Dtype of gradient reduction: float32 or bfloat16."""
    max_consecutive_bad_steps: PositiveInt = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class Data:
    split: Literal["train", "test"] = "train"
    """Dataset split to train on: train or test."""
    source_datasets: list[str] = field(default_factory=list)
    """Keep only rows whose source_dataset is in this list (empty = all)."""
    streaming: bool = False
    """Stream rows (IterableDataset) instead of using the cached map-style dataset."""
    shuffle: bool = True
    """Reshuffle rows (map-style) or shards (streaming) each epoch, seeded by training.seed."""
    prefetch: PositiveInt = 4
    """Batches prepared ahead by the background loader thread."""
    synthetic_rows: PositiveInt = 64
    """Train rows of the synthetic dataset generated on first use (test: a tenth, at least 4)."""
    stream_shards: PositiveInt = 256
    """Shards of a local dataset when streaming (a resume re-reads at most one); >= DP ranks."""
    generate_synthetic: bool = False
    """With training.dataset = synthetic, generate the dataset into training.dataset_path when
    it does not exist (without it, a missing dataset_path is an error)."""


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
    folder: Annotated[str, Rule(lambda v: v.strip() != "", "a folder path")] = "checkpoint"
    """Checkpoint folder, under the dump folder."""
    interval_type: Literal["steps", "seconds"] = "steps"
    """Unit of the save interval: steps or seconds."""
    interval: PositiveInt = 500
    """Save every this many steps (or seconds)."""
    model_weights_only: bool = False
    """Make the last save a model-only export in export_dtype instead of the full state."""
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the model-only export: float32, bfloat16 or float16."""
    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = "disabled"
    """disabled, async or async_with_pinned_mem (training continues while a save is written)."""
    keep_latest_k: NonNegativeInt = 3
    """Keep this many newest complete step directories (0 = keep all)."""
    load_step: Annotated[int, Rule(lambda v: v >= -1, "-1 (the newest) or a step >= 0")] = -1
    """Step to resume from; -1 = the newest complete one."""
    initial_load_path: str | None = None
    """DCP directory to initialize model weights from when the run has no checkpoint yet."""
    initial_load_allow: list[str] = field(
        default_factory=lambda: ["tok_embeddings.weight", "output.weight"]
    )
    """What may differ from initial_load_path: tensor name patterns (fnmatch, e.g. layers.5.*)
    that may be absent or of another shape (kept freshly initialized), and settings (rope_theta,
    use_scaled_rope, rope_scale_factor, rope_original_context, rope_low_freq_factor,
    rope_high_freq_factor, norm_eps)."""
    exclude_from_loading: list[StateName] = field(default_factory=list)
    """States not to restore on resume: model, optimizer, lr_scheduler, dataloader, train_state."""
    fallback_on_corruption: bool = False
    """If the newest checkpoint is corrupted, move it into damaged/ and load the previous one."""
    save_on_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2"]] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"]
    )
    """Signals that make the run finish its step, save a complete checkpoint and exit with
    status 75 (e.g. Slurm's warning signal before the time limit); empty = none."""


@dataclass
class ActivationCheckpoint:
    mode: ACMode = "selective"
    """none, selective, full, or auto (per block, the fastest policy that fits the memory)."""
    selective_ac_option: Annotated[
        str,
        Rule(
            lambda v: v in ("op", "attn") or (v.isascii() and v.isdigit() and int(v) > 0),
            "'attn', 'op' or a positive integer N (checkpoint every N-th block)",
        ),
    ] = "2"
    """For selective: 'attn' (keep attention outputs, recompute the rest), 'op' (keep matmul
    and attention outputs) or N (recompute every N-th block)."""
    memory_headroom: BelowOne = 0.1
    """Share of device memory the auto plan leaves free (CUDA context, NCCL, fragmentation)."""
    memory_limit_gib: NonNegativeFloat = 0.0
    """Plan for at most this much memory per rank (0 = all of the device's; a larger value
    than the device has is capped at the device's)."""


EvalAmount = Annotated[int, Rule(lambda v: v == -1 or v > 0, "-1 (no limit) or a positive integer")]


@dataclass
class Validation:
    enable: bool = False
    """Evaluate on held-out data during training (all ranks, every `freq` steps)."""
    freq: PositiveInt = 500
    """Validate every this many steps."""
    steps: EvalAmount = 10
    """Batches per rank each validation reads (-1: the whole split)."""
    max_tokens: EvalAmount = -1
    """Label tokens each validation reads over all ranks, rounded down to whole windows of
    seq_len, at least one (-1: no limit beyond steps)."""
    split: Literal["train", "test"] = "test"
    """Held-out split to validate on (must differ from data.split)."""


@dataclass
class Eval:
    checkpoint: str | None = None
    """DCP step or model-only export to evaluate (default: the run's newest complete step,
    or checkpoint.load_step)."""
    split: Literal["train", "test"] = "test"
    """Split to evaluate on."""
    steps: EvalAmount = -1
    """Batches per rank (-1: the whole split once)."""
    max_tokens: EvalAmount = -1
    """Label tokens over all ranks, rounded down to whole windows of seq_len, at least one
    (-1: no limit)."""
    batch_size: Annotated[
        int, Rule(lambda v: v == -1 or v > 0, "-1 (training.batch_size) or a positive integer")
    ] = -1
    """Windows per batch on each rank (-1: training.batch_size)."""
    output: JsonPath | None = None
    """Results JSON (default: beside the checkpoint, <step directory>.eval-<split>.json)."""


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
    validation: Validation = field(default_factory=Validation)
    eval: Eval = field(default_factory=Eval)
    float8: Float8 = field(default_factory=Float8)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# Settings gpt-neuro recipes carry that titan accepts (so those files load unchanged) but
# does not implement: any value other than the one given here is refused with the fix.
_USE_FSDP = (
    "only 1 is implemented in titan; use FSDP/HSDP (training.data_parallel_shard_degree / "
    "data_parallel_replicate_degree) instead"
)
UNIMPLEMENTED: dict[str, tuple[Any, str]] = {
    "training.tensor_parallel_degree": (1, _USE_FSDP),
    "experimental.pipeline_parallel_degree": (1, _USE_FSDP),
    "experimental.context_parallel_degree": (1, _USE_FSDP),
    "float8.enable_float8_linear": (
        False,
        "float8 training is not implemented yet; set it to false",
    ),
}
