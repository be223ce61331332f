"""Checkpoint conversion between Llama weights and titan's DCP checkpoints.

Two directions, each a thin CLI at the repository root (DESIGN §3 has the layouts):

    python llama_to_dcp.py --input_dir Llama-3.1-8B --output_dir llama8b_dcp
    python dcp_to_llama.py --input_dir outputs/checkpoint/step-1000 --output_dir export \
        --format hf --dtype bfloat16 [--hf_repo_name USER/NAME --push_to_hub]

Memory stays bounded by a few tensors, whatever the model size:
- Meta sources (`consolidated.NN.pth`) are memory-mapped (`torch.load(mmap=True)`) and
  model-parallel shards are merged one tensor at a time; HF sources are read with
  `safetensors.safe_open`, one tensor at a time.
- The DCP directory is written by one `dcp.save` whose planner produces each tensor only
  when the writer asks for it (`resolve_data`), one file per tensor.
- Export reads the `model.*` tensors of a step directory (never the optimizer) in
  groups of at most `GROUP_BYTES`; HF safetensors shards are streamed tensor by tensor,
  and Meta's `consolidated.00.pth` is laid out first (`torch.serialization.skip_data`)
  and then filled through a shared memory map, a group at a time.

Every user error raises `ConvertError`, which the CLIs print as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import mmap
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titan.checkpoint import MARKER, read_marker
from titan.models import keymap
from titan.models.llama import FLAVORS, ModelArgs, build_model_args, param_shapes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

GROUP_BYTES = 256 << 20  # tensors read from DCP per group on export
MAP_BYTES = 256 << 20  # bytes touched through one memory map before it is remapped
CHUNK_BYTES = 64 << 20  # large tensors are copied through memory maps in row chunks
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# Files these tools write; --overwrite removes only these.
_OUTPUT_FILES = re.compile(
    r"^(\.metadata|\.complete|.*\.distcp|params\.json|config\.json|README\.md|"
    r"model.*\.safetensors|model\.safetensors\.index\.json|consolidated\.\d+\.pth)$"
)


class ConvertError(Exception):
    """A bad input or a refused operation; the message is one line."""


Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- shapes


def _describe(args: ModelArgs) -> str:
    return (
        f"dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads ({args.n_kv_heads} kv), "
        f"ffn {args.ffn_hidden_dim}, vocab {args.vocab_size}"
    )


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


def _gb(nbytes: int) -> str:
    if nbytes >= 10**9:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.2f} MB"


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _first_line(e: BaseException) -> str:
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (error, tb)}
    if isinstance(e, CheckpointException) and failures:
        inner = next(iter(failures.values()))
        return _first_line(inner[0] if isinstance(inner, tuple) else inner)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class Progress:
    """Throttled progress lines: at most one every `every` seconds, plus the last one."""

    def __init__(self, total: int, total_bytes: int, log: Log, every: float = 2.0) -> None:
        self.total, self.total_bytes, self.log, self.every = total, total_bytes, log, every
        self.count = self.bytes = 0
        self.start = self.last = time.monotonic()

    def update(self, name: str, nbytes: int) -> None:
        self.count += 1
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.every or self.count == self.total:
            self.last = now
            self.log(
                f"  [{self.count}/{self.total}] {_gb(self.bytes)} of {_gb(self.total_bytes)}, "
                f"{now - self.start:.1f} s  {name}"
            )


# ----------------------------------------------------------------------------- sources


class MetaSource:
    """Meta's layout: `params.json` + `consolidated.NN.pth` model-parallel shards, read
    through memory maps; shards are merged tensor by tensor (the split dimension is found
    from the shapes: wq/wk/wv/w1/w3/output/embedding on dim 0, wo/w2 on dim 1, norms
    replicated; Llama-2-style embeddings split on dim 1 also work)."""

    layout = "meta"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        params = _read_json(folder / "params.json")
        self.files = sorted(folder.glob("consolidated.*.pth"))
        if not self.files:
            raise ConvertError(f"{folder}: no consolidated.*.pth files next to params.json")
        self._maps: list[dict[str, torch.Tensor]] | None = None
        self._mapped_bytes = 0
        shards = self._open()
        keys = [k for k in shards[0] if k != "rope.freqs"]  # Llama 2 also saved its RoPE table
        for f, sd in zip(self.files[1:], shards[1:], strict=True):
            if set(k for k in sd if k != "rope.freqs") != set(keys):
                raise ConvertError(f"{f} does not hold the same tensors as {self.files[0]}")
        vocab = params.get("vocab_size", -1)
        if (vocab is None or vocab <= 0) and "tok_embeddings.weight" in shards[0]:
            # Llama 2's params.json says -1: count the embedding rows (split on dim 0 or 1)
            emb = [tuple(sd["tok_embeddings.weight"].shape) for sd in shards]
            vocab = sum(s[0] for s in emb) if emb[0][1] == params.get("dim") else emb[0][0]
        try:
            self.args = keymap.args_from_meta_params(params, vocab_size=vocab)
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"{folder / 'params.json'}: {_first_line(e)}") from None
        expected = param_shapes(self.args)
        _check_names(keys, expected, folder)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._cat_dim: dict[str, int | None] = {}
        for name in keys:
            self.shapes[name] = expected[name]
            self._cat_dim[name] = self._split_dim(name, shards, expected[name])
            self.dtypes[name] = shards[0][name].dtype
        self.close()

    def _open(self) -> list[dict[str, torch.Tensor]]:
        if self._maps is None or self._mapped_bytes >= MAP_BYTES:
            self._maps = None  # drop the old maps (and their resident pages) first
            self._maps = [_load_pth(f) for f in self.files]
            self._mapped_bytes = 0
        return self._maps

    def close(self) -> None:
        self._maps = None

    def _split_dim(
        self, name: str, shards: list[dict[str, torch.Tensor]], full: tuple[int, ...]
    ) -> int | None:
        shapes = [tuple(sd[name].shape) for sd in shards]
        if all(s == full for s in shapes):
            return None
        for dim in range(len(full)):
            others_equal = all(
                s[:dim] + s[dim + 1 :] == full[:dim] + full[dim + 1 :] for s in shapes
            )
            if others_equal and sum(s[dim] for s in shapes) == full[dim]:
                return dim
        raise ConvertError(
            f"{self.folder}: {name} has shard shapes {shapes}, which do not make the shape "
            f"{full} that params.json implies ({_describe(self.args)})"
        )

    def load(self, name: str) -> torch.Tensor:
        """The full tensor, in a fresh buffer: each shard's part is copied in row chunks,
        remapping the files every MAP_BYTES, so the resident mapped pages stay bounded."""
        out = torch.empty(self.shapes[name], dtype=self.dtypes[name])
        dim, offset = self._cat_dim[name], 0
        for k in range(len(self.files) if dim is not None else 1):
            size = self._open()[k][name].shape[dim] if dim is not None else 0
            dest = out if dim is None else out.narrow(dim, offset, size)
            offset += size
            for rows in _row_chunks(dest):
                dest[rows].copy_(self._open()[k][name][rows])
                self._mapped_bytes += dest[rows].nbytes
        return out


def _row_chunks(tensor: torch.Tensor) -> Iterator[slice]:
    """Slices of dim 0 of at most about CHUNK_BYTES each."""
    rows = tensor.shape[0] if tensor.dim() else 1
    step = max(1, CHUNK_BYTES // max(1, tensor.nbytes // max(rows, 1)))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


class HFSource:
    """Hugging Face layout: `config.json` + `*.safetensors` (with or without an index),
    read tensor by tensor with `safe_open`; q/k rows are permuted back to Meta's order."""

    layout = "hf"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        config = _read_json(folder / "config.json")
        try:
            self.args = keymap.args_from_hf_config(config)
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"{folder / 'config.json'}: {_first_line(e)}") from None
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        self._where: dict[str, tuple[str, Path]] = {}  # ours -> (HF name, file)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for path in files:
            for hf_name, shape, dtype in _safetensors_header(path):
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                try:
                    name = keymap.from_hf_key(hf_name)
                except KeyError:
                    raise ConvertError(
                        f"{path}: unexpected tensor {hf_name!r} (not a Llama-3 parameter)"
                    ) from None
                self._where[name] = (hf_name, path)
                self.shapes[name], self.dtypes[name] = shape, dtype
        tied = config.get("tie_word_embeddings", False)
        if tied and "output.weight" not in self.shapes and "tok_embeddings.weight" in self.shapes:
            self._where["output.weight"] = self._where["tok_embeddings.weight"]
            self.shapes["output.weight"] = self.shapes["tok_embeddings.weight"]
            self.dtypes["output.weight"] = self.dtypes["tok_embeddings.weight"]
        expected = param_shapes(self.args)
        _check_names(list(self.shapes), expected, folder)
        for name, shape in self.shapes.items():
            if shape != expected[name]:
                raise ConvertError(
                    f"{self._where[name][1]}: {self._where[name][0]} has shape {shape}, but "
                    f"config.json implies {expected[name]} ({_describe(self.args)})"
                )

    def load(self, name: str) -> torch.Tensor:
        hf_name, path = self._where[name]
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(hf_name)
        except Exception as e:  # safetensors raises its own error types
            raise ConvertError(f"cannot read {hf_name} from {path}: {_first_line(e)}") from None
        if name == "output.weight" and hf_name.endswith("embed_tokens.weight"):
            return tensor  # tied embeddings
        return keymap.from_hf_tensor(hf_name, tensor, self.args)[1].contiguous()

    def close(self) -> None:
        pass


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: not readable JSON ({_first_line(e)})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, pickle errors, ...
        raise ConvertError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(sd, dict):
        raise ConvertError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def _safetensors_header(path: Path) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ConvertError(f"{path}: no such file (listed in model.safetensors.index.json)")
    try:
        with safe_open(str(path), framework="pt") as f:
            entries = [(k, f.get_slice(k)) for k in f.keys()]
            info = [(k, tuple(s.get_shape()), s.get_dtype()) for k, s in entries]
    except Exception as e:  # safetensors raises its own error types
        raise ConvertError(f"cannot read {path}: {_first_line(e)}") from None
    for name, shape, dtype in info:
        if dtype not in _ST_DTYPES:
            raise ConvertError(f"{path}: {name} has dtype {dtype}; expected F32, BF16 or F16")
        yield name, shape, _ST_DTYPES[dtype]


def _check_names(names: list[str], expected: dict[str, tuple[int, ...]], folder: Path) -> None:
    unknown = [n for n in names if n not in expected]
    if unknown:
        raise ConvertError(
            f"{folder}: unexpected tensors for this architecture: {', '.join(unknown[:3])}"
            + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        )
    missing = [n for n in expected if n not in set(names)]
    if missing:
        raise ConvertError(
            f"{folder}: missing tensors: {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )


def detect_layout(folder: Path, requested: str = "auto") -> tuple[str, Path]:
    """('meta' | 'hf', folder holding the files); HF repos' `original/` is checked too."""
    if not folder.is_dir():
        raise ConvertError(f"--input_dir {folder}: no such directory")

    def is_hf(p: Path) -> bool:
        return (p / "config.json").is_file() and any(p.glob("*.safetensors"))

    def is_meta(p: Path) -> bool:
        return (p / "params.json").is_file() and any(p.glob("consolidated.*.pth"))

    candidates = {"hf": [folder], "meta": [folder, folder / "original"]}
    order = ["hf", "meta"] if requested == "auto" else [requested]
    for layout in order:
        for path in candidates[layout]:
            if (is_hf if layout == "hf" else is_meta)(path):
                return layout, path
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    want = {
        "hf": "config.json + *.safetensors (Hugging Face)",
        "meta": "params.json + consolidated.*.pth (Meta)",
    }
    raise ConvertError(
        f"{folder}: no Llama checkpoint found: expected "
        + " or ".join(want[layout] for layout in order)
        + f"; found: {found}"
    )


# ----------------------------------------------------------------------------- output dir


def prepare_output(folder: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Create `folder`; refuse a non-empty one unless `overwrite`, which removes only files
    these tools write (and refuses if anything else is there)."""
    resolved = folder.resolve()
    for inp in inputs:
        inp = inp.resolve()
        if resolved == inp or resolved in inp.parents:
            raise ConvertError(f"--output_dir {folder} would overwrite the input {inp}")
    if folder.exists() and not folder.is_dir():
        raise ConvertError(f"--output_dir {folder} exists and is not a directory")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise ConvertError(
                f"--output_dir {folder} exists and is not empty; pass --overwrite to replace "
                "its contents"
            )
        others = [
            p.name
            for p in folder.iterdir()
            if not (p.is_file() and _OUTPUT_FILES.match(p.name)) and p.name != "original"
        ]
        if others:
            raise ConvertError(
                f"--output_dir {folder} holds files these tools did not write "
                f"({', '.join(sorted(others)[:3])}); remove them or choose another directory"
            )
        for p in [*folder.iterdir(), *(folder / "original").glob("*")]:
            if p.is_file() and _OUTPUT_FILES.match(p.name):
                p.unlink()
        with contextlib.suppress(OSError):  # only if empty
            (folder / "original").rmdir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"--output_dir {folder}: {_first_line(e)}") from None


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent.*")
        yield


# ----------------------------------------------------------------------------- to DCP


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
    log: Log = _print,
) -> dict[str, Any]:
    """Convert Llama weights (Meta or HF layout) into a DCP directory with the model under
    the key "model"; returns the summary numbers."""
    start = time.monotonic()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    layout, folder = detect_layout(input_dir, source_format)
    source = MetaSource(folder) if layout == "meta" else HFSource(folder)
    args = source.args
    log(f"llama_to_dcp: {layout} checkpoint in {folder}: {_describe(args)}")
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
    total_bytes = sum(_nbytes(source.shapes[n], dtypes[n]) for n in names)
    prepare_output(output_dir, overwrite, [input_dir])

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
        with _quiet_dcp():
            dcp.save(
                plan, storage_writer=writer, planner=_StreamingSavePlanner(produce), no_dist=True
            )
    except CheckpointException as e:  # wraps errors raised while producing tensors
        raise ConvertError(_first_line(e)) from None
    finally:
        source.close()
    params = keymap.meta_params_from_args(out_args) | {"max_seq_len": out_args.max_seq_len}
    (output_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    marker = {"kind": "converted", "source": str(folder), "layout": layout}
    (output_dir / MARKER).write_text(json.dumps(marker))
    return _summary("llama_to_dcp", names, source.shapes, dtypes, start, output_dir, log)


def _summary(
    tool: str,
    names: list[str],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
    start: float,
    output_dir: Path,
    log: Log,
) -> dict[str, Any]:
    n_params = sum(math.prod(shapes[n]) for n in names)
    n_bytes = sum(_nbytes(shapes[n], dtypes[n]) for n in names)
    kinds = sorted({str(d).removeprefix("torch.") for d in dtypes.values()})
    seconds = time.monotonic() - start
    log(
        f"{tool}: {len(names)} tensors, {n_params:,} parameters, {_gb(n_bytes)}, "
        f"{'+'.join(kinds)}, {seconds:.1f} s -> {output_dir}"
    )
    return {"tensors": len(names), "parameters": n_params, "bytes": n_bytes, "seconds": seconds}


# ----------------------------------------------------------------------------- from DCP


def read_dcp_model_metadata(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of the `model.*` tensors of a DCP directory (reads only
    `.metadata`)."""
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
        entries = metadata.state_dict_metadata
    except Exception as e:  # pickle, OS and attribute errors of a damaged file
        raise ConvertError(f"{folder}: unreadable DCP metadata ({_first_line(e)})") from None
    return {
        key.removeprefix("model."): (tuple(md.size), md.properties.dtype)
        for key, md in entries.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }


def read_dcp_model_groups(
    folder: Path,
    names: list[str],
    stored: dict[str, tuple[tuple[int, ...], torch.dtype]],
    budget: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The `model.<name>` tensors of a DCP directory, in groups of at most `budget` bytes
    (default GROUP_BYTES; a larger tensor comes alone); only these items are requested
    from the reader."""
    nbytes = {n: _nbytes(*stored[n]) for n in names}
    for group in _groups(names, nbytes, budget or GROUP_BYTES):
        request = {"model": {n: torch.empty(stored[n][0], dtype=stored[n][1]) for n in group}}
        try:
            with _quiet_dcp():
                dcp.load(request, storage_reader=FileSystemReader(str(folder)), no_dist=True)
        except (Exception, CheckpointException) as e:  # DCP wraps the reader's errors
            raise ConvertError(f"{folder}: cannot read {group[0]}: {_first_line(e)}") from None
        yield request.pop("model")


def _find_job_config(step_dir: Path) -> dict | None:
    """The trainer's resolved `config.toml` (saved in the dump folder), if any."""
    for folder in [step_dir, *list(step_dir.resolve().parents)[:3]]:
        path = folder / "config.toml"
        if path.is_file():
            try:
                config = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError):
                continue
            if isinstance(config.get("model"), dict):
                return config
    return None


def _dcp_step(step_dir: Path) -> int | None:
    step = read_marker(step_dir).get("step")
    if step is None and (m := re.fullmatch(r"step-(\d+)", step_dir.name)):
        step = int(m.group(1))
    return step


def _dcp_args(
    folder: Path,
    stored: dict[str, tuple[tuple[int, ...], torch.dtype]],
    flavor: str | None,
    max_seq_len: int | None,
    job: dict | None,
) -> tuple[ModelArgs, str]:
    """The architecture of a DCP directory: --flavor, else its params.json (converted
    directories), else the run's config.toml; checked against the stored shapes."""
    shape = stored.get("tok_embeddings.weight", stored.get("output.weight", ((0,), None)))[0]
    vocab = shape[0]
    job_seq = (job or {}).get("training", {}).get("seq_len")
    seq = max_seq_len or job_seq or 131072
    if flavor is not None:
        args, origin = build_model_args(flavor, vocab, seq), f"--flavor {flavor}"
    elif (folder / "params.json").is_file():
        params = _read_json(folder / "params.json")
        try:
            args = keymap.args_from_meta_params(params, vocab_size=vocab)
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(f"{folder / 'params.json'}: {_first_line(e)}") from None
        if max_seq_len:
            args = dataclasses.replace(args, max_seq_len=max_seq_len)
        origin = "params.json"
    elif job is not None and job["model"].get("flavor") in FLAVORS:
        args = build_model_args(job["model"]["flavor"], vocab, seq)
        origin = f"the run's config.toml (flavor {job['model']['flavor']})"
    else:
        raise ConvertError(
            f"{folder}: cannot tell the model architecture (no params.json here and no "
            f"config.toml of the run above it); pass --flavor ({', '.join(FLAVORS)})"
        )
    expected = param_shapes(args)
    for name, (shape, _) in stored.items():
        if name not in expected:
            raise ConvertError(f"{folder}: unexpected model tensor {name} for {_describe(args)}")
        if shape != expected[name]:
            raise ConvertError(
                f"{folder}: {name} has shape {shape} but {origin} implies {expected[name]} "
                f"({_describe(args)})"
            )
    missing = [n for n in expected if n not in stored]
    if missing:
        raise ConvertError(
            f"{folder}: the checkpoint lacks model tensors {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            + " (a directory converted with the embeddings dropped cannot be exported)"
        )
    return args, origin


class SafetensorsShardWriter:
    """Writes HF safetensors shards tensor by tensor: each shard's header is computed up
    front from the known names, shapes and dtypes, then the data are appended in order."""

    def __init__(
        self, folder: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int
    ) -> None:
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in entries:
            nbytes = _nbytes(entry[1], entry[2])
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.files = [folder / name for name in names]
        self.shards = shards
        self.weight_map = {e[0]: names[i] for i, shard in enumerate(shards) for e in shard}
        self.total_size = sum(_nbytes(e[1], e[2]) for e in entries)
        self._order = iter([(i, e) for i, shard in enumerate(shards) for e in shard])
        self._file: Any = None
        self._remaining = 0

    def _open(self, index: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.shards[index]:
            end = offset + _nbytes(shape, dtype)
            header[name] = {
                "dtype": _ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.files[index], "wb")  # noqa: SIM115 - closed in write()
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._remaining = len(self.shards[index])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, (expected, shape, dtype) = next(self._order)
        assert (name, tuple(tensor.shape), tensor.dtype) == (expected, shape, dtype), name
        if self._file is None:
            self._open(index)
        self._file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self._remaining -= 1
        if self._remaining == 0:
            self._file.close()
            self._file = None

    def write_index(self) -> None:
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            path = self.files[0].parent / "model.safetensors.index.json"
            path.write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class MetaCheckpointWriter:
    """Writes Meta's `consolidated.00.pth` without holding the model in memory: the file
    is laid out with `torch.serialization.skip_data` (storages left unwritten), then
    filled in row chunks through a shared memory map of it, remapped every MAP_BYTES."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        self.path = path
        # torch.empty reserves address space only; skip_data never touches the bytes.
        skeleton = {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in entries}
        with torch.serialization.skip_data():
            torch.save(skeleton, path)
        self._map: dict[str, torch.Tensor] | None = None
        self._mapped_bytes = 0

    def _target(self) -> dict[str, torch.Tensor]:
        if self._map is None or self._mapped_bytes >= MAP_BYTES:
            self._map = None  # unmaps: the written pages leave this process's memory
            with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
                self._map = torch.load(self.path, mmap=True, weights_only=True)
            self._mapped_bytes = 0
        return self._map

    def write(self, name: str, tensor: torch.Tensor) -> None:
        for rows in _row_chunks(tensor):
            self._target()[name][rows].copy_(tensor[rows])
            self._mapped_bytes += tensor[rows].nbytes

    def close(self) -> None:
        self._map = None


def _groups(names: list[str], nbytes: dict[str, int], budget: int) -> Iterator[list[str]]:
    group: list[str] = []
    size = 0
    for name in names:
        if group and size + nbytes[name] > budget:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes[name]
    if group:
        yield group


def model_card(
    args: ModelArgs,
    title: str,
    step: int | None,
    job: dict | None,
    source: Path,
    dtype: str,
) -> str:
    """A README.md for the Hub: what the model is, the recipe and step it comes from."""
    job_section = (job or {}).get("job", {})
    training = (job or {}).get("training", {})
    recipe = job_section.get("config_file") or "unknown"
    rows = [
        ("dim", args.dim),
        ("layers", args.n_layers),
        ("attention heads (kv heads)", f"{args.n_heads} ({args.n_kv_heads})"),
        ("FFN hidden", args.ffn_hidden_dim),
        ("vocabulary", args.vocab_size),
        ("context (max_position_embeddings)", args.max_seq_len),
        (
            "RoPE",
            f"theta {args.rope_theta:g}" + (", Llama-3.1 scaling" if args.use_scaled_rope else ""),
        ),
        ("dtype", dtype),
    ]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- llama",
        "- titan",
        "- neuroscience",
        "---",
        "",
        f"# {title}",
        "",
        "A Llama-3.1-style decoder trained with titan (PyTorch FSDP2) and exported from a "
        "Distributed Checkpoint with `dcp_to_llama.py`.",
        "",
        f"- recipe: `{recipe}`"
        + (f" ({job_section['description']})" if job_section.get("description") else ""),
        f"- step: {step if step is not None else 'unknown'}",
        f"- dataset: {training.get('dataset', 'unknown')}",
        f"- source checkpoint: `{source.parent.name}/{source.name}`",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]
    if args.vocab_size == 256:
        lines += [
            "Tokens are spike counts: 0..254 are counts (clipped at 254) and 255 opens each "
            "20 ms time bin, followed by one count per neuron.",
            "",
        ]
    lines += [
        "```python",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{title}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def create_hub_repo(repo_name: str, private: bool) -> tuple[Any, str]:
    """(HfApi, repo id) for `repo_name`, created if needed; checked before converting so
    that a missing token or network fails fast. ConvertError on any failure."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise ConvertError(
            "--push_to_hub: no Hugging Face token found; run `hf auth login` or set HF_TOKEN"
        )
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_name, private=private, exist_ok=True, repo_type="model")
    except Exception as e:  # network, auth and HTTP errors have many types
        raise ConvertError(
            f"--push_to_hub: cannot create the Hub repo {repo_name}: {_first_line(e)}"
        ) from None
    return api, getattr(repo, "repo_id", repo_name)


def upload_to_hub(api: Any, folder: Path, repo_id: str, log: Log = _print) -> None:
    """Upload `folder` to the Hub model repo `repo_id`; ConvertError on any failure."""
    log(f"  uploading {folder} to https://huggingface.co/{repo_id} ...")
    try:
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload model exported by titan's dcp_to_llama.py",
        )
    except Exception as e:  # network, auth and HTTP errors have many types
        raise ConvertError(f"--push_to_hub: upload to {repo_id} failed: {_first_line(e)}") from None


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
    log: Log = _print,
) -> dict[str, Any]:
    """Export the model of a DCP directory to Meta and/or HF layout (HF at the top of
    `output_dir`; with fmt='both', Meta's files under `original/` as on the Hub)."""
    start = time.monotonic()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    push = push_to_hub
    if push and not hf_repo_name:
        raise ConvertError("--push_to_hub needs --hf_repo_name USER/NAME")
    if push and fmt == "meta":
        raise ConvertError("--push_to_hub uploads the Hugging Face layout: use --format hf or both")
    if not input_dir.is_dir():
        raise ConvertError(f"--input_dir {input_dir}: no such directory")
    if not (input_dir / ".metadata").is_file():
        steps = sorted(p.name for p in input_dir.glob("step-*") if p.is_dir())
        hint = (
            f"; it holds step directories: pass one, e.g. {input_dir / steps[-1]}" if steps else ""
        )
        raise ConvertError(f"{input_dir}: not a DCP checkpoint directory (no .metadata){hint}")
    if not (input_dir / MARKER).is_file() and not allow_incomplete:
        raise ConvertError(
            f"{input_dir}: incomplete checkpoint (no {MARKER} marker: its save did not finish); "
            "use another step or pass --allow_incomplete"
        )
    stored = read_dcp_model_metadata(input_dir)
    if not stored:
        raise ConvertError(f"{input_dir}: no model tensors (keys model.*) in this checkpoint")
    job = _find_job_config(input_dir)
    args, origin = _dcp_args(input_dir, stored, flavor, max_seq_len, job)
    names = list(param_shapes(args))
    shapes = {n: stored[n][0] for n in names}
    out_dtype = None if dtype == "auto" else DTYPES[dtype]
    dtypes = {n: out_dtype or stored[n][1] for n in names}
    if any(d not in _ST_NAMES for d in dtypes.values()):
        raise ConvertError(f"{input_dir}: stored dtypes {set(dtypes.values())}; pass --dtype")
    main_dtype = str(dtypes["layers.0.attention.wq.weight"]).removeprefix("torch.")
    log(f"dcp_to_llama: {input_dir}: {_describe(args)} (from {origin}), {main_dtype}, {fmt}")
    prepare_output(output_dir, overwrite, [input_dir])
    hub = create_hub_repo(hf_repo_name, private) if push and hf_repo_name else None

    hf_writer = meta_writer = None
    if fmt in ("hf", "both"):
        entries = [(keymap.to_hf_key(n), shapes[n], dtypes[n]) for n in names]
        hf_writer = SafetensorsShardWriter(output_dir, entries, max_shard_size)
    meta_dir = output_dir / "original" if fmt == "both" else output_dir
    if fmt in ("meta", "both"):
        meta_dir.mkdir(exist_ok=True)
        entries = [(n, shapes[n], dtypes[n]) for n in names]
        meta_writer = MetaCheckpointWriter(meta_dir / "consolidated.00.pth", entries)

    progress = Progress(len(names), sum(_nbytes(shapes[n], dtypes[n]) for n in names), log)

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

    step = _dcp_step(input_dir)
    if meta_writer is not None:
        params = keymap.meta_params_from_args(args)
        (meta_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    if hf_writer is not None:
        hf_writer.write_index()
        config = keymap.hf_config_from_args(args, main_dtype)
        (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        title = hf_repo_name or output_dir.resolve().name
        card = model_card(args, title, step, job, input_dir, main_dtype)
        (output_dir / "README.md").write_text(card)
    summary = _summary("dcp_to_llama", names, shapes, dtypes, start, output_dir, log)
    if hub is not None:
        api, summary["repo_id"] = hub
        upload_to_hub(api, output_dir, summary["repo_id"], log)
        log(f"dcp_to_llama: pushed to https://huggingface.co/{summary['repo_id']}")
    return summary


# ----------------------------------------------------------------------------- CLIs


def _release_freed_memory_promptly() -> None:
    """Have glibc serve every allocation above 1 MB with its own mmap, so a freed tensor
    goes back to the OS at once; its adaptive threshold would otherwise keep freed
    tensors of up to 32 MB in the heap, and the peak would not be bounded by a group."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MB
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _run(fn: Callable[[], Any]) -> int:
    _release_freed_memory_promptly()
    try:
        fn()
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:  # disk full, permissions, ...
        print(f"error: {_first_line(e)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 5GB, 500MB or 1000000")
    unit = {
        "": 1,
        "B": 1,
        "K": 10**3,
        "KB": 10**3,
        "M": 10**6,
        "MB": 10**6,
        "G": 10**9,
        "GB": 10**9,
    }
    return int(float(m.group(1)) * unit[m.group(2)])


def llama_to_dcp_main(argv: list[str] | None = None) -> int:
    """CLI of llama_to_dcp.py; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="llama_to_dcp.py",
        description="Convert Llama weights (Meta or Hugging Face layout) into a DCP directory "
        "that training loads with --checkpoint.initial_load_path.",
    )
    p.add_argument(
        "--input_dir",
        required=True,
        help="Meta (params.json + consolidated.*.pth) "
        "or HF (config.json + *.safetensors) checkpoint; an HF repo's original/ works too",
    )
    p.add_argument("--output_dir", required=True, help="DCP directory to create")
    p.add_argument(
        "--source_format",
        choices=["auto", "meta", "hf"],
        default="auto",
        help="layout of --input_dir (default: detect)",
    )
    p.add_argument(
        "--flavor",
        choices=list(FLAVORS),
        default=None,
        help="refuse unless the weights have this titan flavor's architecture",
    )
    p.add_argument(
        "--vocab_size",
        type=int,
        default=256,
        help="target vocabulary; embedding and output are dropped when the source's "
        "differs (default 256, spike tokens)",
    )
    p.add_argument(
        "--keep_embeddings",
        action="store_true",
        help="keep tok_embeddings and output even when the vocabularies differ",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="dtype of the written tensors (default: the source's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    a = p.parse_args(argv)
    return _run(lambda: llama_to_dcp(**vars(a)))


def dcp_to_llama_main(argv: list[str] | None = None) -> int:
    """CLI of dcp_to_llama.py; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="dcp_to_llama.py",
        description="Export the model weights of a DCP step directory (full training "
        "checkpoint or model-only export) to Meta and/or Hugging Face layout.",
    )
    p.add_argument("--input_dir", required=True, help="DCP step directory (…/step-N)")
    p.add_argument("--output_dir", required=True, help="folder to create")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=["meta", "hf", "both"],
        default="hf",
        help="hf: sharded safetensors + config.json; meta: consolidated.00.pth + "
        "params.json; both: HF with Meta's files under original/ (default hf)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="dtype of the exported tensors (default: as stored)",
    )
    p.add_argument(
        "--flavor",
        choices=list(FLAVORS),
        default=None,
        help="architecture, if neither params.json nor the run's config.toml says",
    )
    p.add_argument(
        "--max_seq_len",
        type=int,
        default=None,
        help="max_position_embeddings in config.json (default: the run's seq_len, else 131072)",
    )
    p.add_argument(
        "--max_shard_size",
        type=_size,
        default="5GB",
        help="largest safetensors shard (default 5GB)",
    )
    p.add_argument("--hf_repo_name", default=None, help="Hub repo USER/NAME (model card title)")
    p.add_argument("--push_to_hub", action="store_true", help="upload the HF folder to the Hub")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    p.add_argument(
        "--allow_incomplete",
        action="store_true",
        help=f"read a directory without the {MARKER} marker",
    )
    a = p.parse_args(argv)
    return _run(lambda: dcp_to_llama(**vars(a)))
