"""What the commands (`train.py`, `evaluate.py`) share: the recipe on the command line,
`--help`, and turning how a run ended into one line and an exit status.

Exit statuses (Slurm chains and `afterok` dependencies rely on them):

    0   done
    2   bad input: configuration, paths, an unusable checkpoint, a folder in use
    3   the run diverged: non-finite steps (too many in a row, or at the end)
    4   a checkpoint could not be saved (no space, unwritable folder, a failed rank)
    5   a collective timed out: a rank is stuck or gone (job.collective_timeout_s)
    6   stopped on a signal with checkpointing off: nothing saved, a rerun starts over
    75  stopped on a signal after saving a complete checkpoint: run it again to continue
    130 interrupted (Ctrl-C, SIGINT): nothing saved since the last checkpoint

Each is printed as one `error: ...` line by rank 0 (6, 75 and 130: `stopped: ...`). When
the launcher sets TITAN_STATUS_FILE, every rank also writes {"exit_code", "message"} there
(whole, by rename), since torchrun's own exit status does not carry the workers', and
torchrun may stop the other ranks as soon as the first has ended.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist

from titan.checkpoint import CheckpointError, CheckpointSaveError
from titan.config import ConfigError, JobConfig, format_help, load_config
from titan.distributed import RanksDidNotJoin, env_rank, restart_count, status_file
from titan.files import written_atomically

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_SAVE_FAILED, EXIT_STUCK = 0, 2, 3, 4, 5
EXIT_STOPPED_UNSAVED = 6
EXIT_INTERRUPTED = 130  # the shell's 128 + SIGINT
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: try again later (a Slurm launcher requeues)


class OneLineParser(argparse.ArgumentParser):
    """argparse for the scripts' own options: a usage mistake is one `error:` line and
    exit status 2, like every other bad input, not argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


class TrainingDiverged(RuntimeError):
    """Non-finite steps; the message is one line."""


class StoppedOnSignal(RuntimeError):
    """A signal asked the run to stop and a complete checkpoint was saved."""


class StoppedUnsaved(RuntimeError):
    """A signal asked the run to stop and, with checkpointing off, nothing was saved:
    running it again starts over, so nothing must requeue it as resumable."""


EXIT_CODES: dict[type[Exception], int] = {
    ConfigError: EXIT_BAD_INPUT,
    CheckpointError: EXIT_BAD_INPUT,
    TrainingDiverged: EXIT_DIVERGED,
    CheckpointSaveError: EXIT_SAVE_FAILED,
    StoppedOnSignal: EXIT_STOPPED,
    StoppedUnsaved: EXIT_STOPPED_UNSAVED,
    RanksDidNotJoin: EXIT_STUCK,
}
STOPPED = (EXIT_STOPPED, EXIT_STOPPED_UNSAVED, EXIT_INTERRUPTED)
"""The statuses printed as `stopped: ...` rather than `error: ...`."""


def _timed_out(error: BaseException) -> bool:
    """Whether a collective gave up waiting for its peers (gloo: "Timed out waiting")."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("Timed out" in text or "timed out" in text)


def printed_file(status: str | Path) -> Path:
    """Where rank 0 records the line it printed (beside the status file): the launcher
    prints the status's line itself when rank 0 did not (another rank ended alone)."""
    return Path(f"{status}.printed")


def _finish(code: int, message: str) -> int:
    rank, _, _ = env_rank()
    path = status_file()
    if message and rank == 0:  # every rank hits the same end; say it once
        prefix = "stopped" if code in STOPPED else "error"
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)
        if path is not None:
            with written_atomically(printed_file(path)) as tmp:
                tmp.write_text(message)
    if path is not None:  # every rank: the launcher may stop the others once one has ended
        with written_atomically(Path(path)) as tmp:
            tmp.write_text(json.dumps({"exit_code": code, "message": message}) + "\n")
    return code


NOT_RETRIED = " (not retried, a restart would end the same way:"


def read_status(path: str | Path | None) -> tuple[int, str] | None:
    """The (exit status, message) a worker wrote to the status file, if any."""
    try:
        status = json.loads(Path(path).read_text())
        return int(status["exit_code"]), status["message"]
    except (TypeError, OSError, ValueError, KeyError):
        return None


def _ended_for_good() -> tuple[int, str] | None:
    """After a torchrun restart: the previous attempt's ending when a restart cannot change
    it (bad input, a diverged run; the same steps would only be redone to end the same
    way) or must not (a stop signal that reached only the workers: the run was asked to
    stop). Storage failures and stuck ranks are retried."""
    if restart_count() == 0:
        return None
    previous = read_status(status_file())
    if previous is None or previous[0] not in (EXIT_BAD_INPUT, EXIT_DIVERGED, *STOPPED):
        return None
    return previous


def _wait_for_status(message: str, timeout_s: float = 30.0) -> None:
    """Wait (at most `timeout_s`) until rank 0 has written `message` to the status file,
    which it does after printing it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = read_status(status_file())
        if status is not None and status[1] == message:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def noting_ctrl_c() -> Iterator[list[int]]:
    """Python's SIGINT handler (raise KeyboardInterrupt) that also notes the signal in
    the list it yields: a library that catches the KeyboardInterrupt and raises its own
    error instead (safetensors does) must not turn a Ctrl-C into a bad input. Left as it
    is outside the main thread, or when SIGINT is not Python's default."""
    received: list[int] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield received
        return

    def note_and_raise(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, note_and_raise)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_command(prog: str, argv: list[str], body: Callable[[JobConfig], None]) -> int:
    """Parse the recipe and overrides, run `body(cfg)`, and return the exit status; the
    known endings print one line."""
    if "--help" in argv or "-h" in argv:
        print(format_help().replace("train.py", prog))
        return EXIT_OK
    if (previous := _ended_for_good()) is not None:
        code, message = previous
        message = (
            f"{message.split(NOT_RETRIED)[0]}{NOT_RETRIED} torchrun restart {restart_count()})"
        )
        if env_rank()[0] != 0:  # torchrun stops the others once one has ended: rank 0 first
            _wait_for_status(message)
        return _finish(code, message)
    ending: tuple[int, str, bool] | None = None
    try:
        with noting_ctrl_c() as ctrl_c:
            cfg = load_config(argv)
            if cfg.job.config_file is None:  # never start a long run on defaults alone
                usage = f"usage: {prog} --job.config_file FILE [--section.key=VALUE ...]"
                print(usage, file=sys.stderr)
                raise ConfigError(
                    "no recipe: pass --job.config_file FILE (e.g. "
                    "train_configs/debug_model.toml); --help lists every key"
                )
            body(cfg)
    except BaseException as e:
        ending = _ending(e, bool(ctrl_c), prog)
        if ending is None:
            raise
        return _finish(*ending[:2])
    finally:  # a stuck peer or a Ctrl-C: tearing the group down could wait for a peer
        if dist.is_initialized() and (ending is None or not ending[2]):
            dist.destroy_process_group()
    return _finish(EXIT_OK, "")


def _ending(e: BaseException, ctrl_c: bool, prog: str) -> tuple[int, str, bool] | None:
    """(exit status, message, whether to leave the process group as it is) of a command
    that raised `e`, after a Ctrl-C if `ctrl_c` (however the interrupt came out: DCP wraps
    it, a save failure is raised from it); None for an unexpected error (a bug: its
    traceback is wanted) or an exit."""
    if isinstance(e, (SystemExit, GeneratorExit)):
        return None
    if ctrl_c or isinstance(e, KeyboardInterrupt):
        training = (
            ": nothing saved since the last checkpoint; SIGTERM or SIGUSR1 stop a run after "
            "saving its step"
        )
        return EXIT_INTERRUPTED, "interrupted (SIGINT)" + training * (prog == "train.py"), True
    if type(e) in EXIT_CODES:
        return EXIT_CODES[type(e)], str(e), False
    if _timed_out(e):
        first = " ".join(str(e).split())[:200]
        message = (
            "a collective did not complete within job.collective_timeout_s: a rank is stuck "
            f"or gone (check every rank's log; {first})"
        )
        return EXIT_STUCK, message, True
    return None
