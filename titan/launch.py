"""torchrun, with titan's endings: `python -m titan.launch` takes torchrun's arguments.

    python -m titan.launch --standalone --nproc_per_node 8 train.py --job.config_file X.toml

It runs torchrun's own launcher in this process, and adds:

- the recipe is checked once before any worker starts (configuration, paths, the mesh for
  this many ranks): a mistake is one `error:` line and exit status 2, with no workers
  started, restarted, or reported on by torchrun (TITAN_CHECK_ONLY=1: only the check);
- the run's exit status is the workers' (see `titan.cli`: 2 bad input, 3 diverged, 4 save
  failed, 5 stuck rank, 6 stopped on a signal unsaved, 75 stopped after saving, 130
  interrupted), read from the status file the workers write, and the line the workers
  printed is the only report; torchrun's own report appears only for a crash titan did
  not expect;
- SIGTERM and SIGUSR1 reach the workers (which save and stop), and workers get
  `TITAN_SHUTDOWN_TIMEOUT_S` (default 900 s) to finish that save before torchrun kills them.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from titan.checkpoint import CheckpointError
from titan.cli import (
    EXIT_BAD_INPUT,
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STUCK,
    STOPPED,
    printed_file,
    read_status,
)
from titan.config import ConfigError, load_config
from titan.distributed import check_only

SCRIPTS = ("train.py", "evaluate.py")
OWN_CODES = {*EXIT_CODES.values(), EXIT_STUCK, EXIT_INTERRUPTED}
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def _precheck(script: str, script_args: list[str], world: int | None) -> None:
    """The recipe as the script would check it before its heavy work (nothing written)."""
    from titan.distributed import ParallelDims
    from titan.evaluate import planned
    from titan.preflight import check_dry_run

    cfg = load_config(script_args)
    if cfg.job.config_file is None:
        raise ConfigError("no recipe: pass --job.config_file FILE (--help lists every key)")
    training = Path(script).name == "train.py"
    if world is not None:
        ParallelDims.from_config(cfg, world, "cpu", training=training)
    if cfg.job.dry_run:
        return  # the script's own dry run checks
    if training:
        check_dry_run(cfg)
    else:
        planned(cfg)


def _world(args) -> int | None:
    """Ranks the launch will start, when fixed: nnodes `N` or `N:N` (torchrun's default
    and --standalone's `1:1`) and an integer nproc_per_node; None for an elastic range or
    `gpu`/`auto` per node."""
    low, _, high = str(args.nnodes).partition(":")
    try:
        nodes = int(low)
        if high and int(high) != nodes:
            return None
        return nodes * int(args.nproc_per_node)
    except (TypeError, ValueError):
        return None


class _OwnEndings(logging.Filter):
    """Drops torchrun's lines about an ending titan has already reported in one line: the
    "failed (exitcode: N)" line for one of titan's statuses, and the "closing signal" lines
    for the ranks still running once the first has ended with one (it wrote the status
    file before exiting)."""

    def __init__(self, status_path: Path) -> None:
        super().__init__()
        self.status_path = status_path

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "closing signal" in text:
            status = read_status(self.status_path)
            return status is None or status[0] == EXIT_OK
        return not any(f"(exitcode: {code})" in text for code in OWN_CODES)


def _unprinted(status_path: Path, message: str) -> bool:
    """Whether rank 0 did not print the status's line (it records what it printed)."""
    try:
        return bool(message) and printed_file(status_path).read_text() != message
    except OSError:
        return bool(message)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not hasattr(args, "signals_to_handle"):
        import torch

        print(
            f"error: torch {torch.__version__}'s torchrun cannot pass SIGUSR1 (Slurm's warning "
            "signal) to the workers, so a run would die instead of saving; install torch >= 2.9",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_BAD_INPUT
    script = Path(args.training_script)
    if not (args.module or args.no_python or script.is_file()):  # torchrun: a 30-line report
        print(
            f"error: {script}: no such script; name the script to run (e.g. train.py) "
            "after the launcher's options",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_BAD_INPUT
    wants_help = {"--help", "-h"} & set(args.training_script_args)
    if script.name in SCRIPTS and not wants_help:
        try:
            _precheck(args.training_script, args.training_script_args, _world(args))
        except (ConfigError, CheckpointError) as e:  # the preflight refuses another model
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
    if check_only():  # the Slurm launcher checks once, before srun starts every node's
        return EXIT_OK
    if args.signals_to_handle == "SIGTERM,SIGINT,SIGHUP,SIGQUIT":
        args.signals_to_handle = SIGNALS  # torchrun's default leaves out Slurm's SIGUSR1
    timeout = os.environ.get("TITAN_SHUTDOWN_TIMEOUT_S", "900")
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", timeout)
    with tempfile.TemporaryDirectory(prefix="titan-launch-") as tmp:
        status_path = Path(tmp) / "status.json"
        os.environ["TITAN_STATUS_FILE"] = str(status_path)
        endings = _OwnEndings(status_path)
        for handler in logging.getLogger().handlers + logging.getLogger("torch").handlers:
            handler.addFilter(endings)
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(endings)
        try:
            run(args)
        except ChildFailedError as e:
            status = read_status(status_path)
            codes = {failure.exitcode for failure in e.failures.values()}
            if status is None or status[0] == EXIT_OK or status[0] not in codes:
                print(e.format_msg(), file=sys.stderr, flush=True)  # a crash titan did not report
                return 1
            if _unprinted(status_path, status[1]):
                # another rank ended alone (e.g. its share of the data is empty) and rank 0,
                # which prints the line, failed otherwise: say why the run ended
                prefix = "stopped" if status[0] in STOPPED else "error"
                print(f"{prefix}: {status[1]}", file=sys.stderr, flush=True)
            return status[0]
        except SignalException as e:
            status = read_status(status_path)
            return status[0] if status is not None else 128 + int(e.sigval)
        status = read_status(status_path)
        return status[0] if status is not None else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
