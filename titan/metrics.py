"""Training metrics: the console line, `metrics.jsonl` (one JSON object per logged step)
and TensorBoard scalars, all written by rank 0 only.

FLOPs per token follow torchtitan: `6 * N_non_embedding + 12 * L * H * D * S`
counts the full attention square; `mfu_causal` uses 6 instead of 12 for attention, the
work a causal kernel really does.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from titan.files import json_text, written_atomically
from titan.logging import logger

# Dense bf16 peak TFLOP/s (datasheets) by device name substring; first match wins.
PEAK_TFLOPS = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("B200", 2250.0),
    ("MI300X", 1307.0),
    ("MI250X", 191.5),
]


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPU): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak device memory allocated (CUDA) or the process's peak RSS (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class MetricsLogger:
    """Accumulates per-step timings between log steps and writes one record per log step."""

    dump_folder: Path
    device: torch.device
    flops_per_token: float
    flops_per_token_causal: float
    total_steps: int
    enable_tensorboard: bool = False
    tb_folder: str = "tb"
    enabled: bool = True  # rank 0 only
    _tb: object = field(default=None, repr=False)
    _jsonl: object = field(default=None, repr=False)
    _t_last: float = field(default_factory=time.perf_counter, repr=False)
    _t_start: float = field(default_factory=time.perf_counter, repr=False)
    _start_step: int = 0
    _tokens: int = 0
    _steps: int = 0
    _data_s: float = 0.0
    _step_s_avg: float | None = None
    _first: dict | None = field(default=None, repr=False)  # first and last logged records,
    _last: dict | None = field(default=None, repr=False)  # for the end-of-run summary

    def __post_init__(self) -> None:
        self.peak = peak_tflops(self.device)
        if not self.enabled:
            return
        self.dump_folder.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.dump_folder / "metrics.jsonl").open("a", buffering=1)
        if self.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dump_folder / self.tb_folder))

    def keep_records_until(self, step: int, set_aside: Path | None = None) -> None:
        """Drop the records of steps after `step` (a resumed run redoes them), so
        metrics.jsonl keeps one record of each kind per step; with `set_aside` (the folder
        an abandoned branch's steps were moved into), they are kept there, in its own
        metrics.jsonl."""
        if not self.enabled:
            return
        path = self.dump_folder / "metrics.jsonl"
        self._jsonl.close()
        kept, dropped = [], []
        for line in path.read_bytes().decode(errors="replace").splitlines():
            try:
                (kept if json.loads(line)["step"] <= step else dropped).append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill
        if set_aside is not None and dropped:  # first: a kill between the two loses nothing
            with written_atomically(set_aside / "metrics.jsonl") as tmp:
                tmp.write_text("".join(f"{line}\n" for line in dropped))
        with written_atomically(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in kept))
        self._jsonl = path.open("a", buffering=1)
        if self._tb is not None:  # TensorBoard drops the redone steps' old scalars too
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(str(self.dump_folder / self.tb_folder), purge_step=step + 1)

    def record_start(self, step: int) -> None:
        """Start the clocks (after set-up and any resume) at optimizer step `step`."""
        self._t_last = self._t_start = time.perf_counter()
        self._start_step = step

    def record_step(self, tokens: int, data_wait_s: float) -> None:
        """Count one finished optimizer step's tokens and its data-loading wait."""
        self._tokens += tokens
        self._steps += 1
        self._data_s += data_wait_s

    def log(
        self, step: int, loss: float, grad_norm: float, lr: float, extra: dict | None = None
    ) -> dict:
        """Write the metrics of the steps since the last call; returns the record."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed = max(now - self._t_last, 1e-9)
        step_s = elapsed / max(self._steps, 1)
        # Smooth the ETA; the first interval includes compilation and warmup.
        self._step_s_avg = (
            step_s if self._step_s_avg is None else 0.7 * self._step_s_avg + 0.3 * step_s
        )
        tps = self._tokens / elapsed  # per device: every rank processes its own tokens
        rec = {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": tps,
            "tflops": tps * self.flops_per_token / 1e12,
            "mfu": None,
            "mfu_causal": None,
            "peak_memory_gib": peak_memory_gib(self.device),
            "data_time_s": self._data_s,
            "data_time_frac": self._data_s / elapsed,
            "step_time_s": step_s,
            "eta_s": self._step_s_avg * (self.total_steps - step),
            "time": time.time(),
        }
        if self.peak:
            rec["mfu"] = 100 * rec["tflops"] / self.peak
            rec["mfu_causal"] = 100 * tps * self.flops_per_token_causal / 1e12 / self.peak
        rec.update(extra or {})
        self._t_last, self._tokens, self._steps, self._data_s = now, 0, 0, 0.0
        self._first, self._last = self._first or rec, rec
        if not self.enabled:
            return rec
        mfu = (
            f" mfu {rec['mfu']:.1f}% (causal {rec['mfu_causal']:.1f}%)"
            if rec["mfu"] is not None
            else ""
        )
        self._write(
            rec,
            f"step {step:>6} | loss {loss:.4f} | grad_norm {grad_norm:.3f} | lr {lr:.2e} | "
            f"{tps:,.0f} tok/s/dev | {rec['tflops']:.2f} TFLOP/s{mfu} | "
            f"mem {rec['peak_memory_gib']:.2f} GiB | data {100 * rec['data_time_frac']:.1f}% | "
            f"left {_hms(rec['eta_s'])}",
        )
        return rec

    def _write(self, rec: dict, line: str) -> None:
        """The console line, the metrics.jsonl record and its numbers in TensorBoard (a dict
        of numbers as `key/name` scalars)."""
        logger.info(line)
        self._jsonl.write(json_text(rec) + "\n")
        if self._tb is None:
            return
        for key, value in rec.items():
            if isinstance(value, dict):
                for name, v in value.items():
                    self._tb.add_scalar(f"{key}/{name}", v, rec["step"])
            elif isinstance(value, (int, float)) and key not in ("step", "time"):
                self._tb.add_scalar(key, value, rec["step"])

    def log_validation(self, step: int, result: dict, seconds: float) -> dict:
        """Write a validation record (`val_*` keys) and leave its `seconds` out of the
        training throughput of the current interval."""
        self._t_last += seconds
        rec = {
            "step": step,
            "val_loss": result["loss"],
            "val_bits_per_token": result["bits_per_token"],
            "val_loss_counts": result["loss_counts"],
            "val_tokens": result["tokens"],
            "val_loss_by_source": {k: v["loss"] for k, v in result["by_source"].items()},
            "val_seconds": seconds,
            "time": time.time(),
        }
        if not self.enabled:
            return rec
        parts = [
            f"validation at step {step}",
            f"val_loss {rec['val_loss']:.4f}",
            f"{rec['val_bits_per_token']:.3f} bits/token",
            f"spike counts only {rec['val_loss_counts']:.4f}",
            f"{rec['val_tokens']:,} labels in {seconds:.1f}s",
            "by source: " + ", ".join(f"{k} {v:.4f}" for k, v in rec["val_loss_by_source"].items()),
        ]
        self._write(rec, " | ".join(parts))
        return rec

    def summary(self, step: int, tokens_seen: int) -> None:
        """The end-of-run summary: steps, tokens, wall time, throughput, first/last loss."""
        if not self.enabled or self._last is None:
            return
        wall = time.perf_counter() - self._t_start
        steps = step - self._start_step
        first, last = self._first, self._last
        logger.info(
            f"Finished: {steps} steps in {_hms(wall)} (step {step}, {tokens_seen:,} tokens in "
            f"all), {last['tokens_per_s']:,.0f} tok/s/dev at the end, loss {first['loss']:.4f} "
            f"(step {first['step']}) -> {last['loss']:.4f} (step {last['step']})"
        )

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
