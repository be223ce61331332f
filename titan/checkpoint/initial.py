"""Initializing a model from another checkpoint (`checkpoint.initial_load_path`): a
`llama_to_dcp.py` output, another run's step directory or a model-only export.

    plan = plan_initial_load(path, args, allow)   # reads .metadata (and params.json) only
    load_initial(model, path, allow)              # the Checkpointer, when nothing is resumed

Strict unless told otherwise. The source must be a complete DCP directory (its `.complete`
marker). Its RoPE and norm settings, read from its `params.json` (written by
`llama_to_dcp.py`) or, for a training step, from its run's `config.toml`, must equal the
model's; every model tensor must be in the source with the same shape, and every source
tensor must have a place in the model. `checkpoint.initial_load_allow` lists what may
differ: fnmatch patterns of tensor names and names of settings. Its default allows the
embedding and output, which the lang-primate recipe starts without (Llama's 128256 tokens
against 256 spike tokens); allowed tensors the source lacks keep their fresh
initialization, with a warning that lists them. Every refusal is a `ConfigError` of one
line naming the tensors or settings and `checkpoint.initial_load_allow`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from titan.checkpoint import storage
from titan.checkpoint.errors import CheckpointError
from titan.checkpoint.resume import integrity_problem
from titan.config import ConfigError
from titan.files import listing
from titan.logging import logger
from titan.models import keymap
from titan.models.llama import FLAVORS, ModelArgs, build_model_args, param_shapes

KEY = "checkpoint.initial_load_path"
ALLOW_KEY = "checkpoint.initial_load_allow"
SETTINGS = (
    "rope_theta",
    "use_scaled_rope",
    "rope_scale_factor",
    "rope_original_context",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "norm_eps",
)
"""Architecture settings that change no shape, compared with the source's when it says."""
_SCALING = SETTINGS[2:6]  # only meaningful when both sides scale RoPE
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class InitialLoad:
    """What an initial load does."""

    load: list[str]
    """Model tensors read from the source."""
    fresh: list[str]
    """'name (why)' of model tensors that keep their fresh initialization (allowed)."""
    ignored: list[str]
    """'name (why)' of source tensors the model has no place for (allowed)."""
    settings: list[str] = dataclasses.field(default_factory=list)
    """'name = source value (this model: value)' of settings that differ (allowed)."""


def _error(value: str, what: str) -> ConfigError:
    return ConfigError(f"{KEY} = {value!r}: {what}")


def _how_to_make(value: str, args: ModelArgs) -> str:
    """How the missing source is made: a conversion, or the run whose step it is."""
    path = Path(value)
    if storage.STEP_DIR.match(path.name):
        have = [s.path.name for s in storage.list_steps(path.parent) if s.complete]
        held = f"{path.parent} holds {', '.join(have)}" if have else f"{path.parent} has no steps"
        return f"{held}: train its run that far first, or pass one of its complete steps"
    same = [n for n, f in FLAVORS.items() if (f.dim, f.n_layers) == (args.dim, args.n_layers)]
    flavor = same[0] if same else None
    return (
        f"make it with python llama_to_dcp.py --input_dir <Llama weights> --output_dir {value}"
        + (f" --flavor {flavor}" if flavor else "")
        + ", or point it at a complete step directory of a run (<dump_folder>/checkpoint/step-N)"
    )


def check_source(value: str, args: ModelArgs) -> Path:
    """The source directory `value` names, if it is a complete, intact DCP directory; else
    a refusal that says what it is instead."""
    path = Path(value)
    if not path.exists():
        raise _error(value, f"no such directory; {_how_to_make(value, args)}")
    if not path.is_dir():
        raise _error(value, f"a file, not a DCP checkpoint directory; {_how_to_make(value, args)}")
    if not (path / ".metadata").is_file():
        steps = storage.list_steps(path)
        if steps:
            complete = [s for s in steps if s.complete]
            if not complete:
                raise _error(value, "a folder of step directories, none of them complete")
            example = complete[-1].path
            raise _error(value, f"a folder of step directories: pass one, e.g. {example}")
        what = storage.foreign_weights(path)
        if what is None:
            raise _error(
                value, f"not a DCP checkpoint directory (no .metadata); {_how_to_make(value, args)}"
            )
        raise _error(
            value,
            f"{what}, not a DCP directory: convert it with python llama_to_dcp.py "
            f"--input_dir {value} --output_dir <new folder> and pass that folder",
        )
    if not (path / storage.MARKER).is_file():
        raise _error(
            value,
            f"incomplete (no {storage.MARKER} marker: its save or conversion did not finish); "
            "pass a complete step directory, or convert again",
        )
    problem = storage.verify(path)
    if problem is not None:
        raise _error(value, f"damaged: {problem}; pass another step, or convert again")
    return path


def source_args(value: str, path: Path) -> tuple[ModelArgs | None, str]:
    """(the source's architecture, where it was read): its params.json, else for a training
    step the run's config.toml; (None, "") when it has neither."""
    params = path / "params.json"
    if params.is_file():
        try:
            values = json.loads(params.read_text())
            # only the settings are compared from here (the vocabulary from tensor shapes)
            args = keymap.args_from_meta_params(values, vocab_size=256)
            return args, "its params.json"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise _error(value, f"cannot read its params.json ({type(e).__name__}: {e})") from None
    if storage.read_marker(path).get("kind", storage.FULL) in (storage.FULL, storage.MODEL_ONLY):
        from titan.convert.from_dcp import find_job_config  # local: titan.convert imports us

        job = find_job_config(path) or {}
        flavor = job.get("model", {}).get("flavor")
        if flavor in FLAVORS:
            t = job.get("training", {})
            args = build_model_args(flavor, t.get("vocab_size", 256), t.get("seq_len", 2048))
            return args, f"its run's config.toml (flavor {flavor})"
    return None, ""


def differing_settings(source: ModelArgs, args: ModelArgs) -> dict[str, str]:
    """Setting name -> 'name = source value (this model: value)' where they differ."""
    scaled = source.use_scaled_rope and args.use_scaled_rope
    names = [n for n in SETTINGS if scaled or n not in _SCALING]
    return {
        n: f"{n} = {getattr(source, n)!r} (this model: {getattr(args, n)!r})"
        for n in names
        if not math.isclose(getattr(source, n), getattr(args, n))
    }


def _outline(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Layers, widths and vocabulary read off the tensor shapes."""
    out = {"layers": len({m.group(1) for n in shapes if (m := _LAYER.match(n))})}
    for label, name in (
        ("dim", "norm.weight"),
        ("FFN width", "layers.0.feed_forward.w1.weight"),
        ("kv width", "layers.0.attention.wk.weight"),
        ("vocabulary", "tok_embeddings.weight"),
    ):
        if name in shapes:
            out[label] = shapes[name][0]
    return out


def plan_initial_load(value: str, args: ModelArgs, allow: list[str]) -> InitialLoad:
    """Check the source `value` (checkpoint.initial_load_path) against a model of `args`
    (nothing but metadata is read) and say which tensors load; refuse what `allow` does not
    cover."""
    path = check_source(value, args)

    def allowed(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in allow)

    source, origin = source_args(value, path)
    settings = differing_settings(source, args) if source is not None else {}
    refused = [n for n in settings if not allowed(n)]
    if refused:
        raise _error(
            value,
            f"{origin} has {', '.join(settings[n] for n in refused)}; start from a checkpoint "
            f"with this model's settings, or add {', '.join(refused)} to {ALLOW_KEY}",
        )
    stored = {
        key.removeprefix("model."): tuple(meta.size)
        for key, meta in storage.checkpoint_keys(path).items()
        if key.startswith("model.") and hasattr(meta, "size")
    }
    if not stored:
        raise _error(value, "no model tensors (keys model.*) in this checkpoint")
    ours = param_shapes(args)
    load, fresh, ignored, refused = [], [], [], []
    for name, shape in ours.items():
        theirs = stored.get(name)
        if theirs == shape:
            load.append(name)
            continue
        why = "absent" if theirs is None else f"shape {theirs} != {shape}"
        (fresh if allowed(name) else refused).append(f"{name} ({why})")
    for name in stored:
        if name not in ours:
            (ignored if allowed(name) else refused).append(f"{name} (not in this model)")
    if refused:
        theirs, mine = _outline(stored), _outline(ours)
        differ = [f"{k} {v} vs {mine[k]}" for k, v in theirs.items() if v != mine.get(k, v)]
        outline = f" (source vs this model: {', '.join(differ)})" if differ else ""
        raise _error(
            value,
            f"{len(refused)} tensors do not match this model: {listing(refused)}{outline}; "
            "start from a checkpoint of this model's architecture, or list the tensors that "
            f"may differ in {ALLOW_KEY} (patterns such as 'layers.5.*')",
        )
    if not load:
        raise _error(value, "not one of its tensors fits this model: is it the checkpoint meant?")
    return InitialLoad(load, fresh, ignored, list(settings.values()))


def load_initial(model: nn.Module, value: str, allow: list[str]) -> None:
    """Load the model tensors `plan_initial_load` allows into `model` (a Transformer, FSDP-
    wrapped or not), on every rank; the rest keep their initialization."""
    plan = plan_initial_load(value, model.args, allow)
    problem = integrity_problem(Path(value), "model.")  # checksums too, the ranks sharing
    if problem is not None:
        raise CheckpointError(
            f"checkpoint.initial_load_path = {value!r} is damaged: {problem}; convert or copy "
            "it again"
        )
    ours = get_model_state_dict(model)
    request = {name: ours[name] for name in plan.load}
    dcp.load({"model": request}, checkpoint_id=value)
    set_model_state_dict(model, request, options=StateDictOptions(strict=False))
    message = f"Initialized {len(plan.load)} of {len(ours)} model tensors from {value}"
    if not (plan.fresh or plan.ignored or plan.settings):
        logger.info(message)
    elif not dist.is_initialized() or dist.get_rank() == 0:  # one warning, not one per rank
        if plan.fresh:
            message += f"; kept fresh initialization for {len(plan.fresh)}: {', '.join(plan.fresh)}"
        if plan.ignored:
            message += f"; ignored {len(plan.ignored)} source tensors: {listing(plan.ignored)}"
        if plan.settings:
            message += f"; settings differ: {', '.join(plan.settings)}"
        logger.warning(f"{message} (allowed by {ALLOW_KEY})")
