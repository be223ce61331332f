"""Sources and bad data (issue 3, acceptance 5): save_to_disk folders, parquet files
(map-style and streamed), an uncached Hub id offline; a missing path, split or column, a
wrong column type, a source_datasets filter that keeps nothing -> one-line ConfigError
naming the source and what it has; bad rows (ragged, empty, null, counts outside 0..255)
skipped with a counted warning, never a crash; prepare_dataset generating the synthetic
dataset idempotently and atomically."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_refused, debug_args, run_train
from datasets import Dataset, DatasetDict, NamedSplit
from datasets.table import InMemoryTable

from titan.config import ConfigError, JobConfig
from titan.data import build_dataloader, prepare_dataset, synthetic, tokenize_row

GOOD = [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9, 10]]]
BAD = {
    "ragged": [[1, 2, 3], [4, 5]],
    "no neurons": [],
    "no time bins": [[], []],
    "count 300": [[1, 300]],
    "count -1": [[-1, 2]],
    "null": None,
    "null neuron": [[1, 2], None],
}


def table(rows, value_type=None, column="spike_counts", sources=None) -> pa.Table:
    value_type = value_type or pa.int16()  # wide enough for the out-of-range rows
    cols = {column: pa.array(rows, type=pa.list_(pa.list_(value_type)))}
    if sources is not None:
        cols["source_dataset"] = pa.array(sources, pa.string())
    return pa.table(cols)


def save(path: Path, tables: dict[str, pa.Table]) -> str:
    dd = DatasetDict({k: Dataset(InMemoryTable(t), split=NamedSplit(k)) for k, t in tables.items()})
    dd.save_to_disk(str(path))
    return str(path)


def cfg_for(
    path: str | None,
    *,
    dataset: str = "custom",
    streaming: bool = False,
    split: str = "train",
    seq_len: int = 4,
) -> JobConfig:
    cfg = JobConfig()
    cfg.training.dataset, cfg.training.dataset_path = dataset, path
    cfg.training.seq_len, cfg.training.batch_size = seq_len, 1
    cfg.data.streaming, cfg.data.split, cfg.data.shuffle = streaming, split, False
    return cfg


def tokens_of(loader) -> list[int]:
    out = []
    for inputs, labels in loader:
        out += inputs[0].tolist() + labels[0, -1:].tolist()
    return out


# ----------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_rows_are_skipped_and_counted(tmp_path, streaming, caplog):
    rows = [GOOD[0], *BAD.values(), GOOD[1]]
    path = save(tmp_path / "bad", {"train": table(rows)})
    loader = build_dataloader(cfg_for(path, streaming=streaming, seq_len=1), 0, 1, infinite=False)
    expected = np.concatenate([tokenize_row(np.array(g)) for g in GOOD]).tolist()
    got = tokens_of(loader)
    assert got == expected[: len(got)] and len(expected) - len(got) < 2
    assert loader.bad_rows == len(BAD)
    assert f"{len(BAD)} bad rows so far" in caplog.text
    for reason in ("not a 2-D matrix", "no neurons", "no time bins", "outside 0..255", "null"):
        assert reason in caplog.text


@pytest.mark.parametrize("streaming", [False, True])
def test_only_bad_rows_is_a_clear_error_after_one_epoch(tmp_path, streaming):
    path = save(tmp_path / "allbad", {"train": table([BAD["ragged"], BAD["no neurons"]])})
    loader = build_dataloader(cfg_for(path, streaming=streaming), 0, 1)
    with pytest.raises(ConfigError, match=r"no usable row in a whole epoch \(2 bad"):
        next(loader)
    assert loader.bad_rows == 2  # a fresh start stops after its first epoch, not its second


def test_an_epoch_of_only_bad_rows_for_one_rank_is_not_the_end(tmp_path):
    # Shuffled, each epoch deals the rows to the ranks afresh: now and then one rank gets
    # only the bad ones. Usable rows exist, so it goes on to the next epoch.
    path = save(tmp_path / "half", {"train": table([GOOD[0], BAD["ragged"]] * 4)})
    cfg = cfg_for(path)
    cfg.data.shuffle = True
    for rank in (0, 1):
        loader = build_dataloader(cfg, rank, 2)
        for _ in range(400):  # rank 0 met such an epoch at batch 156
            next(loader)
        assert loader.state_dict()["epoch"] > 60
        loader.close()


def test_a_data_error_of_one_rank_is_named(tmp_path):
    """Streamed with a filter, the kept source lies in the first row group only, which
    goes to rank 0: rank 1 alone finds no row. Rank 0 then fails in a collective (its
    traceback), and the launcher still ends with the line that says why."""
    data = tmp_path / "one_source.parquet"
    rows = table([[[i % 200, 1, 2]] for i in range(32)], sources=["a"] * 4 + ["b"] * 28)
    pq.write_table(rows, data, row_group_size=4)
    result = run_train(
        ["--job.config_file=train_configs/debug_model.toml", f"--job.dump_folder={tmp_path}",
         "--training.dataset=custom", f"--training.dataset_path={data}", "--data.streaming",
         "--data.no_shuffle", "--data.source_datasets=a", "--training.seq_len=16",
         "--training.batch_size=1", "--training.steps=3", "--checkpoint.no_enable_checkpoint",
         "--model.attn_impl=sdpa"],
        nproc=2,
        launcher="titan.launch",
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "rank 1 of 2 found no usable row" in last, last


def test_a_filter_that_keeps_nothing_stops_the_run_before_its_model(tmp_path, synthetic_dir):
    result = run_train(
        debug_args(tmp_path, synthetic_dir, "--data.source_datasets=nosuch"), timeout=120
    )
    assert_refused(result, "no row has source_dataset in ['nosuch']; it has: synthetic_0")
    assert "Applied activation checkpointing" not in result.stdout  # no model was built


def test_a_misspelled_source_is_named(tmp_path, synthetic_dir):
    """A filter that keeps some rows but names a source no row has: a typo, not half the
    data read without a word."""
    from titan.config import load_config

    names = "--data.source_datasets=synthetic_0,synthtic_1"
    cfg = load_config(debug_args(tmp_path, synthetic_dir, names))
    with pytest.raises(ConfigError) as e:
        build_dataloader(cfg, 0, 1)
    assert "names synthtic_1, which no row has (a typo?); it has: synthetic_0, " in one_line(e)


# ----------------------------------------------------------------------------- bad sources


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_dataloader(cfg_for(str(tmp_path / "nowhere")), 0, 1)
    assert "no such file or directory" in one_line(e)


def test_missing_column_names_what_the_source_has(tmp_path):
    path = save(tmp_path / "nocol", {"train": table(GOOD, column="counts")})
    for streaming in (False, True):
        with pytest.raises(ConfigError) as e:
            build_dataloader(cfg_for(path, streaming=streaming), 0, 1)
        msg = one_line(e)
        assert "no column 'spike_counts'" in msg and "counts" in msg and path in msg


def test_missing_split_names_the_splits(tmp_path):
    path = save(tmp_path / "trainonly", {"train": table(GOOD)})
    for streaming in (False, True):
        with pytest.raises(ConfigError) as e:
            build_dataloader(cfg_for(path, streaming=streaming, split="test"), 0, 1)
        assert f"data.split = 'test': {path}: no split 'test'; it has: train" in one_line(e)


def test_single_dataset_serves_only_its_split(tmp_path):
    Dataset(InMemoryTable(table(GOOD)), split=NamedSplit("train")).save_to_disk(
        str(tmp_path / "single")
    )
    build_dataloader(cfg_for(str(tmp_path / "single")), 0, 1)
    with pytest.raises(ConfigError, match="no split 'test'"):
        build_dataloader(cfg_for(str(tmp_path / "single"), split="test"), 0, 1)


def test_wrong_column_type(tmp_path):
    t = pa.table({"spike_counts": pa.array(["1,2", "3,4"])})
    path = save(tmp_path / "strings", {"train": t})
    with pytest.raises(ConfigError) as e:
        build_dataloader(cfg_for(path), 0, 1)
    assert "has type string" in one_line(e)


def test_source_filter(tmp_path):
    t = table(GOOD + GOOD, sources=["a", "b", "a", "b"])
    path = save(tmp_path / "sources", {"train": t})
    cfg = cfg_for(path, seq_len=1)
    cfg.data.source_datasets = ["b"]
    for streaming in (False, True):
        cfg.data.streaming = streaming
        loader = build_dataloader(cfg, 0, 1, infinite=False)
        assert len(tokens_of(loader)) == len(tokenize_row(np.array(GOOD[1]))) * 2
    cfg.data.streaming = False
    cfg.data.source_datasets = ["c"]
    with pytest.raises(ConfigError) as e:
        build_dataloader(cfg, 0, 1)
    assert "no row has source_dataset in ['c']; it has: a, b" in one_line(e)
    nulls = save(tmp_path / "nulls", {"train": table(GOOD, sources=["a", None])})
    cfg.training.dataset_path = nulls
    with pytest.raises(ConfigError) as e:
        build_dataloader(cfg, 0, 1)
    assert "it has: a, (no source_dataset)" in one_line(e)
    nosrc = save(tmp_path / "nosrc", {"train": table(GOOD)})
    cfg.training.dataset_path = nosrc
    with pytest.raises(ConfigError, match="no column 'source_dataset'"):
        build_dataloader(cfg, 0, 1)


def test_unknown_dataset_name():
    with pytest.raises(ConfigError) as e:
        build_dataloader(cfg_for(None, dataset="monkeys"), 0, 1)
    assert "unknown dataset" in one_line(e)


def test_a_missing_synthetic_dataset_says_how_to_get_one(tmp_path, monkeypatch):
    """What generate.py and evaluate.py meet when run from another folder than training."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        build_dataloader(cfg_for(None, dataset="synthetic"), 0, 1)
    assert one_line(e).endswith(
        "data_cache/synthetic-64rows-seed0: no such folder (a run of the synthetic recipe "
        "generates it there, relative to the folder it runs in: run this from that folder)"
    )


def test_uncached_hub_dataset_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(ConfigError) as e:
        prepare_dataset(cfg_for(None, dataset="primate"))
    msg = one_line(e)
    assert "eminorhan/neural-pile-primate" in msg
    assert "offline (HF_HUB_OFFLINE=1) it must already be in the HF cache" in msg


# ----------------------------------------------------------------------------- other formats


def fake_hub_cache(cache: Path, repo: str, tables: dict[str, pa.Table]) -> None:
    """Put `tables` into the `datasets` cache the way `load_dataset(repo)` leaves them online
    (an `owner___name/default/0.0.0/<hash>/` folder of `name-<split>.arrow` files)."""
    files = {}
    for split, t in tables.items():
        files[split] = str(cache.parent / f"{split}.parquet")
        pq.write_table(t, files[split])
    datasets.load_dataset("parquet", data_files=files, cache_dir=str(cache / "build"))
    built = next(p for p in (cache / "build" / "parquet").glob("*/*/*") if p.is_dir())
    owner, name = repo.split("/")
    dest = cache / f"{owner}___{name}" / "default" / "0.0.0" / built.name
    dest.parent.mkdir(parents=True)
    built.rename(dest)
    for f in dest.glob("parquet-*.arrow"):
        f.rename(dest / f.name.replace("parquet-", f"{name}-"))


@pytest.mark.parametrize("streaming", [False, True])
def test_named_hub_dataset_from_the_offline_cache(tmp_path, monkeypatch, streaming):
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    train = table([GOOD[0]] * 6, pa.uint8())
    test = table([GOOD[1]] * 2, pa.uint8())
    fake_hub_cache(cache, "eminorhan/neural-pile-primate", {"train": train, "test": test})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    for split, rows in [("train", [GOOD[0]] * 6), ("test", [GOOD[1]] * 2)]:
        cfg = cfg_for(None, dataset="primate", streaming=streaming, split=split, seq_len=1)
        prepare_dataset(cfg)
        got = tokens_of(build_dataloader(cfg, 0, 1, infinite=False))
        expected = np.concatenate([tokenize_row(np.array(r)) for r in rows]).tolist()
        assert got == expected[: len(got)] and len(expected) - len(got) < 2


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("fmt", ["parquet", "arrow", "parquet glob"])
def test_files(tmp_path, monkeypatch, streaming, fmt):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rows = [GOOD[i % 2] for i in range(10)]
    t = table(rows, pa.uint8())
    if fmt == "arrow":
        path = str(tmp_path / "rows.arrow")
        with pa.ipc.new_stream(path, t.schema) as writer:  # the IPC stream format
            writer.write_table(t, max_chunksize=3)
    else:
        pq.write_table(t.slice(0, 6), tmp_path / "rows-0.parquet", row_group_size=3)
        pq.write_table(t.slice(6), tmp_path / "rows-1.parquet", row_group_size=3)
        path = str(tmp_path / ("rows-*.parquet" if fmt == "parquet glob" else "rows-0.parquet"))
        rows = rows if fmt == "parquet glob" else rows[:6]
    cfg = cfg_for(path, streaming=streaming, seq_len=1)
    prepare_dataset(cfg)
    loader = build_dataloader(cfg, 0, 1, infinite=False)
    expected = np.concatenate([tokenize_row(np.array(r)) for r in rows]).tolist()
    got = tokens_of(loader)
    assert got == expected[: len(got)] and len(expected) - len(got) < 2
    if streaming and fmt == "parquet glob":
        assert loader.reader.units.num_units == 4  # one unit per row group: cheap resume
    with pytest.raises(ConfigError, match="no split 'test'; it has: train"):
        build_dataloader(cfg_for(path, split="test"), 0, 1)


def test_a_glob_keeps_the_splits_its_file_names_give(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = tmp_path / "data"  # the Neural Pile's layout on the Hub
    data.mkdir()
    pq.write_table(table([GOOD[0]] * 3, pa.uint8()), data / "train-00000-of-00001.parquet")
    pq.write_table(table([GOOD[1]] * 2, pa.uint8()), data / "test-00000-of-00001.parquet")
    path = str(data / "*.parquet")
    for split, row in (("train", GOOD[0]), ("test", GOOD[1])):
        loader = build_dataloader(cfg_for(path, split=split, seq_len=1), 0, 1, infinite=False)
        got = tokens_of(loader)
        expected = tokenize_row(np.array(row)).tolist()
        assert got[: len(expected)] == expected, split  # never the other split's rows
    (data / "extra.parquet").write_bytes((data / "test-00000-of-00001.parquet").read_bytes())
    with pytest.raises(ConfigError, match="matches files of the splits test, train and files"):
        build_dataloader(cfg_for(path), 0, 1)


# ----------------------------------------------------------------------------- prepare_dataset


def test_prepare_generates_synthetic_once(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for(None, dataset="synthetic")
    cfg.data.synthetic_rows = 6
    prepare_dataset(cfg)
    out = tmp_path / "data_cache" / "synthetic-6rows-seed0"
    assert (out / "dataset_dict.json").is_file()
    stamp = (out / "train" / "state.json").stat().st_mtime_ns
    prepare_dataset(cfg)  # idempotent: nothing rewritten
    assert (out / "train" / "state.json").stat().st_mtime_ns == stamp
    x, y = next(build_dataloader(cfg, 0, 1))
    assert x.shape == (1, 4)
    # another size (a recipe with more rows) gets its own folder, never the first one
    cfg.data.synthetic_rows = 7
    prepare_dataset(cfg)
    assert synthetic.read_params(tmp_path / "data_cache" / "synthetic-7rows-seed0")["rows"] == 7
    # a dataset_path generated with other settings is used as it is, with a warning
    cfg.training.dataset_path, cfg.data.synthetic_rows = str(out), 8
    prepare_dataset(cfg)
    assert "not the configured 8 rows" in caplog.text


def test_prepare_is_atomic(tmp_path, monkeypatch):
    cfg = cfg_for(str(tmp_path / "syn"), dataset="synthetic")
    cfg.data.generate_synthetic = True  # a dataset path is generated into only when asked
    real_save = DatasetDict.save_to_disk

    def crash(self, path, **kw):
        real_save(self, path, **kw)  # the data is written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetDict, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg)
    assert not (tmp_path / "syn").exists()  # nothing that looks complete
    monkeypatch.setattr(DatasetDict, "save_to_disk", real_save)
    prepare_dataset(cfg)
    assert (tmp_path / "syn" / "synthetic.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no temp folder left over
