"""Figures: the chart of a run (loss and validation loss, learning rate and tokens/s against
the step, read from the run's `metrics.jsonl`) and the rasters of generated spike trains
(`plot_samples`, used by generate.py).

    python -m titan.plot outputs/debug_model [--out FILE.png]   (default OUTPUT_DIR/metrics.png)

Training records have `step`, `loss`, `lr`, `tokens_per_s`, ...; validation records are
separate lines with `step` and `val_loss` (and maybe `val_loss_by_source`, a dict) but no
`loss`. A resumed run may log a step twice: the later record wins. Series a run does not
have (no validation) are left out. A missing or empty metrics file, or one that holds no
record, is one `error:` line; so is an output path holding a file that is not a PNG (a
chart is replaced, anything else never).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np

from titan.files import output_problem, written_atomically

matplotlib.use("Agg")  # files only, no display

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class PlotError(Exception):
    """A bad input (exit status 2); the message is one line."""


def read_metrics(path: Path) -> tuple[dict[int, dict], dict[int, dict], int]:
    """(training records by step, validation records by step, unreadable lines) of a
    metrics.jsonl; a later record of a step replaces an earlier one of the same kind."""
    if path.is_dir():
        raise PlotError(f"{path}: a folder, not a metrics file; pass the run's output folder")
    try:
        lines = path.read_bytes().decode(errors="replace").splitlines()  # a torn write, say
    except FileNotFoundError:
        raise PlotError(f"{path}: no such file (is this a run's output folder?)") from None
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # e.g. a last line cut short by a crash
            bad += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            bad += 1
            continue
        kinds = [(key, records) for key, records in (("loss", train), ("val_loss", val))
                 if key in rec]  # fmt: skip
        if not kinds or not all(_number_or_null(rec[key]) for key, _ in kinds):
            bad += 1  # (null: a validation that found no label)
            continue
        for _, records in kinds:
            records[rec["step"]] = rec
    if not train and not val:
        if bad:
            raise PlotError(f"{path}: none of its {bad} lines is a training or validation "
                            "record; pass a run's output folder or its metrics.jsonl")  # fmt: skip
        raise PlotError(f"{path}: no training or validation records (the run logged nothing yet)")
    return train, val, bad


def _number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _series(
    records: dict[int, dict], key: str, source: str | None = None
) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` (of `key[source]` for a dict such as val_loss_by_source),
    in step order, where it is a finite number."""
    steps, values = [], []
    for step, rec in sorted(records.items()):
        value = rec.get(key)
        if source is not None:
            value = value.get(source) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(step)
            values.append(float(value))
    return steps, values


def _not_finite(records: dict[int, dict], key: str) -> set[int]:
    """The steps whose `key` was logged but is not among `_series`' finite numbers:
    metrics.jsonl writes a non-finite loss as null."""
    return {step for step, rec in records.items() if key in rec} - set(_series(records, key)[0])


# Per-source validation curves: colors other than the training (blue) and validation (red) ones.
_SOURCE_COLORS = ["tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]


def _minor_label(value: float, _pos: int) -> str:
    """Log-axis minor labels: 2-6 and 8 times a power of ten; 7 and 9 would crowd their
    neighbours."""
    digit = f"{value:.0e}"[0]
    return "" if digit in "79" else f"{value:g}"


def build_figure(train: dict[int, dict], val: dict[int, dict], title: str) -> Figure:
    """Three panels sharing the step axis: losses, learning rate, tokens/s; a series the
    records do not have is not drawn."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import matplotlib.transforms

    fig, (ax_loss, ax_lr, ax_tps) = plt.subplots(
        3, 1, figsize=(10, 10), sharex=True, layout="constrained"
    )
    curves = [
        (ax_loss, _series(train, "loss"), "-", "tab:blue", "training loss"),
        (ax_loss, _series(val, "val_loss"), "o-", "tab:red", "validation loss"),
    ]
    by_source = [rec.get("val_loss_by_source") for rec in val.values()]
    sources = sorted({str(s) for d in by_source if isinstance(d, dict) for s in d})
    if len(sources) == 1:  # the same line as the validation loss
        sources = []
    for i, source in enumerate(sources):
        color = _SOURCE_COLORS[i % len(_SOURCE_COLORS)]
        points = _series(val, "val_loss_by_source", source)
        curves.append((ax_loss, points, ".:", color, f"validation: {source}"))
    curves += [
        (ax_lr, _series(train, "lr"), "-", "tab:green", "learning rate"),
        (ax_tps, _series(train, "tokens_per_s"), "-", "tab:purple", "tokens/s per device"),
    ]
    for ax, (steps, values), fmt, color, label in curves:
        if steps:
            ax.plot(steps, values, fmt, color=color, label=label)
    finite = {ax: bool(ax.lines) for ax in (ax_loss, ax_lr, ax_tps)}
    if ax_loss.lines:
        ax_loss.set_yscale("log")  # the first steps' loss would flatten the rest
        ax_loss.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # not 10^0
        ax_loss.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_minor_label))
    loss_label = "cross-entropy (nats/token" + (", log scale)" if ax_loss.lines else ")")
    if bad := sorted(_not_finite(train, "loss") | _not_finite(val, "val_loss")):
        # marked along the top (x in steps, y in axes units), so a diverged run shows where
        top = matplotlib.transforms.blended_transform_factory(ax_loss.transData, ax_loss.transAxes)
        label = f"loss not finite ({len(bad)} step{'s' if len(bad) > 1 else ''})"
        ax_loss.plot(bad, [0.96] * len(bad), "x", color="black", transform=top, label=label)
    panels = [
        (ax_loss, "loss", loss_label),
        (ax_lr, "learning rate", "learning rate"),
        (ax_tps, "throughput", "tokens/s per device"),
    ]
    for ax, name, ylabel in panels:
        ax.set(title=name, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best")
        if not finite[ax]:
            ax.set_yticks([])  # no value: no scale
            what = "no finite value" if ax.lines else "not in this run"
            ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_tps.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # (shared)
    ax_tps.set_xlabel("step")
    fig.suptitle(title)
    return fig


# The PNG `Software` tag of each figure titan draws: the chart command replaces an earlier
# chart, never generate.py's figure of samples (it belongs with its .npz).
CHART_SOFTWARE = "titan.plot"
SAMPLES_SOFTWARE = "titan generate.py"


def save_png(fig: Figure, out: Path) -> None:
    """Write the figure to a temporary name, then rename it: never a half-written PNG."""
    import matplotlib.pyplot as plt

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with written_atomically(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100, metadata={"Software": CHART_SOFTWARE})
    finally:
        plt.close(fig)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise PlotError(f"{message} (see --help)")


def samples_title(meta: dict[str, Any]) -> str:
    if meta.get("row") is None:
        what = f"unconditional, {meta['n_neurons']} neurons"
    else:
        ids = ", ".join(meta["row_ids"].get(c) or "" for c in ("session_id", "segment_id"))
        what = f"{meta['dataset']} [{meta['split']}] row {meta['row']} ({ids.strip(', ')})"
    s = meta["sampling"]
    how = f"temperature {s['temperature']}, top_k {s['top_k']}, top_p {s['top_p']}"
    lines = [str(meta["checkpoint"]), what, f"{how}, seed {meta['seed']}"]
    # wrapped to the figure's width (long paths and ids are cut at any character)
    return "\n".join(textwrap.fill(line, 100, break_on_hyphens=False) for line in lines)


def plot_samples(
    path: Path, prompt: np.ndarray, generated: np.ndarray, real: np.ndarray | None, title: str
) -> None:
    """Rasters (neurons x time bins; real continuation and the first sample, the prompt
    before a dashed line) and per-neuron mean rates, as a PNG."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n_samples, n_neurons, n_bins = generated.shape
    p = prompt.shape[1]
    rasters = []
    if real is not None:
        what = f"prompt + next {real.shape[1]}" if p else f"first {real.shape[1]}"
        rasters.append((f"real: {what} bins of the row", real))
    label = "generated" if n_samples == 1 else f"generated, sample 1 of {n_samples}"
    label += ": prompt + " if p else ": "
    rasters.append((f"{label}{n_bins} sampled bins", generated[0]))
    shown = np.concatenate([prompt.ravel()] + [r.ravel() for _, r in rasters])
    vmax = max(1, int(np.percentile(shown, 99.5)))
    fig, axes = plt.subplots(
        len(rasters) + 1, 1, figsize=(12, 2.2 + 2.6 * (len(rasters) + 1)), layout="constrained"
    )
    for ax, (name, counts) in zip(axes, rasters, strict=False):
        matrix = np.concatenate([prompt, counts], axis=1)  # (neurons, prompt + bins)
        image = ax.imshow(
            matrix, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=vmax,
            extent=(-0.5, matrix.shape[1] - 0.5, n_neurons - 0.5, -0.5),
        )  # fmt: skip
        ax.set_xlim(-0.5, p + n_bins - 0.5)
        if p:
            ax.axvline(p - 0.5, color="tab:red", linestyle="--", label="end of prompt")
            ax.legend(loc="upper right", framealpha=0.9)
        ax.set(title=name, xlabel="time bin", ylabel="neuron")
        for axis in (ax.xaxis, ax.yaxis):  # whole bins and neurons only
            axis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(
        image, ax=list(axes[: len(rasters)]), label="spikes per bin",
        extend="max" if shown.max() > vmax else "neither",
    )  # fmt: skip
    ax = axes[-1]
    neurons = np.arange(n_neurons)
    if p:
        ax.plot(neurons, prompt.mean(axis=1), ":", color="gray", label=f"prompt ({p} bins)")
    if real is not None and real.shape[1]:
        real_label = f"real continuation ({real.shape[1]} bins)"
        ax.plot(neurons, real.mean(axis=1), "o-", color="black", label=real_label)
    gen_label = f"generated ({n_samples} x {n_bins} bins)"
    ax.plot(neurons, generated.mean(axis=(0, 2)), "s-", color="tab:orange", label=gen_label)
    ax.set(title="per-neuron mean rate", xlabel="neuron", ylabel="mean spikes per bin")
    ax.set_xlim(-0.5, n_neurons - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", framealpha=0.9)
    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=100, metadata={"Software": SAMPLES_SOFTWARE})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (a failure is one `error:` line)."""
    p = _Parser(
        prog="python -m titan.plot",
        description="Draw a run's loss, validation loss, learning rate and tokens/s "
        "against the step into a PNG.",
    )
    p.add_argument(
        "output_dir", help="the run's output folder (holding metrics.jsonl), or that file"
    )
    p.add_argument("--out", default=None, help="PNG to write (default OUTPUT_DIR/metrics.png)")
    try:
        opts = p.parse_args(argv)
        given = Path(opts.output_dir)
        if not given.exists():
            raise PlotError(f"{given}: no such file or folder; pass a run's output folder")
        metrics = given if given.is_file() else given / "metrics.jsonl"
        folder = metrics.parent
        train, val, bad = read_metrics(metrics)
        out = Path(opts.out) if opts.out else folder / "metrics.png"
        if problem := output_problem(out, ".png") or _never_replaced(out):
            if not opts.out:  # a path the user did not name: say how to name one
                problem = problem.split(";")[0] + "; name another .png file with --out"
            raise PlotError(f"--out {out}: {problem}" if opts.out else f"{out}: {problem}")
        figure = build_figure(train, val, _title(folder, train, val))
        try:
            save_png(figure, out)
        except OSError as e:  # a full disk, say: name the output, not a temporary file
            where = f"--out {out}" if opts.out else str(out)
            raise OSError(
                f"cannot write {where} ({e.strerror or e}); name another .png file with --out, "
                "or free space"
            ) from None
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # an unreadable metrics file, a failed write
        what = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        print(f"error: {what}", file=sys.stderr, flush=True)
        return 1
    skipped = f" (skipped {bad} unreadable lines)" if bad else ""
    print(f"wrote {out}: {len(train)} training and {len(val)} validation records{skipped}")
    return 0


def _never_replaced(out: Path) -> str | None:
    """Refuse to replace a file that is not a PNG image, or that is generate.py's figure of
    samples (a chart, or another PNG, is replaced freely)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with out.open("rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        return None
    if head != b"\x89PNG\r\n\x1a\n":
        return "exists and is not a PNG image, which is never replaced; name another file"
    try:
        with Image.open(out) as image:
            software = image.info.get("Software")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):  # not our figure
        return None
    if software == SAMPLES_SOFTWARE:
        return (
            "is generate.py's figure of samples (beside its .npz), which is never replaced; "
            "name another file"
        )
    return None


def _title(folder: Path, train: dict[int, Any], val: dict[int, Any]) -> str:
    last = max([*train, *val])
    return f"{folder.resolve().name}: up to step {last}"


if __name__ == "__main__":
    sys.exit(main())
