"""The model of a DCP directory -> Meta and/or Hugging Face layout (and the Hub).

Reads only the `model.*` tensors of a step directory (never the optimizer), in groups of
at most `GROUP_BYTES`; HF safetensors shards are streamed tensor by tensor, and Meta's
`consolidated.00.pth` is laid out first and then filled through a memory map. The
architecture comes from --flavor, the directory's params.json (a converted directory) or
the config.toml its training run saved.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titan.checkpoint import MARKER, read_marker, storage
from titan.checkpoint.initial import differing_settings
from titan.checkpoint.resume import integrity_problem
from titan.convert import common
from titan.convert.common import (
    DTYPES,
    ST_NAMES,
    ConvertError,
    Log,
    Progress,
    byte_groups,
    config_error,
    describe,
    first_line,
    nbytes,
    print_line,
    quiet_dcp,
    read_json,
    summary,
)
from titan.convert.hub import create_hub_repo, model_card, upload_to_hub
from titan.convert.output import check_output, make_output, partial_until_done
from titan.convert.writers import MetaCheckpointWriter, SafetensorsShardWriter
from titan.files import listing
from titan.models import keymap
from titan.models.llama import FLAVORS, ModelArgs, build_model_args, param_shapes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

Stored = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype)


def read_dcp_model_metadata(folder: Path) -> Stored:
    """name -> (shape, dtype) of the `model.*` tensors of a DCP directory (reads only
    `.metadata`)."""
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
        entries = metadata.state_dict_metadata
    except Exception as e:  # pickle, OS and attribute errors of a damaged file
        raise ConvertError(f"{folder}: unreadable DCP metadata ({first_line(e)})") from None
    return {
        key.removeprefix("model."): (tuple(md.size), md.properties.dtype)
        for key, md in entries.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }


def read_dcp_model_groups(
    folder: Path, names: list[str], stored: Stored, budget: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """The `model.<name>` tensors of a DCP directory, in groups of at most `budget` bytes
    (default GROUP_BYTES; a larger tensor comes alone); only these items are requested
    from the reader."""
    size = {n: nbytes(*stored[n]) for n in names}
    for group in byte_groups(names, size.__getitem__, budget or common.GROUP_BYTES):
        request = {"model": {n: torch.empty(stored[n][0], dtype=stored[n][1]) for n in group}}
        try:
            with quiet_dcp():
                dcp.load(request, storage_reader=FileSystemReader(str(folder)), no_dist=True)
        except (Exception, CheckpointException) as e:  # DCP wraps the reader's errors
            raise ConvertError(f"{folder}: cannot read {group[0]}: {first_line(e)}") from None
        yield request.pop("model")


def find_job_config(step_dir: Path) -> dict | None:
    """The trainer's resolved `config.toml` (saved in the dump folder), if any."""
    found = locate_job_config(step_dir)
    return found[0] if found else None


def locate_job_config(step_dir: Path) -> tuple[dict, Path] | None:
    """(config, its path): the nearest `config.toml` with a [model] table in `step_dir` or
    up to 3 folders above it, where the trainer saves its resolved config; None if none."""
    for folder in [step_dir, *list(step_dir.resolve().parents)[:3]]:
        path = folder / "config.toml"
        if path.is_file():
            try:
                config = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError):
                continue
            if isinstance(config.get("model"), dict):
                return config, path
    return None


def _dcp_step(step_dir: Path) -> int | None:
    step = read_marker(step_dir).get("step")
    if step is None and (m := re.fullmatch(r"step-(\d+)", step_dir.name)):
        step = int(m.group(1))
    return step


def dcp_model_args(
    folder: Path,
    stored: Stored,
    flavor: str | None,
    max_seq_len: int | None,
    job: dict | None,
    job_path: Path | None = None,
) -> tuple[ModelArgs, str]:
    """(architecture of a DCP directory, where it comes from): its params.json (converted
    directories), else --flavor, else the run's config.toml (`job`, read from `job_path`);
    checked against the stored shapes. A --flavor that disagrees with params.json is
    refused."""
    config = str(job_path) if job_path is not None else "the run's config.toml"
    job_flavor = (job or {}).get("model", {}).get("flavor")
    embedding = stored.get("tok_embeddings.weight", stored.get("output.weight"))
    # Without embeddings (dropped on conversion) the vocabulary does not matter: the other
    # shapes are checked, then the missing tensors refused.
    vocab = embedding[0][0] if embedding is not None else 256
    job_seq = (job or {}).get("training", {}).get("seq_len")
    seq = max_seq_len if max_seq_len is not None else job_seq or 131072
    if (folder / "params.json").is_file():
        params = read_json(folder / "params.json")
        try:
            args = keymap.args_from_meta_params(params, vocab_size=vocab)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise config_error(folder / "params.json", e) from None
        if max_seq_len is not None:
            args = dataclasses.replace(args, max_seq_len=max_seq_len)
        origin = "params.json"
        named = build_model_args(flavor, vocab, seq) if flavor is not None else args
        if param_shapes(named) != param_shapes(args) or differing_settings(named, args):
            raise ConvertError(
                f"--flavor {flavor} disagrees with {origin} ({describe(args)}); drop "
                f"--flavor: {origin} says what the checkpoint holds"
            )
    elif job is not None and job_flavor in FLAVORS:
        args = build_model_args(job_flavor, vocab, seq)
        origin = f"{config} (flavor {job_flavor})"
    elif flavor is not None:
        args, origin = build_model_args(flavor, vocab, seq), f"--flavor {flavor}"
    else:
        found = (
            f"{config} names no flavor titan knows ({job_flavor!r})"
            if job is not None
            else "no params.json here and no config.toml of the run above it"
        )
        raise ConvertError(
            f"{folder}: cannot tell the model architecture ({found}); pass --flavor "
            f"({', '.join(FLAVORS)})"
        )
    expected = param_shapes(args)
    for name, (shape, _) in stored.items():
        if name not in expected:
            raise ConvertError(f"{folder}: unexpected model tensor {name} for {describe(args)}")
        if shape != expected[name]:
            raise ConvertError(
                f"{folder}: {name} has shape {shape} but {origin} implies {expected[name]} "
                f"({describe(args)})"
            )
    missing = [n for n in expected if n not in stored]
    if missing:
        raise ConvertError(
            f"{folder}: the checkpoint lacks model tensors {listing(missing)}"
            " (a directory converted with the embeddings dropped cannot be exported)"
        )
    return keymap.above_rope_original_context(args), origin


def step_architecture(
    folder: Path, stored: Stored, flavor: str | None, max_seq_len: int | None, log: Log
) -> tuple[ModelArgs, str, dict | None]:
    """(architecture, where it comes from, the run's config when it describes `folder`):
    `dcp_model_args` with the config.toml found above the step, which is None when there
    is none or an explicit --flavor that names another flavor overrode it (the step may
    sit below an unrelated run; then its seq_len and recipe are not used, and `log` says
    so)."""
    job, job_path = locate_job_config(folder) or (None, None)
    job_flavor = (job or {}).get("model", {}).get("flavor")
    if job is not None and flavor is not None and job_flavor != flavor:
        theirs = f" (flavor {job_flavor})" if job_flavor is not None else ""
        log(f"  note: --flavor {flavor} wins over {job_path}{theirs}; its settings are not used")
        job = None
    args, origin = dcp_model_args(folder, stored, flavor, max_seq_len, job, job_path)
    return args, origin, job


def _check_input(input_dir: Path, allow_incomplete: bool) -> None:
    """The input's kind and its small files (marker, `.metadata`); the data files are
    checked by `_check_data` once the architecture is known, so that a missing `--flavor`
    is named before tens of GB are read."""
    or_else = " (or pass --allow_incomplete)"
    foreign = (
        "already, not a DCP step directory (.../step-N), which is what dcp_to_llama.py exports"
    )
    if problem := storage.step_problem(
        input_dir, allow_incomplete, or_else=or_else, foreign=foreign
    ):
        raise ConvertError(f"--input_dir {input_dir}: {problem}")


def _check_data(input_dir: Path) -> None:
    """The model's data files: checksums where the marker has them, else (an incomplete
    step) at least every shard whole."""
    if (input_dir / MARKER).is_file():
        problem = integrity_problem(input_dir, "model.")
    else:  # no checksums to compare
        problem = storage.verify(input_dir, "model.")
    if problem is not None:
        raise ConvertError(f"{input_dir} is damaged: {problem}; use another step")


def dcp_to_llama(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    fmt: str = "hf",
    dtype: str = "auto",
    flavor: str | None = None,
    max_seq_len: int | None = None,
    max_shard_size: int = 5 * 10**9,
    hf_repo_name: str | None = None,
    push_to_hub: bool = False,
    private: bool = False,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    log: Log = print_line,
) -> dict[str, Any]:
    """Export the model of a DCP directory to Meta and/or HF layout (HF at the top of
    `output_dir`; with fmt='both', Meta's files under `original/` as on the Hub)."""
    start = time.monotonic()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    push = push_to_hub
    if push and not hf_repo_name:
        raise ConvertError("--push_to_hub needs --hf_repo_name USER/NAME")
    if private and not push:
        raise ConvertError("--private sets up the Hub repo of --push_to_hub: add --push_to_hub")
    if push and fmt == "meta":
        raise ConvertError("--push_to_hub uploads the Hugging Face layout: use --format hf or both")
    check_output(output_dir, overwrite, [input_dir])  # cheap: before the input is hashed
    _check_input(input_dir, allow_incomplete)
    stored = read_dcp_model_metadata(input_dir)
    if not stored:
        raise ConvertError(f"{input_dir}: no model tensors (keys model.*) in this checkpoint")
    args, origin, job = step_architecture(input_dir, stored, flavor, max_seq_len, log)
    if max_seq_len is not None and args.max_seq_len != max_seq_len and fmt != "meta":
        log(
            f"  note: config.json's max_position_embeddings is {args.max_seq_len}, not "
            f"--max_seq_len {max_seq_len}: transformers wants it above scaled RoPE's original "
            f"context ({args.rope_original_context})"
        )
    _check_data(input_dir)
    names = list(param_shapes(args))
    shapes = {n: stored[n][0] for n in names}
    out_dtype = None if dtype == "auto" else DTYPES[dtype]
    dtypes = {n: out_dtype or stored[n][1] for n in names}
    if any(d not in ST_NAMES for d in dtypes.values()):
        raise ConvertError(f"{input_dir}: stored dtypes {set(dtypes.values())}; pass --dtype")
    main_dtype = str(dtypes["layers.0.attention.wq.weight"]).removeprefix("torch.")
    log(f"dcp_to_llama: {input_dir}: {describe(args)} (from {origin}), {main_dtype}, {fmt}")
    # Before anything is written: a failed token or repo check leaves no output folder.
    hub = create_hub_repo(hf_repo_name, private) if push and hf_repo_name else None
    make_output(output_dir, overwrite)

    with partial_until_done(output_dir):
        hf_writer = meta_writer = None
        if fmt in ("hf", "both"):
            entries = [(keymap.to_hf_key(n), shapes[n], dtypes[n]) for n in names]
            hf_writer = SafetensorsShardWriter(output_dir, entries, max_shard_size)
        meta_dir = output_dir / "original" if fmt == "both" else output_dir
        if fmt in ("meta", "both"):
            meta_dir.mkdir(exist_ok=True)
            entries = [(n, shapes[n], dtypes[n]) for n in names]
            meta_writer = MetaCheckpointWriter(meta_dir / "consolidated.00.pth", entries)

        progress = Progress(len(names), sum(nbytes(shapes[n], dtypes[n]) for n in names), log)

        def emit(name: str, tensor: torch.Tensor) -> None:
            tensor = tensor.to(dtypes[name])
            if hf_writer is not None:
                hf_writer.write(*keymap.to_hf_tensor(name, tensor, args))
            if meta_writer is not None:
                meta_writer.write(name, tensor)
            progress.update(name, tensor.nbytes)

        try:
            for group in read_dcp_model_groups(input_dir, names, stored):
                for name in list(group):
                    emit(name, group.pop(name))  # popped: freed as soon as it is written
        finally:
            for writer in (hf_writer, meta_writer):
                if writer is not None:
                    writer.close()

        if meta_writer is not None:
            params = keymap.meta_params_from_args(args)
            (meta_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        if hf_writer is not None:
            hf_writer.write_index()
            config = keymap.hf_config_from_args(args, main_dtype)
            if seq_len := (job or {}).get("training", {}).get("seq_len"):
                config[keymap.TRAINED_SEQ_LEN_KEY] = seq_len
            (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            title = hf_repo_name or output_dir.resolve().name
            card = model_card(args, title, _dcp_step(input_dir), job, input_dir, main_dtype)
            (output_dir / "README.md").write_text(card)
    result = summary("dcp_to_llama", names, shapes, dtypes, start, output_dir, log)
    if hub is not None:
        api, result["repo_id"] = hub
        upload_to_hub(api, output_dir, result["repo_id"], log)
        log(f"dcp_to_llama: pushed to https://huggingface.co/{result['repo_id']}")
    return result
