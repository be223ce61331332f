"""What the commands (`train.py`, `evaluate.py`) share: the recipe on the command line,
`--help`, and turning a run's ending into one line and an exit status.

Exit statuses (Slurm chains and `afterok` dependencies rely on them):

    0  done
    2  bad input: configuration, paths, an unusable checkpoint (one `error:` line)
    3  the run diverged: too many consecutive non-finite steps
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch.distributed as dist

from titan.checkpoint import CheckpointError
from titan.config import ConfigError, JobConfig, format_help, load_config
from titan.distributed import env_rank

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 2, 3


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the message is one line."""


EXIT_CODES: dict[type[Exception], int] = {
    ConfigError: EXIT_BAD_INPUT,
    CheckpointError: EXIT_BAD_INPUT,
    TrainingDiverged: EXIT_DIVERGED,
}


def run_command(prog: str, argv: list[str], body: Callable[[JobConfig], None]) -> int:
    """Parse the recipe and overrides, run `body(cfg)`, and return the exit status; the
    known failures print one `error:` line (rank 0 only: every rank hits the same one)."""
    if "--help" in argv or "-h" in argv:
        print(format_help().replace("train.py", prog))
        return EXIT_OK
    try:
        cfg = load_config(argv)
        if cfg.job.config_file is None:  # never start a long run on defaults alone
            print(
                f"usage: {prog} --job.config_file FILE [--section.key=VALUE ...]", file=sys.stderr
            )
            raise ConfigError(
                "no recipe: pass --job.config_file FILE (e.g. train_configs/debug_model.toml); "
                "--help lists every key"
            )
        body(cfg)
    except tuple(EXIT_CODES) as e:
        if env_rank()[0] == 0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_CODES[type(e)]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return EXIT_OK
