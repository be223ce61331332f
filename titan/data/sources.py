"""Where rows come from: `training.dataset` / `training.dataset_path` resolved to a Hugging
Face dataset split, opened map-style (memory-mapped Arrow) or for streaming, and checked.

- `primate`, `rodent`: the Hub datasets `eminorhan/neural-pile-{primate,rodent}` (read from
  the local HF cache when `HF_HUB_OFFLINE=1`); `training.dataset_path` overrides the id.
- `synthetic`: the folder written by `titan.data.synthetic`: `data_cache/synthetic-<rows>rows-
  seed<seed>` (relative to the working directory, generated on first use, one per
  `data.synthetic_rows` and `training.seed`), or `training.dataset_path`, which must
  then be such a folder (it holds the generator's params file), or not exist yet with
  `data.generate_synthetic` set. A dataset path is read, never generated into, otherwise.
- `training.dataset_path`: a `save_to_disk` folder (a DatasetDict, or a single Dataset that
  then serves only its own split), a parquet/arrow file, glob or folder, or a Hub id.

Problems with the source itself (missing path, split or column, wrong column type, a
`data.source_datasets` filter that keeps nothing) raise `ConfigError` with one line that
names the source and what it has.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from titan.config import ConfigError, JobConfig
from titan.data.tokenizer import is_spike_matrix_type

HUB_IDS = {"primate": "eminorhan/neural-pile-primate", "rodent": "eminorhan/neural-pile-rodent"}
"""Named datasets and their Hub ids."""
DATA_CACHE = Path("data_cache")
"""Folder of generated datasets, relative to the working directory."""
COLUMN = "spike_counts"
SOURCE_COLUMN = "source_dataset"
NO_SOURCE = "(no source_dataset)"
"""How messages and results name the source of rows whose source_dataset is null."""
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


@dataclass(frozen=True)
class Source:
    """A resolved data source."""

    label: str
    """How messages name it."""
    kind: str
    """'hub' (a Hub id), 'disk' (a save_to_disk folder) or 'files' (parquet/arrow files)."""
    location: str
    """Hub id, folder, file or glob."""
    builder: str | None = None
    """For 'files': the `datasets` builder (parquet or arrow); None lets `datasets` infer it."""
    splits: dict[str, list[str]] | None = None
    """For a glob: its files by split (see `glob_splits`)."""


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence `datasets` progress bars inside the block (restored afterwards)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def synthetic_path(cfg: JobConfig) -> Path:
    """Folder of the synthetic dataset for this config: `training.dataset_path`, else one
    per size and seed under `data_cache/` (recipes with other sizes never share one)."""
    if cfg.training.dataset_path:
        return Path(cfg.training.dataset_path).expanduser()
    return DATA_CACHE / f"synthetic-{cfg.data.synthetic_rows}rows-seed{cfg.training.seed}"


def resolve_source(cfg: JobConfig) -> Source:
    """The source named by `training.dataset` and `training.dataset_path` (checks only the
    path: whether it exists and is of the right kind)."""
    name, path = cfg.training.dataset, cfg.training.dataset_path
    if cfg.data.generate_synthetic and name != "synthetic":
        raise ConfigError(
            f"data.generate_synthetic = true needs training.dataset = 'synthetic', not {name!r}; "
            "set data.generate_synthetic = false to read training.dataset_path as it is"
        )
    if name == "synthetic":
        p = synthetic_path(cfg)
        if path is not None:
            _check_synthetic_path(path, p, cfg.data.generate_synthetic)
        return Source(f"synthetic dataset {p}", "disk", str(p))
    if path is None:
        if name in HUB_IDS:
            return Source(HUB_IDS[name], "hub", HUB_IDS[name])
        raise ConfigError(
            f"training.dataset = {name!r}: unknown dataset; use primate, rodent or synthetic, "
            "or set training.dataset_path to a local dataset or Hub id"
        )
    return _resolve_path(path)


def _check_synthetic_path(path: str, p: Path, generate: bool) -> None:
    """With `training.dataset = "synthetic"`, the dataset path is a synthetic dataset, or
    does not exist yet and `data.generate_synthetic` asks to generate it there."""
    from titan.data.synthetic import PARAMS_FILE  # local: synthetic imports this module

    if not p.exists():
        if generate:
            return
        raise ConfigError(
            f"training.dataset_path = {path!r}: no such folder; with training.dataset = "
            "'synthetic' it must be a synthetic dataset: fix the path, or set "
            "data.generate_synthetic = true to generate one there"
        )
    if not (p / PARAMS_FILE).is_file():
        raise ConfigError(
            f"training.dataset_path = {path!r} is {describe_path(p)}, not a synthetic dataset "
            f"(no {PARAMS_FILE}); to train on it, set training.dataset to a name for it (e.g. "
            "training.dataset = 'custom') instead of 'synthetic'"
        )


def describe_path(p: Path) -> str:
    """What a local path holds, in a few words, for messages."""
    if p.is_file():
        return f"a {p.suffix} file" if p.suffix else "a file"
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        return "a save_to_disk dataset"
    files = list(itertools.islice(p.rglob("*"), 1000))  # enough to tell; bounded
    kinds = sorted({f.suffix.lstrip(".") for f in files if f.suffix in _FILE_BUILDERS})
    if kinds:
        return f"a folder of {' and '.join(kinds)} files"
    return "a folder" if files else "an empty folder"


_SPLIT_WORD = re.compile(
    r"(?:^|[/_.-])(train|training|test|testing|validation|valid|val|dev|eval)(?=[/_.-]|$)"
)
_SPLIT_NAMES = {"training": "train", "testing": "test", "valid": "validation",
                "val": "validation", "dev": "validation", "eval": "validation"}  # fmt: skip


def glob_splits(pattern: str, files: list[str]) -> dict[str, list[str]]:
    """The files a glob matched, by split, named as `datasets` names a folder's splits:
    by a word such as train / test / validation in the path below the pattern's fixed
    folder (`data/train-00001.parquet`, `test/part-0.arrow`). With no such word anywhere,
    every file is `train`; a mix of files with and without one is refused (a pattern that
    took both splits would otherwise train on the held-out rows)."""
    fixed = re.split(r"[*?\[]", pattern, maxsplit=1)[0]  # up to the first wildcard
    base = Path(fixed) if fixed.endswith(os.sep) else Path(fixed).parent
    by_split: dict[str, list[str]] = {}
    unnamed = []
    for f in files:
        words = _SPLIT_WORD.findall(Path(f).relative_to(base).as_posix())
        if words:
            split = _SPLIT_NAMES.get(words[-1], words[-1])
            by_split.setdefault(split, []).append(f)
        else:
            unnamed.append(f)
    if not by_split:
        return {"train": files}
    if unnamed:
        raise ConfigError(
            f"training.dataset_path = {pattern!r} matches files of the splits "
            f"{', '.join(sorted(by_split))} and files of no split (e.g. {unnamed[0]}); "
            "narrow the pattern, or point at the folder and let its file names give the splits"
        )
    return by_split


def _resolve_path(path: str) -> Source:
    p = Path(path).expanduser()
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(str(p), recursive=True))
        if not files:
            raise ConfigError(f"training.dataset_path = {path!r}: no file matches this pattern")
        builder = _FILE_BUILDERS.get(Path(files[0]).suffix)
        return Source(path, "files", str(p), builder, glob_splits(str(p), files))
    if p.is_file():
        if p.suffix == ".arrow" and (p.parent / "state.json").is_file():
            return Source(str(p.parent), "disk", str(p.parent))  # a file of a save_to_disk folder
        if p.suffix not in _FILE_BUILDERS:
            raise ConfigError(
                f"training.dataset_path = {path!r}: unsupported file type {p.suffix!r}; "
                "use .parquet or .arrow files, a save_to_disk folder or a Hub id"
            )
        return Source(str(p), "files", str(p), _FILE_BUILDERS[p.suffix])
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return Source(str(p), "disk", str(p))
        return Source(str(p), "files", str(p))  # datasets infers the format and the splits
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return Source(path, "hub", path)
    raise ConfigError(
        f"training.dataset_path = {path!r}: no such file or directory; fix the path (a "
        "save_to_disk folder, parquet or arrow files, a glob) or give a Hub id (owner/name)"
    )


def _load(src: Source, streaming: bool) -> Any:
    """The source's splits: a DatasetDict / IterableDatasetDict, or one Dataset."""
    import datasets

    try:
        with quiet_datasets():
            if src.kind == "disk":
                if not Path(src.location).exists():
                    hint = ""
                    if src.label.startswith("synthetic") and not Path(src.location).is_absolute():
                        hint = (  # what generate.py and evaluate.py meet in another folder
                            " (a run of the synthetic recipe generates it there, relative to "
                            "the folder it runs in: run this from that folder)"
                        )
                    raise ConfigError(f"{src.label}: no such folder{hint}")
                return datasets.load_from_disk(src.location)
            if src.kind == "files" and src.builder is not None:
                return datasets.load_dataset(
                    src.builder, data_files=src.splits or src.location, streaming=streaming
                )
            return datasets.load_dataset(src.location, streaming=streaming)
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many types; report them as one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = ""
        if src.kind == "hub" and datasets.config.HF_HUB_OFFLINE:
            hint = (
                "; offline (HF_HUB_OFFLINE=1) it must already be in the HF cache "
                f"({datasets.config.HF_DATASETS_CACHE})"
            )
        elif src.kind == "hub":
            hint = (
                "; check the Hub id and the network, or download it where there is a network "
                "into the HF cache and run with HF_HUB_OFFLINE=1 "
                f"({datasets.config.HF_DATASETS_CACHE})"
            )
        raise ConfigError(f"{src.label}: cannot load it ({type(e).__name__}: {first}){hint}") from e


def _pick_split(src: Source, loaded: Any, split: str, key: str | None) -> Any:
    import datasets

    said = f"{key} = {split!r}: " if key else ""  # the setting that names the split
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in loaded:
            raise ConfigError(
                f"{said}{src.label}: no split {split!r}; it has: {', '.join(loaded) or 'none'}"
            )
        return loaded[split]
    own = str(loaded.split) if loaded.split is not None else "train"
    if split != own:
        raise ConfigError(
            f"{said}{src.label}: no split {split!r}; it is a single dataset (split {own!r}), "
            "not a DatasetDict"
        )
    return loaded


def _check_columns(src: Source, split: str, ds: Any, source_datasets: list[str]) -> None:
    features = ds.features
    if features is None:  # some streamed sources only know their columns once read
        return
    names = list(features)
    if COLUMN not in names:
        raise ConfigError(
            f"{src.label} [{split}]: no column {COLUMN!r}; its columns are: {', '.join(names)}"
        )
    tp = features.arrow_schema.field(COLUMN).type
    if not is_spike_matrix_type(tp):
        raise ConfigError(
            f"{src.label} [{split}]: column {COLUMN!r} has type {tp}; expected a list of "
            "lists of integers (Sequence(Sequence(uint8)), shape (n_neurons, n_time_bins))"
        )
    if source_datasets and SOURCE_COLUMN not in names:
        raise ConfigError(
            f"{src.label} [{split}]: data.source_datasets is set but there is no column "
            f"{SOURCE_COLUMN!r}; its columns are: {', '.join(names)}"
        )


def open_split(
    src: Source,
    split: str,
    streaming: bool,
    source_datasets: list[str],
    extra_columns: tuple[str, ...] = (),
    key: str | None = None,
) -> Any:
    """The checked split: a `datasets.Dataset` (map-style, and streamed local sources, which
    the loader cuts into shards itself) or an `IterableDataset` (streamed Hub/files); it keeps
    `spike_counts`, `source_dataset` when filtering, and those `extra_columns` it has.
    `key` is the setting that chose `split`, named when the split is missing."""
    import datasets

    # offline, a Hub dataset can only come from the local cache: stream it like a local one
    local = src.kind == "disk" or (src.kind == "hub" and datasets.config.HF_HUB_OFFLINE)
    stream = streaming and not local
    ds = _pick_split(src, _load(src, stream), split, key)
    _check_columns(src, split, ds, source_datasets)
    cols = [COLUMN] + ([SOURCE_COLUMN] if source_datasets else [])
    if ds.features is not None:
        cols += [c for c in extra_columns if c in ds.features and c not in cols]
        ds = ds.select_columns(cols)
    if stream and hasattr(ds, "reshard"):  # datasets >= 4
        ds = ds.reshard()  # one shard per parquet row group where possible: cheap resume
    return ds


def check_column_type(label: str, tp: pa.DataType) -> None:
    """The column-type check for streamed sources whose features were unknown up front."""
    if not is_spike_matrix_type(tp):
        raise ConfigError(
            f"{label}: column {COLUMN!r} has type {tp}; expected a list of lists of integers "
            "(Sequence(Sequence(uint8)))"
        )


def source_values(ds: Any) -> list[str]:
    """Distinct `source_dataset` values of a map-style split (for messages)."""
    import pyarrow.compute as pc

    values = pc.unique(ds.with_format("arrow")[SOURCE_COLUMN]).to_pylist()
    return sorted(str(v) for v in values if v is not None) + [NO_SOURCE] * (None in values)
