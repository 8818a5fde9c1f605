"""The study's PNG plots (matplotlib, Agg): accuracy per method with its seeds, FN precision over training,
and the false-negative schedule's k / threshold over training.

Each seed is drawn, not only the mean, so a reader sees how much of a difference is seed noise.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fnc_jax.study import runner  # noqa: E402

ACCURACIES = (("knn_top1_k20", "kNN@20"), ("knn_top1_k200", "kNN@200"), ("linear_probe_top1", "linear probe"))
HISTORY_FILE = "train_history.json"


def _save(fig, path: pathlib.Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def accuracy(study: dict[str, Any], path: pathlib.Path) -> None:
    """Per method (a row): every seed's accuracy (grey dots) and the mean with its min-max range, per metric;
    the dashed line is each panel's first method (the grid's baseline) so a difference reads against it."""
    methods = study["methods"]
    height = 2.0 + 0.35 * len(methods)
    fig, axes = plt.subplots(1, len(ACCURACIES), figsize=(12, height), sharey=True, squeeze=False, layout="constrained")
    rows = range(len(methods))[::-1]  # the first method on top
    for ax, (key, title) in zip(axes[0], ACCURACIES):
        for y, m in zip(rows, methods):
            stats = m["metrics"][key]
            if not stats["n"]:
                continue
            ax.scatter([100 * v for v in stats["per_seed"].values()], [y] * stats["n"], s=14, color="grey", zorder=2)
            low, high = stats["mean"] - stats["min"], stats["max"] - stats["mean"]
            ax.errorbar([100 * stats["mean"]], [y], xerr=[[100 * low], [100 * high]], fmt="o", color="C0", capsize=4)
        if methods[0]["metrics"][key]["n"]:
            ax.axvline(100 * methods[0]["metrics"][key]["mean"], color="C3", ls="--", lw=1)
        ax.set_title(title)
        ax.set_xlabel("top-1 (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(list(rows), [m["name"] for m in methods], fontsize=8)
    axes[0][0].set_ylim(-0.6, len(methods) - 0.4)
    fig.suptitle(f"{study['grid']}: mean and min-max over seeds (grey: each seed)")
    _save(fig, path)


def histories(
    runs: Sequence[runner.Run], key: str, *, selected_only: bool = False
) -> dict[str, list[tuple[list[int], list[float]]]]:
    """Per method, each seed's (steps, values) of `key` in train_history.json (finite values only).

    `selected_only` keeps the windows that selected false negatives: precision is logged as 0 where
    nothing was selected (no cancellation, or before a schedule starts), which is no precision at all.
    """
    found: dict[str, list[tuple[list[int], list[float]]]] = {}
    for run in runs:
        history = (runner.read_json(run.workdir / HISTORY_FILE) or {}).get("history", [])
        points = [
            (h["step"], h[key])
            for h in history
            if isinstance(h.get(key), float | int)
            and math.isfinite(h[key])
            and (not selected_only or h.get("mean_num_fn", 0) > 0)
        ]
        if points:
            steps, values = zip(*points)
            found.setdefault(run.method.name, []).append((list(steps), list(values)))
    return found


def curves(series: dict[str, list[tuple[list[int], list[float]]]], axes, ylabel: str, scale: float = 1.0) -> None:
    for i, (name, seeds) in enumerate(series.items()):
        color = plt.cm.tab20(i % 20) if len(series) > 10 else f"C{i}"
        for j, (steps, values) in enumerate(seeds):
            axes.plot(steps, [scale * v for v in values], color=color, alpha=0.8, lw=1, label=name if j == 0 else None)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)


def write_all(study: dict[str, Any], runs: Sequence[runner.Run], out: pathlib.Path) -> list[pathlib.Path]:
    """accuracy.png, fn_precision.png (runs that select false negatives), schedule.png (schedule runs)."""
    written = [out / "accuracy.png"]
    accuracy(study, written[0])
    precision = histories(runs, "fn_precision", selected_only=True)
    if precision:
        fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
        curves(precision, ax, "FN precision (%)", scale=100.0)
        ax.set_title("false-negative precision per logged window (one line per seed)")
        written.append(out / "fn_precision.png")
        _save(fig, written[-1])
    topk, threshold = histories(runs, "fn_topk"), histories(runs, "fn_threshold")
    if topk:
        fig, (ax_k, ax_t) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
        curves(topk, ax_k, "top-k in force")
        curves(threshold, ax_t, "cosine threshold in force")
        fig.suptitle("false-negative schedule over training")
        written.append(out / "schedule.png")
        _save(fig, written[-1])
    return written
