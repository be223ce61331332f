"""Train a Llama-3.1 model from a TOML recipe.

    torchrun --nproc_per_node 2 train.py --job.config_file train_configs/debug_model.toml
    python train.py --job.config_file train_configs/primate_8b_131k.toml --job.dry_run
    python train.py --help

Any recipe key can be overridden: --section.key=value, --section.key value, or for
booleans a bare --section.flag / --section.no_flag.
"""

import sys

from titan.distributed import exit_process
from titan.trainer import main

if __name__ == "__main__":  # the guard is required: async checkpointing spawns processes
    exit_process(main(sys.argv[1:]))
