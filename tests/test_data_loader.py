"""The sharded, resumable loader on small synthetic datasets, map-style and streaming:
every row once per epoch over 2 and 4 ranks (acceptance 2); save after k batches,
rebuild, restore and get the uninterrupted run's next batches bit for bit (acceptance 3);
a resume reads no consumed row; a restore onto another data-parallel degree (also twice in
a row) neither repeats nor skips a token of any row; fewer rows than ranks; identical
batches for peers of one DP rank; epoch-end log lines; state checks."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from itertools import pairwise

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from titan.config import ConfigError, JobConfig
from titan.data import build_dataloader
from titan.data.synthetic import generate

MODES = ["map", "stream"]
SHARDS = 5  # streaming units of the 24-row dataset: 5, 5, 5, 5 and 4 rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "syn"
    return str(generate(out, rows=24, seed=3, neurons=(2, 6), bins=(8, 40), max_values=120))


def make_cfg(path: str, mode: str, seq_len: int = 16, batch_size: int = 2) -> JobConfig:
    cfg = JobConfig()
    cfg.training.dataset, cfg.training.dataset_path = "custom", path
    cfg.training.seq_len, cfg.training.batch_size, cfg.training.seed = seq_len, batch_size, 7
    cfg.data.streaming, cfg.data.stream_shards, cfg.data.prefetch = mode == "stream", SHARDS, 3
    return cfg


def all_row_ids(path: str, mode: str) -> set:
    train = load_from_disk(path)["train"]
    if mode == "map":
        return set(range(len(train)))
    sizes = [len(train.shard(SHARDS, j, contiguous=True)) for j in range(SHARDS)]
    return {(j, r) for j, n in enumerate(sizes) for r in range(n)}


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def restored(cfg: JobConfig, state: dict, rank: int, world: int):
    loader = build_dataloader(cfg, rank, world)
    loader.load_state_dict(state)
    return loader


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [2, 4])
def test_every_row_once_per_epoch(data_dir, mode, world):
    cfg = make_cfg(data_dir, mode)
    traces = [build_dataloader(cfg, r, world).trace_rows(epochs=2) for r in range(world)]
    expected = all_row_ids(data_dir, mode)
    for epoch in (0, 1):
        per_rank = [[rid for e, rid, _ in t if e == epoch] for t in traces]
        union = [rid for rows in per_rank for rid in rows]
        assert sorted(union) == sorted(expected)  # each row exactly once
        assert all(per_rank)
    orders = [[rid for e, rid, _ in traces[0] if e == epoch] for epoch in (0, 1)]
    assert orders[0] != orders[1]  # reshuffled


@pytest.mark.parametrize("mode", MODES)
def test_batches_are_the_rows_tokens_in_order(data_dir, mode):
    """A rank's batches tile the concatenation of its rows' tokens."""
    from titan.data import tokenize_row

    cfg = make_cfg(data_dir, mode)
    loader = build_dataloader(cfg, 1, 2, infinite=False)
    rows = loader.trace_rows()
    train = load_from_disk(data_dir)["train"]
    if mode == "stream":
        bounds = np.cumsum([0] + [len(train.shard(SHARDS, j, contiguous=True)) for j in range(5)])
        rows = [(e, int(bounds[j] + r), off) for e, (j, r), off in rows]
    stream = np.concatenate([tokenize_row(np.array(train[i]["spike_counts"])) for _, i, _ in rows])
    got = np.concatenate([torch.cat([x, y[:, -1:]], 1).reshape(-1).numpy() for x, y in loader])
    assert len(stream) - len(got) < cfg.training.batch_size * (cfg.training.seq_len + 1)
    assert np.array_equal(got, stream[: len(got)])


def test_peers_of_one_dp_rank_get_identical_batches(data_dir):
    cfg = make_cfg(data_dir, "map")
    a, b = build_dataloader(cfg, 1, 2), build_dataloader(cfg, 1, 2)
    for (xa, ya), (xb, yb) in zip(take(a, 5), take(b, 5), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ----------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [0, 5, 60])
def test_resume_gives_the_uninterrupted_batches(data_dir, mode, k):
    cfg = make_cfg(data_dir, mode)
    reference = take(build_dataloader(cfg, 1, 2), k + 8)
    first = build_dataloader(cfg, 1, 2)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # plain data, survives a round trip
    first.close()
    if k == 60:
        assert state["epoch"] >= 1  # the resume point lies past an epoch end
    resumed = restored(cfg, state, 1, 2)
    for (x, y), (rx, ry) in zip(take(resumed, 8), reference[k:], strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_iterating_after_close_goes_on(data_dir):
    cfg = make_cfg(data_dir, "map")
    reference = take(build_dataloader(cfg, 0, 2), 8)
    loader = build_dataloader(cfg, 0, 2)
    take(loader, 5)  # (more are prefetched)
    loader.close()
    for (x, y), (rx, ry) in zip(take(loader, 3), reference[5:], strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize("mode", MODES)
def test_state_is_small(data_dir, mode):
    loader = build_dataloader(make_cfg(data_dir, mode), 0, 2)
    take(loader, 9)
    state = loader.state_dict()
    assert {"dp_rank", "dp_world", "epoch", "unit", "row", "offset"} <= set(state)
    assert (state["dp_rank"], state["dp_world"]) == (0, 2)
    assert len(json.dumps(state)) < 2000


def test_resume_reads_no_consumed_row(data_dir):
    cfg = make_cfg(data_dir, "map")
    cfg.data.prefetch = 1
    train = load_from_disk(data_dir)["train"]
    tokens = sum(len(m[0]) * (len(m) + 1) for m in train["spike_counts"])
    loader = build_dataloader(cfg, 0, 1)
    take(loader, int(0.9 * tokens / (2 * 17)))  # 90% into epoch 0
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["unit"] > 15
    late = restored(cfg, state, 0, 1)
    first_row = late.trace_rows()[0]
    assert first_row[2] == state["offset"]  # it starts inside the row it stopped in
    late = restored(cfg, state, 0, 1)
    next(late)
    late.close()
    # the row it stopped in plus what one batch and the prefetch queue need, not ~100 rows
    assert late.rows_read <= 6


# ----------------------------------------------------------------------------- resharding


def consumed_records(cfg, loader, trace, n: int):
    """Consume n batches; the (epoch, row, start, end) token ranges they used, end None for
    'to the end of the row', and the loader's state."""
    take(loader, n)
    state = loader.state_dict()
    loader.close()
    epoch, rid, offset = restored(cfg, state, state["dp_rank"], state["dp_world"]).trace_rows()[0]
    records = []
    for e, r, start in trace:
        if (e, r) == (epoch, rid):
            if offset > start:
                records.append((e, r, start, offset))
            return records, state
        records.append((e, r, start, None))
    raise AssertionError("the saved position is not on the loader's path")


def batches_until_epoch(loader, epoch: int) -> int:
    n = 0
    while loader.state_dict()["epoch"] < epoch:
        next(loader)
        n += 1
    loader.close()
    return n


def check_each_token_once(records, expected: set, last_epoch: int):
    ranges = defaultdict(list)
    for e, rid, start, end in records:
        ranges[e, rid].append((start, end))
    for epoch in range(last_epoch + 1):
        assert {rid for e, rid in ranges if e == epoch} == expected, f"epoch {epoch}"
    for key, rs in ranges.items():
        rs.sort(key=lambda r: r[0])
        assert rs[0][0] == 0, (key, rs)
        for (_, end), (start, _) in pairwise(rs):
            assert end == start, (key, rs)  # no gap, no overlap
        assert rs[-1][1] is None, (key, rs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("worlds", [(2, 1), (2, 4), (4, 2), (4, 2, 3)])
def test_reshard_neither_repeats_nor_skips(data_dir, mode, worlds, caplog):
    caplog.set_level(logging.INFO, logger="titan")
    cfg = make_cfg(data_dir, mode)
    records, states = [], None
    for stage, world in enumerate(worlds[:-1]):
        loaders = [build_dataloader(cfg, r, world) for r in range(world)]
        if states is not None:
            for loader in loaders:
                loader.load_state_dict({"resharded_from": states})
        traces = [loader.trace_rows(epochs=4) for loader in loaders]
        counts = [3 + 11 * r + 17 * stage for r in range(world)]  # ranks at different points
        if stage == 0:  # rank 0 runs 3 batches into epoch 1
            counts[0] = 3 + batches_until_epoch(build_dataloader(cfg, 0, world), 1)
        states = []
        for loader, trace, n in zip(loaders, traces, counts, strict=True):
            recs, state = consumed_records(cfg, loader, trace, n)
            records += recs
            states.append(state)
    last_epoch = max(s["epoch"] for s in states)
    assert last_epoch >= 1
    for rank in range(worlds[-1]):
        loader = build_dataloader(cfg, rank, worlds[-1])
        loader.load_state_dict({"resharded_from": states})
        start_epoch = loader.state_dict()["epoch"]
        for e, rid, start in loader.trace_rows(epochs=last_epoch - start_epoch + 1):
            records.append((e, rid, start, None))
    check_each_token_once(records, all_row_ids(data_dir, mode), last_epoch)
    assert "resharded the loader state" in caplog.text


def test_reshard_after_the_ranks_drifted_epochs_apart(data_dir):
    # Ranks drift apart (rows differ in length): old rank 0 is two epochs ahead. A new rank
    # whose units old rank 0 already read in an epoch reads nothing there, and goes on.
    cfg = make_cfg(data_dir, "map")
    ahead, behind = build_dataloader(cfg, 0, 2), build_dataloader(cfg, 1, 2)
    while ahead.state_dict()["epoch"] < 2:
        next(ahead)
    take(behind, 1)
    olds = [ahead.state_dict(), behind.state_dict()]
    ahead.close()
    behind.close()
    for rank in range(4):
        new = restored(cfg, {"resharded_from": olds}, rank, 4)
        take(new, 200)
        new.close()


def test_reshard_then_exact_resume(data_dir):
    """A state saved after a reshard (it carries the old layout) resumes exactly."""
    cfg = make_cfg(data_dir, "map")
    olds = []
    for r in range(2):
        loader = build_dataloader(cfg, r, 2)
        take(loader, 4 + 9 * r)
        olds.append(loader.state_dict())
    a = build_dataloader(cfg, 0, 1)
    a.load_state_dict({"resharded_from": olds})
    reference = take(a, 12)
    b = build_dataloader(cfg, 0, 1)
    b.load_state_dict({"resharded_from": olds})
    take(b, 5)
    c = restored(cfg, b.state_dict(), 0, 1)
    assert c.state_dict()["layers"]
    for (x, _), (rx, _) in zip(take(c, 7), reference[5:], strict=True):
        assert torch.equal(x, rx)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("mode", MODES)
def test_fewer_rows_than_ranks(tmp_path, mode, caplog):
    path = str(generate(tmp_path / "tiny", rows=3, seed=1, neurons=(2, 3), bins=(8, 12)))
    cfg = make_cfg(path, mode, seq_len=8)
    loaders = [build_dataloader(cfg, r, 4) for r in range(4)]
    batches = [take(loader, 3) for loader in loaders]  # no hang, no crash
    assert "rows repeat across ranks" in caplog.text
    for (x3, _), (x0, _) in zip(batches[3], batches[0], strict=True):
        assert torch.equal(x3, x0)  # rank 3 reads what rank 0 reads
    for loader in loaders:
        loader.close()


def test_epoch_end_is_logged_when_consumed(data_dir, caplog):
    caplog.set_level(logging.INFO, logger="titan")
    loader = build_dataloader(make_cfg(data_dir, "map"), 0, 2)
    take(loader, 10)
    assert "finished epoch 0" not in caplog.text
    take(loader, 60)
    assert "data: rank 0 finished epoch 0" in caplog.text
    loader.close()


def test_finite_loader_stops_after_one_epoch(data_dir):
    loader = build_dataloader(make_cfg(data_dir, "stream"), 0, 2, infinite=False)
    assert 10 < sum(1 for _ in loader) < 100


def test_state_checks(data_dir):
    cfg = make_cfg(data_dir, "map")
    loader = build_dataloader(cfg, 0, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="resharded_from"):
        build_dataloader(cfg, 1, 2).load_state_dict(state)
    four = [build_dataloader(cfg, r, 4).state_dict() for r in range(4)]
    for olds in (four[:2], [four[1], four[0], four[2], four[3]]):  # partial; out of order
        with pytest.raises(ValueError, match="needs the states of ranks 0..") as e:
            build_dataloader(cfg, 0, 3).load_state_dict({"resharded_from": olds})
        assert "\n" not in str(e.value)
    other = make_cfg(data_dir, "map")
    other.training.seed = 8
    with pytest.raises(ConfigError, match="exclude_from_loading"):
        build_dataloader(other, 0, 2).load_state_dict(state)
    with pytest.raises(ConfigError, match="exclude_from_loading"):
        build_dataloader(make_cfg(data_dir, "stream"), 0, 2).load_state_dict(state)
    with pytest.raises(ValueError):
        build_dataloader(cfg, 2, 2)


def test_a_position_carried_to_other_data_of_the_same_shape_is_logged(data_dir, tmp_path, caplog):
    """A moved dataset folder (or other data with as many rows) passes the state check,
    and the run says that it continues at the saved position; the same folder named by
    another path (relative here, absolute there) is the same data."""
    cfg = make_cfg(data_dir, "map")
    first = build_dataloader(cfg, 0, 1)
    take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    expected = next(first)[0]
    first.close()
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    caplog.set_level(logging.WARNING, logger="titan")
    relative = os.path.relpath(data_dir)
    for state_, path, warned in [
        (state, data_dir, False),
        (state, relative, False),
        ({k: v for k, v in state.items() if k != "source"}, str(moved), False),  # older state
        (state, str(moved), True),
    ]:
        caplog.clear()
        loader = restored(make_cfg(path, "map"), state_, 0, 1)
        assert torch.equal(next(loader)[0], expected)  # the same position either way
        loader.close()
        lines = [
            r.getMessage() for r in caplog.records if "saved loader position" in r.getMessage()
        ]
        assert len(lines) == warned, lines
        if warned:
            assert lines[0].startswith(f"data: the saved loader position was reading {data_dir}; ")
            assert f"this run reads {moved}, whose fingerprint" in lines[0] and "\n" not in lines[0]
