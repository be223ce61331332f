"""Run safety on 2 CPU ranks under `python -m titan.launch` (torchrun with titan's endings):

- SIGTERM to the job mid-run: the step in progress finishes, a complete checkpoint of it is
  written, the exit status is 75, and the rerun takes exactly the uninterrupted run's
  steps. The same with SIGUSR1 sent only to the agent, and with more SIGTERMs reaching the
  workers while they save.
- One owner per run folder: a second run on a live folder is refused with one line and the
  first's checkpoints are untouched; a lock left by kill -9 is taken over.
- A rewind with checkpoint.load_step sets the newer steps aside, so a later plain resume
  continues the chosen branch.
- Non-finite endings exit 3; a NaN planted in a saved weight is refused at load.
- A stopped rank (SIGSTOP) is reported within job.collective_timeout_s and the job exits
  non-zero instead of hanging.
- The commands end without interpreter teardown (`exit_process`), yet with their status,
  their exit handlers run and their buffered output written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    TRAIN_ENV,
    assert_refused,
    debug_args,
    launch_train,
    logged_step,
    read_metrics,
    run_train,
    running,
    train_command,
    train_losses,
    wait_for,
    worker_pids,
)

from titan.checkpoint import list_steps, read_marker, verify
from titan.config import ConfigError

STEPS = 40


def _args(dump: Path, data: Path, *extra: str) -> list[str]:
    return debug_args(
        dump,
        data,
        f"--training.steps={STEPS}",
        "--checkpoint.interval=10",
        "--checkpoint.keep_latest_k=0",
        *extra,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir) -> Path:
    dump = tmp_path_factory.mktemp("reference")
    result = run_train(_args(dump, synthetic_dir), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return dump


def _launch(dump: Path, data: Path, *extra: str) -> subprocess.Popen:
    return launch_train(_args(dump, data, *extra), launcher="titan.launch")


def _stop_and_check(proc: subprocess.Popen, dump: Path) -> tuple[int, str]:
    """After the signals: exit 75, and the newest step is complete, verified, and the one
    the run stopped at; returns (that step, the run's output)."""
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("stopped: "))
    step = int(line.split(" at step ")[1].split(":")[0])
    assert f"saved checkpoint step-{step}; run the same command again" in line
    newest = list_steps(dump / "checkpoint")[-1]
    assert newest.step == step and newest.complete and verify(newest.path) is None
    return step, out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm_job", "sigusr1_agent_only", "sigterm_twice"])
def test_signal_saves_the_step_and_the_rerun_is_exact(how, tmp_path, synthetic_dir, reference):
    proc = _launch(tmp_path, synthetic_dir)
    wait_for(lambda: logged_step(tmp_path) >= 13, proc)
    workers = worker_pids(tmp_path)
    assert len(workers) == 2
    if how == "sigusr1_agent_only":
        os.kill(proc.pid, signal.SIGUSR1)
    else:
        os.kill(proc.pid, signal.SIGTERM)  # the agent forwards it, as scancel/srun would
        # more, to the workers directly (as Slurm signals them too), every 50 ms for 3 s or
        # until they end: some land while they finish the step and while they save (a few
        # dozen log lines; nothing reads the run's output pipe until it ends)
        deadline = time.monotonic() + 3
        while how == "sigterm_twice" and time.monotonic() < deadline:
            live = [pid for pid in workers if running(pid)]
            if not live:
                break
            for pid in live:
                with contextlib.suppress(ProcessLookupError):  # ended since
                    os.kill(pid, signal.SIGTERM)
            time.sleep(0.05)
    step, out = _stop_and_check(proc, tmp_path)
    assert 13 <= step < STEPS
    assert "received: finishing this step, then saving and stopping" in out, out[-3000:]
    assert ("SIGTERM received again" in out) == (how == "sigterm_twice"), out[-3000:]
    result = run_train(_args(tmp_path, synthetic_dir), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {tmp_path / 'checkpoint' / f'step-{step}'}" in result.stdout
    assert train_losses(tmp_path) == train_losses(reference)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # one record per step after the resume


def test_one_run_per_folder_and_stale_locks(tmp_path, synthetic_dir):
    first = _launch(tmp_path, synthetic_dir, "--training.steps=400")
    wait_for(lambda: logged_step(tmp_path) >= 12, first)
    before = {p: read_marker(p) for p in (tmp_path / "checkpoint").glob("step-*")}
    assert before, "the first run had saved nothing yet"
    second = run_train(_args(tmp_path, synthetic_dir), nproc=1, timeout=120)
    assert second.returncode == 2
    err = second.stderr.strip()
    assert err.startswith(f"error: job.dump_folder = '{tmp_path}' is in use by a live run (host ")
    assert "\n" not in err
    dry = run_train([*_args(tmp_path, synthetic_dir), "--job.dry_run"], timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]  # the plan, with the start's refusal ahead
    assert f"A start now would be refused: job.dump_folder = '{tmp_path}' is in use" in dry.stdout
    # another dump folder, but the live run's checkpoint folder named by its absolute path
    elsewhere = tmp_path / "elsewhere"
    third = run_train(_args(elsewhere, synthetic_dir, f"--checkpoint.folder={tmp_path}/checkpoint"),
                      nproc=1, timeout=120)  # fmt: skip
    assert third.returncode == 2, third.stderr[-2000:]
    assert f"checkpoint.folder = '{tmp_path}/checkpoint' is in use by a live run" in third.stderr
    assert all(read_marker(p) == marker for p, marker in before.items())  # untouched
    os.killpg(first.pid, signal.SIGKILL)  # the agent; its workers die with it
    first.wait()
    deadline = time.monotonic() + 30
    while worker_pids(tmp_path):
        assert time.monotonic() < deadline, "the workers outlived their agent"
        time.sleep(0.1)
    assert json.loads((tmp_path / ".lock").read_text())["pid"]  # left behind by kill -9
    result = run_train(_args(tmp_path, synthetic_dir), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Taking over the run folder's lock" in result.stdout and "is gone" in result.stdout
    assert not (tmp_path / ".lock").exists()  # released at the end


def _sigint_as_in_a_terminal() -> None:
    """A run started from a terminal has SIGINT's default action (Python's Ctrl-C); a child
    of a background job would inherit it ignored, and Python keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signalled_during_set_up(args: list[str], *signals: int) -> tuple[int, str]:
    """(exit status, output) of a one-process run sent `signals` while its model is being
    built (the attention kernel is chosen first)."""
    proc = subprocess.Popen(
        train_command(1) + args,
        cwd=ROOT,
        env=TRAIN_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "Attention kernel" in line:
                for sig in signals:
                    proc.send_signal(sig)
                break
        out = "".join(seen) + proc.communicate(timeout=300)[0]
    finally:
        proc.kill()  # (a no-op once it has ended)
    return proc.returncode, out


@pytest.mark.parametrize("checkpointing", [True, False])
def test_a_signal_during_set_up_ends_with_75_and_nothing_saved(
    checkpointing, tmp_path, synthetic_dir
):
    """Caught from the start: the signals land while the model is being built (the
    attention kernel is chosen first), and a second one is ignored as well. With
    checkpointing off the status is 6: a rerun would start over, so nothing may requeue
    it as resumable."""
    args = _args(tmp_path, synthetic_dir, f"--checkpoint.enable_checkpoint={checkpointing}")
    returncode, out = _signalled_during_set_up(args, signal.SIGUSR1, signal.SIGTERM)
    if checkpointing:
        assert returncode == 75, out[-3000:]
        assert "stopped: SIGUSR1 during set-up, before step 1: nothing new to save" in out, out
        assert "SIGUSR1 received: stopping once set-up is done, with nothing new to save" in out
    else:
        assert returncode == 6, out[-3000:]
        assert "stopped: SIGUSR1 during set-up: checkpointing is off (checkpoint." in out, out
        assert "nothing was saved and a rerun starts at step 1" in out
        assert "SIGUSR1 received: stopping once set-up is done, with nothing new" in out
    assert "SIGTERM received again" in out
    assert not list((tmp_path / "checkpoint").glob("step-*")) and logged_step(tmp_path) == 0


@pytest.mark.parametrize("saving", [True, False])
def test_signal_lines_say_what_follows(saving, caplog, request):
    """The line a stop signal logs promises what the run will do: during set-up, nothing
    new to save; in the loop, the step then a save, or no save with checkpointing off."""
    from titan.lifecycle import StopSignals

    caplog.set_level(logging.WARNING, logger="titan")
    before = signal.getsignal(signal.SIGUSR1)
    request.addfinalizer(lambda: signal.signal(signal.SIGUSR1, before))  # even on a failure
    with StopSignals(["SIGUSR1"], saving) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
        stop.setting_up = False
        os.kill(os.getpid(), signal.SIGUSR1)
    loop = "then saving and stopping" if saving else "then stopping (checkpointing is off)"
    assert [r.getMessage() for r in caplog.records] == [
        "SIGUSR1 received: stopping once set-up is done, with nothing new to save",
        "SIGUSR1 received again: the run is already stopping (ignored)",
    ]
    caplog.clear()
    with StopSignals(["SIGUSR1"], saving) as stop:
        stop.setting_up = False
        os.kill(os.getpid(), signal.SIGUSR1)
    assert [r.getMessage() for r in caplog.records] == [
        f"SIGUSR1 received: finishing this step, {loop}"
    ]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN  # ignored until the process ends


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, synthetic_dir):
    """SIGINT (no save: that is what SIGTERM and SIGUSR1 are for) ends the run with one
    line, not a traceback."""
    returncode, out = _signalled_during_set_up(_args(tmp_path, synthetic_dir), signal.SIGINT)
    assert returncode == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert out.rstrip().splitlines()[-1].startswith("stopped: interrupted (SIGINT): nothing saved")


@pytest.mark.parametrize("surfaces_as", ["save error", "DCP's wrapper"])
def test_ctrl_c_is_130_whatever_error_it_surfaces_as(surfaces_as, tmp_path, capsys):
    """A Ctrl-C during a save or a load comes out as another error (a save failure raised
    while handling it, DCP's CheckpointException around it): still one `stopped:` line and
    130, not a failed save (4, which a launcher would retry) or a traceback."""
    from torch.distributed.checkpoint import CheckpointException

    from titan.checkpoint import CheckpointSaveError
    from titan.cli import run_command

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")

    def body(cfg) -> None:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt as e:
            if surfaces_as == "save error":
                raise CheckpointSaveError("could not save step-3") from None
            raise CheckpointException("load", {0: (e, None)}) from None

    argv = ["--job.config_file", str(ROOT / "train_configs" / "debug_model.toml"),
            f"--job.dump_folder={tmp_path}"]  # fmt: skip
    assert run_command("train.py", argv, body) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stopped: interrupted (SIGINT)"), err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_lock_is_written_whole_and_judges_its_owner(tmp_path, caplog):
    from titan.lifecycle import RunLock

    lock, path = RunLock(tmp_path), tmp_path / ".lock"

    def holder(**changes) -> None:
        path.write_text(json.dumps({**lock.me, "started": "earlier", **changes}))

    def taken(why: str) -> None:
        caplog.clear()
        lock.acquire()
        assert json.loads(path.read_text()) == lock.me and why in caplog.text, caplog.text
        lock.release()
        assert not path.exists()

    path.write_text("")  # unreadable (being written by hand?), refreshed now: left alone
    with pytest.raises(ConfigError, match="has an unreadable lock file"):
        lock.acquire()
    old = time.time() - 2 * RunLock.STALE_AFTER_S
    os.utime(path, (old, old))
    taken("it is unreadable and has not been refreshed for 10 minutes")
    holder(process_start="1")  # this very pid, but a process that started at another time
    taken("its pid now names a newer process")
    holder(boot_id="an-earlier-boot")
    taken("its host has rebooted since")
    holder(pid=1, pid_namespace="pid:[1]")  # another container: its pid cannot be checked
    with pytest.raises(ConfigError, match="is in use by a live run"):
        lock.acquire()
    holder(host="another-node", pid=1)
    with pytest.raises(ConfigError, match=r"in use by a live run \(host another-node, pid 1"):
        lock.acquire()
    os.utime(path, (old, old))
    taken("it has not been refreshed for 10 minutes")
    assert not list(tmp_path.glob(".lock.*"))  # no temporary file left behind

    # Two runs judged the same lock stale; the first took it and wrote its own: the
    # second finds a lock other than the one it judged and leaves it in place.
    judged = {**lock.me, "host": "another-node", "pid": 1}
    newer = {**lock.me, "host": "a-third-node", "pid": 2}
    path.write_text(json.dumps(newer))
    assert not lock._take_over(judged)
    assert json.loads(path.read_text()) == newer and not list(tmp_path.glob(".lock.*"))


def test_rewind_continues_the_chosen_branch(tmp_path, synthetic_dir):
    ckpt = tmp_path / "checkpoint"
    short = ("--training.steps=6", "--checkpoint.interval=2")
    assert run_train(_args(tmp_path, synthetic_dir, *short), nproc=2).returncode == 0
    # A rewind to a step that cannot be loaded is refused before anything is set aside.
    shutil.copytree(ckpt / "step-2", tmp_path / "step-2-copy")
    shard = next((ckpt / "step-2").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 1]))
    refused = run_train(_args(tmp_path, synthetic_dir, *short, "--checkpoint.load_step=2"), nproc=1)
    assert refused.returncode == 2 and "step-2 is corrupted" in refused.stderr
    assert [s.step for s in list_steps(ckpt)] == [2, 4, 6]
    shutil.rmtree(ckpt / "step-2")
    shutil.copytree(tmp_path / "step-2-copy", ckpt / "step-2")
    # Rewind to step 2 and go on to step 4 on a new branch (say, with another lr) ...
    rewind = ("--checkpoint.interval=2", "--checkpoint.load_step=2", "--optimizer.lr=1e-4")
    result = run_train(_args(tmp_path, synthetic_dir, "--training.steps=4", *rewind), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starts a new branch: set aside step-4, step-6 into" in result.stdout
    # ... then a plain resume (the crashed-and-resubmitted case) continues that branch ...
    result = run_train(_args(tmp_path, synthetic_dir, *short), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {ckpt / 'step-4'} at step 4" in result.stdout
    (branch,) = (ckpt / "branches").iterdir()
    assert sorted(p.name for p in branch.iterdir()) == ["metrics.jsonl", "step-4", "step-6"]
    # the abandoned steps' records went with them; the run's own log has this branch's
    assert [r["step"] for r in read_metrics(branch)] == [3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # ... and so does the rewinding command run again (a restart or a requeue repeats it).
    assert read_marker(ckpt / "step-6")["branch_from"] == 2
    keep = "--checkpoint.keep_latest_k=1"  # step-2 itself goes: the branch does not need it
    result = run_train(_args(tmp_path, synthetic_dir, "--training.steps=8", *rewind, keep), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already continued from step-2, and step-6 is on that branch" in result.stdout
    assert f"Resumed from {ckpt / 'step-6'} at step 6" in result.stdout
    assert len(list((ckpt / "branches").iterdir())) == 1
    assert [s.step for s in list_steps(ckpt)] == [8]
    # the step that branch continues from is checked for another model by a dry run too
    other = ["--training.vocab_size=512", "--job.dry_run"]
    result = run_train(_args(tmp_path, synthetic_dir, "--training.steps=10", *rewind, *other))
    assert_refused(result, f"checkpoint {ckpt / 'step-8'} was saved by another model")
    result = run_train(_args(tmp_path, synthetic_dir, "--training.steps=10", *rewind), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {ckpt / 'step-8'} at step 8" in result.stdout


def _plant_nan(step_dir: Path) -> None:
    """Rewrite a step with NaN in model.norm.weight and its checksums re-recorded: a NaN
    that was saved, not a damaged file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    from titan.checkpoint import storage

    marker = storage.read_marker(step_dir)
    whole = step_dir.parent / "whole.pt"
    dcp_to_torch_save(str(step_dir), str(whole))
    state = torch.load(whole, weights_only=False)
    state["model"]["norm.weight"][0] = float("nan")
    torch.save(state, whole)
    shutil.rmtree(step_dir)
    torch_save_to_dcp(str(whole), str(step_dir))
    whole.unlink()
    names = sorted(p.name for p in step_dir.glob("*.distcp"))
    storage.complete(step_dir, {"step": marker["step"], "kind": marker["kind"]},
                     storage.checksums(step_dir, names))  # fmt: skip


def test_nan_in_a_saved_weight_is_refused(tmp_path, synthetic_dir):
    args = ("--training.steps=4", "--checkpoint.interval=2")
    assert run_train(_args(tmp_path, synthetic_dir, *args), nproc=1).returncode == 0
    _plant_nan(tmp_path / "checkpoint" / "step-4")
    result = run_train(_args(tmp_path, synthetic_dir, "--training.steps=6"), nproc=1)
    assert result.returncode == 2
    err = result.stderr.strip()
    assert "step-4 is corrupted: model weight norm.weight is not finite" in err
    assert "\n" not in err
    result = run_train(
        _args(
            tmp_path, synthetic_dir, "--training.steps=6", "--checkpoint.fallback_on_corruption"
        ),  # fmt: skip
        nproc=1,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Resumed from {tmp_path / 'checkpoint' / 'step-2'} at step 2" in result.stdout


@pytest.mark.slow
def test_stopped_rank_is_reported_and_the_job_ends(tmp_path, synthetic_dir):
    command = train_command(2, launcher="titan.launch") + _args(
        tmp_path, synthetic_dir, "--training.steps=5000", "--job.collective_timeout_s=10"
    )
    env = {**TRAIN_ENV, "TITAN_SHUTDOWN_TIMEOUT_S": "5"}
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for(lambda: logged_step(tmp_path) >= 12, proc)
    stopped = max(worker_pids(tmp_path))
    os.kill(stopped, signal.SIGSTOP)
    begin = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # torchrun's agent may have killed it
            os.kill(stopped, signal.SIGKILL)
    assert proc.returncode == 5, out[-3000:]
    assert "error: a collective did not complete within job.collective_timeout_s" in out
    assert time.monotonic() - begin < 90


@pytest.fixture
def small_disk(tmp_path):
    """A 60 MB tmpfs: room for one checkpoint of the debug model (about 37 MB), not two."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({result.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_the_next_start_resumes_exactly(
    small_disk, synthetic_dir, reference
):
    dump = small_disk / "run"
    args = _args(dump, synthetic_dir, "--checkpoint.interval=10")
    result = run_train(args, nproc=2, launcher="titan.launch")
    assert result.returncode == 4, result.stdout[-3000:]
    err = result.stderr.strip()
    assert err.startswith("error: checkpoint step-20 was not saved: no space left in "), err
    assert "a checkpoint takes about" in err and "\n" not in err
    assert [s.step for s in list_steps(dump / "checkpoint") if s.complete] == [10]
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    result = run_train(args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Checkpoint step-20 had no marker: moved aside" in result.stdout
    assert f"Resumed from {dump / 'checkpoint' / 'step-10'} at step 10" in result.stdout
    assert train_losses(dump) == train_losses(reference)


_WORKER = """
import json, os, sys, time
rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
def status(code):
    with open(os.environ["TITAN_STATUS_FILE"], "w") as f:
        json.dump({"exit_code": code, "message": "said once"}, f)
    sys.exit(code)
if sys.argv[1] == "titan_ending":  # rank 1 ends with titan's status 3; rank 0 is still busy
    status(3) if rank == 1 else time.sleep(60)
elif attempt == 0:  # a retried ending (stuck rank), then a crash titan did not report
    status(5)
else:
    os._exit(7)
"""


@pytest.mark.parametrize("case", ["titan_ending", "later_crash"])
def test_launcher_reports_titan_endings_once_and_other_crashes_in_full(tmp_path, case):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    command = [sys.executable, "-m", "titan.launch", "--standalone", "--nproc_per_node=2",
               "--max_restarts=1", str(script), case]  # fmt: skip
    env = {**TRAIN_ENV, "TITAN_SHUTDOWN_TIMEOUT_S": "5"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    if case == "titan_ending":
        assert result.returncode == 3, result.stderr[-3000:]
        assert "closing signal" not in result.stderr and "FAILED" not in result.stderr
    else:  # the status file still holds attempt 0's 5: the crash must not be reported as it
        assert result.returncode == 1, result.stderr[-3000:]
        assert "FAILED" in result.stderr and "exitcode  : 7" in result.stderr


def test_exit_process_keeps_the_status_the_handlers_and_the_buffered_output():
    script = (
        "import atexit, sys\n"
        "from titan.distributed import exit_process\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "sys.stdout.write('no newline yet')\n"  # a pipe is block-buffered: still in memory
        "sys.stderr.write('to stderr')\n"
        "exit_process(3)\n"
    )
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=buffered,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert done.stdout == "no newline yethandler ran\n" and done.stderr == "to stderr"
