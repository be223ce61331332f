"""Tokenization and packing against hand-computed token streams (issue 3, acceptance 1):
separator 255 opening every time bin, counts clipped to 254 (a stored 255 included),
time-major order, rows of one neuron and of one time bin, and windows of seq_len + 1
tokens that cut through a time bin and through row boundaries, map-style and streamed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset, DatasetDict, NamedSplit
from datasets.table import InMemoryTable

from titan.config import JobConfig
from titan.data import build_dataloader, tokenize_row
from titan.data.tokenizer import arrow_row_matrix

A = [[1, 2, 3], [4, 255, 6]]  # 2 neurons x 3 bins, with a stored 255
B = [[7, 8]]  # one neuron
C = [[9], [10], [11]]  # one time bin
TOKENS_A = [255, 1, 4, 255, 2, 254, 255, 3, 6]
TOKENS_B = [255, 7, 255, 8]
TOKENS_C = [255, 9, 10, 11]


def save_rows(path, rows) -> str:
    table = pa.table({"spike_counts": pa.array(rows, type=pa.list_(pa.list_(pa.uint8())))})
    ds = Dataset(InMemoryTable(table), split=NamedSplit("train"))
    DatasetDict({"train": ds}).save_to_disk(str(path))
    return str(path)


def loader_cfg(path: str, seq_len: int, batch_size: int, streaming: bool) -> JobConfig:
    cfg = JobConfig()
    cfg.training.dataset, cfg.training.dataset_path = "custom", path
    cfg.training.seq_len, cfg.training.batch_size = seq_len, batch_size
    cfg.data.shuffle, cfg.data.streaming, cfg.data.prefetch = False, streaming, 2
    return cfg


def test_hand_rows_tokenize_exactly():
    assert tokenize_row(np.array(A, dtype=np.uint8)).tolist() == TOKENS_A
    assert tokenize_row(np.array(B)).tolist() == TOKENS_B  # int64 input works too
    assert tokenize_row(np.array(C, dtype=np.uint8)).tolist() == TOKENS_C
    assert tokenize_row(np.array(A)).dtype == np.uint8


def test_tokenize_rejects_non_matrices_and_out_of_range():
    with pytest.raises(ValueError):
        tokenize_row(np.array([1, 2, 3]))
    with pytest.raises(ValueError):
        tokenize_row(np.array([[1, 256]]))
    with pytest.raises(ValueError):
        tokenize_row(np.array([[-1, 2]]))


def test_arrow_path_equals_numpy_path():
    rng = np.random.default_rng(0)
    mats = [rng.integers(0, 256, size=(n, t)) for n, t in [(1, 7), (5, 1), (13, 29)]]
    small = [rng.integers(0, 128, size=(n, t)) for n, t in [(2, 3), (4, 9)]]  # int8's range
    for value_type in (pa.uint8(), pa.int32(), pa.int8()):
        if value_type == pa.int8():
            mats = small
        arr = pa.array([m.tolist() for m in mats], type=pa.list_(pa.list_(value_type)))
        for i, m in enumerate(mats):
            counts, why = arrow_row_matrix(arr.slice(i, 1))
            assert why == ""
            assert np.array_equal(tokenize_row(counts), tokenize_row(m))
            # the reference definition, bin by bin
            ref = [tok for t in range(m.shape[1]) for tok in [255, *np.minimum(m[:, t], 254)]]
            assert tokenize_row(counts).tolist() == ref


@pytest.mark.parametrize("streaming", [False, True])
def test_windows_cut_through_bins_and_rows(tmp_path, streaming):
    path = save_rows(tmp_path / "hand", [A, B, C])
    # stream: A B C = 17 tokens; windows of seq_len + 1 = 4 tokens, 2 per batch
    w0, w1, w2, w3 = [255, 1, 4, 255], [2, 254, 255, 3], [6, 255, 7, 255], [8, 255, 9, 10]
    loader = build_dataloader(loader_cfg(path, 3, 2, streaming), 0, 1, infinite=False)
    batches = list(loader)
    assert len(batches) == 2  # the leftover [11] does not make a batch
    for (inputs, labels), windows in zip(batches, [[w0, w1], [w2, w3]], strict=True):
        assert inputs.dtype == labels.dtype == torch.int64
        assert inputs.tolist() == [w[:-1] for w in windows]
        assert labels.tolist() == [w[1:] for w in windows]


def test_epochs_follow_each_other_in_one_stream(tmp_path):
    path = save_rows(tmp_path / "hand", [A, B, C])
    loader = build_dataloader(loader_cfg(path, 3, 1, False), 0, 1)  # infinite by default
    windows = []
    for _ in range(6):
        inputs, labels = next(loader)
        windows.append(inputs[0].tolist() + labels[0, -1:].tolist())  # the seq_len + 1 tokens
    stream = (TOKENS_A + TOKENS_B + TOKENS_C) * 2
    assert windows == [stream[4 * i : 4 * i + 4] for i in range(6)]
    assert windows[4] == [11, 255, 1, 4]  # epoch 0's leftover opens epoch 1's first window
    loader.close()
