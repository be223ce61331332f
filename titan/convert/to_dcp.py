"""Llama weights (Meta or Hugging Face layout) -> a DCP directory that training loads with
`--checkpoint.initial_load_path`.

The directory is written by one `dcp.save` whose planner produces each tensor only when
the writer asks for it (`resolve_data`), one file per tensor, so memory stays bounded by a
few tensors whatever the model size.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from titan.checkpoint import storage
from titan.convert.common import (
    DTYPES,
    ConvertError,
    Log,
    Progress,
    describe,
    first_line,
    nbytes,
    print_line,
    quiet_dcp,
    summary,
    unwrapped,
    write_error,
)
from titan.convert.output import prepare_output
from titan.convert.sources import HFSource, MetaSource, detect_layout
from titan.files import written_atomically
from titan.models import keymap
from titan.models.llama import FLAVORS, ModelArgs, param_shapes


def _arch(args: ModelArgs) -> tuple[int, ...]:
    return (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_hidden_dim)


def check_flavor(args: ModelArgs, flavor: str) -> None:
    """Refuse (ConvertError) when the weights' architecture is not the flavor's."""
    target = FLAVORS[flavor]
    if _arch(args) == _arch(target):
        return
    match = [name for name, a in FLAVORS.items() if _arch(a) == _arch(args)]
    hint = f"use --flavor {match[0]}" if match else "leave out --flavor"
    a, t = args, target
    raise ConvertError(
        f"architecture mismatch: the weights have dim {a.dim}, {a.n_layers} layers, "
        f"{a.n_heads} heads ({a.n_kv_heads} kv), ffn {a.ffn_hidden_dim} but flavor {flavor} has "
        f"dim {t.dim}, {t.n_layers} layers, {t.n_heads} heads ({t.n_kv_heads} kv), "
        f"ffn {t.ffn_hidden_dim}; {hint}"
    )


class _StreamingSavePlanner(DefaultSavePlanner):
    """Plans from meta tensors; each real tensor is produced only when the writer asks."""

    def __init__(self, produce: Callable[[str], torch.Tensor]) -> None:
        super().__init__()
        self._produce = produce

    def resolve_data(self, write_item: Any) -> torch.Tensor:
        return self._produce(write_item.index.fqn)


def llama_to_dcp(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    source_format: str = "auto",
    flavor: str | None = None,
    vocab_size: int = 256,
    keep_embeddings: bool = False,
    dtype: str = "auto",
    overwrite: bool = False,
    log: Log = print_line,
) -> dict[str, Any]:
    """Convert Llama weights (Meta or HF layout) into a DCP directory with the model under
    the key "model"; returns the summary numbers."""
    start = time.monotonic()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    layout, folder = detect_layout(input_dir, source_format)
    source = MetaSource(folder) if layout == "meta" else HFSource(folder)
    args = source.args
    log(f"llama_to_dcp: {layout} checkpoint in {folder}: {describe(args)}")
    if flavor is not None:
        check_flavor(args, flavor)
        rope = ("rope_theta", "use_scaled_rope", "rope_scale_factor", "rope_original_context")
        if any(getattr(args, f) != getattr(FLAVORS[flavor], f) for f in rope):
            log(f"  note: the source's RoPE settings differ from flavor {flavor}'s")

    names = list(param_shapes(args))
    out_args = args
    if args.vocab_size != vocab_size and not keep_embeddings:
        names = [n for n in names if n not in ("tok_embeddings.weight", "output.weight")]
        out_args = dataclasses.replace(args, vocab_size=vocab_size)
        log(
            f"  dropping tok_embeddings.weight and output.weight: source vocabulary "
            f"{args.vocab_size} != target {vocab_size} (--keep_embeddings keeps them)"
        )
    out_dtype = None if dtype == "auto" else DTYPES[dtype]
    dtypes = {n: out_dtype or source.dtypes[n] for n in names}
    total_bytes = sum(nbytes(source.shapes[n], dtypes[n]) for n in names)
    prepare_output(output_dir, overwrite, [input_dir, folder])

    progress = Progress(len(names), total_bytes, log)

    def produce(fqn: str) -> torch.Tensor:
        name = fqn.removeprefix("model.")
        tensor = source.load(name).to(dtypes[name])
        assert tuple(tensor.shape) == source.shapes[name], name
        progress.update(name, tensor.nbytes)
        return tensor

    plan = {
        "model": {n: torch.empty(source.shapes[n], dtype=dtypes[n], device="meta") for n in names}
    }
    writer = FileSystemWriter(str(output_dir), single_file_per_rank=False)
    try:
        with quiet_dcp():
            dcp.save(
                plan, storage_writer=writer, planner=_StreamingSavePlanner(produce), no_dist=True
            )
    except CheckpointException as e:  # wraps errors producing tensors and writing them
        if isinstance(unwrapped(e), ConvertError):
            raise ConvertError(first_line(e)) from None
        raise write_error(output_dir, e) from None
    finally:
        source.close()
    params = keymap.meta_params_from_args(out_args) | {"max_seq_len": out_args.max_seq_len}
    with written_atomically(output_dir / "params.json", durable=True) as tmp:
        tmp.write_text(json.dumps(params, indent=2) + "\n")  # on disk before the marker
    # the last file written: the directory counts as a conversion only from here on
    files = sorted(p.name for p in output_dir.glob("*.distcp"))
    storage.complete(
        output_dir,
        {"kind": storage.CONVERTED, "source": str(folder), "layout": layout},
        storage.checksums(output_dir, files),
    )
    return summary("llama_to_dcp", names, source.shapes, dtypes, start, output_dir, log)
