"""Evaluate a checkpoint on held-out data (the test split by default).

    torchrun --nproc_per_node 2 evaluate.py --job.config_file train_configs/debug_model.toml
    python evaluate.py --job.config_file X.toml --eval.checkpoint outputs/run/checkpoint/step-100

Writes <step directory>.eval-<split>.json beside the checkpoint and prints a table;
`python evaluate.py --help` lists every key ([eval] is this command's section).
"""

import sys

from titan.distributed import exit_process
from titan.evaluate import main

if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
