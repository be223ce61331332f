"""Data: Neural Pile sources, the spike-count tokenizer, the resumable sharded loader and the
synthetic data generator.

    prepare_dataset(cfg)                         # rank 0, then a barrier
    loader = build_dataloader(cfg, dp_rank, dp_world)
    for inputs, labels in loader: ...            # LongTensor (batch_size, seq_len)
"""

from titan.data.loader import SpikeDataLoader, build_dataloader, prepare_dataset
from titan.data.tokenizer import tokenize_row

__all__ = ["SpikeDataLoader", "build_dataloader", "prepare_dataset", "tokenize_row"]
