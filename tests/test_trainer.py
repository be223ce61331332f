"""The training step and the whole run.

- FSDP2 on 1, 2 and 4 ranks (and HSDP) takes the same steps on the same global batch:
  1x4, 2x2 and 4x1 (ranks x micro-batches) give the same losses over 10 steps.
- The same recipe and seed give identical losses run after run.
- On 2 ranks, full, attn and auto (a mixed per-block plan) activation checkpointing take
  the same steps as none (rtol 1e-6); compiled, too (opt-in compile test).
- A step whose loss or gradient norm is not finite never reaches the optimizer; too many
  in a row stop the run with one line.
- `train.py` under torchrun on 2 CPU ranks: the loss falls, metrics.jsonl and checkpoints
  are written (the last one a bfloat16 model-only export), and the resolved config is
  saved beside them.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import ROOT, TRAIN_ENV, debug_args, read_metrics, run_train, train_command
from dist_utils import run_ranks

from titan.checkpoint import list_steps

SEQ, GLOBAL_BATCH, STEPS = 32, 4, 10


def _losses(
    world: int,
    replicate: int = 1,
    activation_checkpoint: str = "none",
    compile: bool = False,
    extra: tuple[str, ...] = (),
) -> list[float]:
    """On every rank: 10 optimizer steps on two fixed global batches, alternating."""
    from titan.config import load_config
    from titan.run import build_run
    from titan.trainer import train_step

    cfg = load_config(
        [
            "--job.config_file=train_configs/debug_model.toml",
            f"--training.seq_len={SEQ}",
            "--training.batch_size=1",
            f"--training.global_batch_size={GLOBAL_BATCH}",
            f"--training.data_parallel_replicate_degree={replicate}",
            f"--activation_checkpoint.mode={activation_checkpoint}",
            "--training.warmup_steps=2",
            f"--training.steps={STEPS}",
            f"--training.compile={compile}",
            *extra,
        ]
    )
    windows = torch.randint(
        0, 256, (2, GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1)
    )
    losses = []
    with build_run(cfg, train=False) as run:
        dims = run.dims
        assert dims.world_size == world
        assert run.memory.training  # planned and checkpointed as training, not evaluation
        if activation_checkpoint == "full":
            assert set(run.memory.policies) == {"full"}, run.memory.policies
        per_rank = GLOBAL_BATCH // dims.dp_degree
        for step in range(STEPS):
            mine = windows[step % 2, dims.dp_rank() * per_rank : (dims.dp_rank() + 1) * per_rank]
            micro = [(w[None, :-1], w[None, 1:]) for w in mine]  # (1, seq) each
            loss, _ = train_step(
                run.model, run.optimizer, micro, GLOBAL_BATCH * SEQ, dims.dp_degree, 1.0
            )
            run.scheduler.step()
            losses.append(loss)
    return losses


def _variants(world: int) -> dict[str, list[float]]:
    """Every layout of this world size, in one set of processes (spawning is the cost)."""
    if world == 1:
        return {
            "fsdp": _losses(1),
            "again": _losses(1),
            "full_ac": _losses(1, activation_checkpoint="full"),
            "selective_ac": _losses(1, activation_checkpoint="selective"),
        }
    if world == 2:
        return {
            "fsdp": _losses(2),
            "hsdp": _losses(2, replicate=2),
            "full_ac": _losses(2, activation_checkpoint="full"),
            "attn_ac": _losses(2, activation_checkpoint="selective", extra=ATTN),
            "auto_ac": _losses(2, activation_checkpoint="auto", extra=_mixed_auto_plan(2)),
        }
    return {"fsdp": _losses(world)}


ATTN = ("--activation_checkpoint.selective_ac_option=attn",)


def _mixed_auto_plan(world: int) -> tuple[str, ...]:
    """A memory limit under which the auto plan gives the debug model's blocks different
    policies (so the test runs attn, none and full blocks together)."""
    from titan.config import load_config
    from titan.distributed import ParallelDims
    from titan.memory import GiB, plan_memory
    from titan.models.llama import build_model_args

    for mib in range(10, 200):
        extra = (f"--activation_checkpoint.memory_limit_gib={mib / 1024:.6f}",)
        cfg = load_config(
            ["--job.config_file=train_configs/debug_model.toml", f"--training.seq_len={SEQ}",
             "--training.batch_size=1", "--activation_checkpoint.mode=auto", *extra]
        )  # fmt: skip
        args = build_model_args("debugmodel", 256, SEQ)
        dims = ParallelDims.from_config(cfg, world, "cpu")
        plan = plan_memory(cfg, args, dims, int(mib / 1024 * GiB), torch.float32)
        if plan.fits and len(set(plan.policies)) > 1:
            return extra
    raise AssertionError("no memory limit gives a mixed plan")


def test_layouts_take_the_same_steps():
    """1x4, 2x2 and 4x1 (ranks x micro-batches), HSDP and activation checkpointing all
    take the same steps; the same seed gives the same losses again."""
    one = run_ranks(_variants, 1, 1)[0]
    two = run_ranks(_variants, 2, 2)
    four = run_ranks(_variants, 4, 4)
    reference = one["fsdp"]
    assert reference[-1] < 0.9 * reference[0]
    assert one["again"] == reference
    assert two[0] == two[1] and four[0] == four[3]  # every rank reports the global loss
    for losses in (
        two[0]["fsdp"],
        two[0]["hsdp"],
        four[0]["fsdp"],
        one["full_ac"],
        one["selective_ac"],
    ):
        torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-6)
    # Activation checkpointing policies on 2 ranks: the same steps as no checkpointing.
    for name in ("full_ac", "attn_ac", "auto_ac"):
        torch.testing.assert_close(two[0][name], two[0]["fsdp"], rtol=1e-6, atol=0)


def _eager_and_compiled() -> tuple[list[float], ...]:
    return (
        _losses(1, activation_checkpoint="selective"),
        _losses(1, activation_checkpoint="selective", compile=True),
        _losses(1, activation_checkpoint="selective", compile=True, extra=ATTN),
        _losses(1, activation_checkpoint="auto", compile=True, extra=_mixed_auto_plan(1)),
    )


@pytest.mark.compile
def test_compiled_blocks_take_the_same_steps():
    """Opt-in (a cold compile costs ~30 s here): bash scripts/test.sh -m compile"""
    eager, *compiled = run_ranks(_eager_and_compiled, 1)[0]
    for losses in compiled:  # every-2nd-block, attn and auto policies, compiled
        torch.testing.assert_close(losses, eager, rtol=1e-4, atol=1e-4)


def _nonfinite_step() -> tuple[float, bool, int]:
    """A NaN weight makes the loss NaN: the step must leave weights and optimizer alone."""
    from titan.config import load_config
    from titan.run import build_run
    from titan.trainer import train_step

    cfg = load_config(["--job.config_file=train_configs/debug_model.toml"])
    with build_run(cfg, train=False) as run:
        model, optimizer = run.model, run.optimizer
    with torch.no_grad():
        model.norm.weight.to_local()[0] = float("nan")
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    window = torch.randint(0, 256, (1, SEQ + 1))
    loss, _ = train_step(model, optimizer, [(window[:, :-1], window[:, 1:])], SEQ, 1, 1.0)
    after = [p.detach().full_tensor() for p in model.parameters()]
    unchanged = all(
        torch.equal(a, b) for a, b in zip(after, before, strict=True) if not a.isnan().any()
    )
    return loss, unchanged, len(optimizer.state)


def test_nonfinite_step_is_skipped():
    loss, unchanged, optimizer_states = run_ranks(_nonfinite_step, 1)[0]
    assert loss != loss  # NaN
    assert unchanged and optimizer_states == 0


def test_diverging_run_stops_with_one_line_and_is_not_retried(tmp_path, synthetic_dir):
    args = [
        "--job.config_file=train_configs/debug_model.toml",
        f"--job.dump_folder={tmp_path}",
        f"--training.dataset_path={synthetic_dir}",
        "--training.seq_len=64",
        "--optimizer.lr=1e12",
        "--training.warmup_steps=0",
        "--training.max_norm=0",
        "--training.max_consecutive_bad_steps=2",
        "--checkpoint.interval=1",
    ]
    # torchrun restarts failed workers; a restart of a diverged run ends at once, same status
    command = train_command(2, "--max_restarts=2", launcher="titan.launch") + args
    result = subprocess.run(command, cwd=ROOT, env=TRAIN_ENV, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 3, result.stdout[-2000:]  # EXIT_DIVERGED
    lines = result.stderr.strip().splitlines()
    first = "error: 2 consecutive steps with a non-finite loss or gradient norm"
    assert len(lines) == 3 and all(line.startswith(first) for line in lines), lines
    for restart, line in enumerate(lines[1:], 1):
        assert line.endswith(f"(not retried, a restart would end the same way: "
                             f"torchrun restart {restart})"), line  # fmt: skip
    assert result.stdout.count("Memory after the first step") == 1  # trained once only
    # Only finite steps were checkpointed.
    records = read_metrics(tmp_path)
    saved = sorted(int(p.name[5:]) for p in (tmp_path / "checkpoint").glob("step-*"))
    finite = {r["step"] for r in records}
    assert set(saved) <= finite


@pytest.mark.slow
def test_debug_recipe_trains_on_two_ranks(tmp_path, synthetic_dir):
    args = [
        "--job.config_file=train_configs/debug_model.toml",
        f"--job.dump_folder={tmp_path}",
        f"--training.dataset_path={synthetic_dir}",
        "--training.steps=40",
        "--training.seq_len=256",
        "--metrics.log_freq=5",
        "--checkpoint.interval=20",
        "--checkpoint.model_weights_only",
        "--checkpoint.export_dtype=bfloat16",
    ]
    result = run_train(args, nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, *range(5, 41, 5)]
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    for key in (
        "grad_norm",
        "lr",
        "tokens_per_s",
        "tflops",
        "peak_memory_gib",
        "data_time_s",
        "eta_s",
    ):
        assert key in records[-1]
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-20", "step-40"]
    assert (tmp_path / "checkpoint" / "step-40" / ".complete").is_file()
    from titan.checkpoint import checkpoint_keys

    full, export = (checkpoint_keys(tmp_path / "checkpoint" / s) for s in ("step-20", "step-40"))
    assert any(k.startswith("optimizer.") for k in full)
    assert all(k.startswith("model.") for k in export)
    assert {m.properties.dtype for m in export.values()} == {torch.bfloat16}
    assert (tmp_path / "config.toml").is_file()
    assert "Finished: 40 steps" in result.stdout
    # The same command again (a requeue, say): the final export means the run is over;
    # resuming step-20 would redo 20 steps and set the export aside.
    again = run_train(args, nproc=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is this run's final model-only export" in again.stdout
    assert "Already trained 40 of 40 steps: nothing to do" in again.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-20", "step-40"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, *range(5, 41, 5)]


def test_saves_every_n_seconds_on_two_ranks(tmp_path, synthetic_dir):
    """interval_type = seconds: rank 0's clock decides for all (a flag broadcast on the
    model's device), so both ranks save the same steps."""
    args = debug_args(
        tmp_path,
        synthetic_dir,
        "--training.steps=60",
        "--checkpoint.interval_type=seconds",
        "--checkpoint.interval=1",
        "--checkpoint.keep_latest_k=0",
    )
    result = run_train(args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = [s.step for s in list_steps(tmp_path / "checkpoint") if s.complete]
    assert saved[-1] == 60 and len(saved) >= 2, saved  # at least one save before the last
