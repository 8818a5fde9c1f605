"""The study's results: OUT/study.json and OUT/results.md from OUT/runs/**, plus the PNG plots (`plots`).

Per method: mean, std and min-max over its finished seeds (and how many of the asked seeds those are),
and the paired difference to its baseline (method minus baseline, seed by seed, over the seeds both
finished), because the seed spread of one method is larger than most differences between methods.
Every run's commit, command, wall time and exit status are listed, so each number can be traced.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from fnc_jax import errors
from fnc_jax.study import grids, plots, runner

# (key, column) of the compared numbers; accuracies from quality.pretrained, FN precision from quality.
METRICS = (
    ("knn_top1_k20", "kNN@20"),
    ("knn_top1_k200", "kNN@200"),
    ("linear_probe_top1", "probe"),
    ("fn_precision_last_window", "FN precision"),
)


def run_values(results: dict[str, Any]) -> dict[str, float]:
    """The compared numbers of one finished run; FN precision only where the run cancels false negatives
    (without cancellation the trainer logs a precision of 0 for the empty selection)."""
    quality = results["quality"]
    values = {k: quality["pretrained"][k] for k, _ in METRICS if k in quality["pretrained"]}
    precision = quality.get("fn_precision_last_window")
    if results["config"]["fn"]["mode"] != "none" and precision is not None and math.isfinite(precision):
        values["fn_precision_last_window"] = precision
    return values


def spread(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample std (None for one value), min, max."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    std = float(a.std(ddof=1)) if a.size > 1 else None
    return {"n": int(a.size), "mean": float(a.mean()), "std": std, "min": float(a.min()), "max": float(a.max())}


def failure(log: pathlib.Path) -> str:
    """Why a run failed: the last line of its log (the exception, e.g. loop.NonFiniteError for a collapse)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return (lines[-1].strip() if lines else "no log")[:160].replace("|", "/")


def run_entry(run: runner.Run) -> dict[str, Any]:
    """One run's status and provenance: finished / failed / partial / not run, commit(s), command, wall time."""
    record = runner.read_json(run.workdir / runner.RUN_FILE) or {"attempts": []}
    attempts = record["attempts"]
    if runner.finished(run.workdir):
        status = "finished"
    elif attempts and attempts[-1]["exit_status"] != 0:
        status = f"failed: {failure(run.workdir / runner.LOG_FILE)}"
    else:
        status = "partial" if (run.workdir / "checkpoints").exists() else "not run"
    return {
        "method": run.method.name,
        "seed": run.seed,
        "status": status,
        "commits": sorted({a["commit"] + ("-dirty" if a["dirty"] else "") for a in attempts}),
        "command": attempts[-1]["command"] if attempts else run.command,
        "wall_s": round(sum(a["wall_s"] for a in attempts), 1),
        "attempts": len(attempts),
        "exit_status": attempts[-1]["exit_status"] if attempts else None,
    }


def summarize(grid_name: str, methods: Sequence[grids.Method], seeds: Sequence[int], runs: Sequence[runner.Run]):
    """study.json's content: per-method spreads, paired differences to the baseline, and every run."""
    values = {
        (r.method.name, r.seed): run_values(runner.read_json(r.workdir / runner.RESULTS_FILE))
        for r in runs
        if runner.finished(r.workdir)
    }
    summary: list[dict[str, Any]] = []  # a list: study.json's keys are sorted, the grid's order is kept here
    for m in methods:
        done = [s for s in seeds if (m.name, s) in values]
        paired = [s for s in done if (m.baseline, s) in values]
        per_metric, diffs = {}, {}
        for key, _ in METRICS:
            own = {s: values[m.name, s][key] for s in done if key in values[m.name, s]}
            per_metric[key] = {**spread(list(own.values())), "per_seed": own}
            if m.baseline != m.name:
                d = {
                    s: own[s] - values[m.baseline, s][key] for s in paired if s in own and key in values[m.baseline, s]
                }
                diffs[key] = {**spread(list(d.values())), "per_seed": d}
        summary.append(
            {
                "name": m.name,
                "baseline": m.baseline,
                "overrides": m.overrides,
                "seeds_finished": done,
                "seeds_asked": len(seeds),
                "metrics": per_metric,
                "vs_baseline": diffs,
            }
        )
    entries = [run_entry(r) for r in runs]
    return {
        "grid": grid_name,
        "seeds": list(seeds),
        "commits": sorted({c for e in entries for c in e["commits"]}),
        "methods": summary,
        "runs": entries,
    }


def _cell(stats: dict[str, Any], scale: float = 100.0, signed: bool = False) -> str:
    if not stats["n"]:
        return "–"
    fmt = "+.1f" if signed else ".1f"
    text = f"{scale * stats['mean']:{fmt}}"
    if stats["std"] is not None:
        text += f" ± {scale * stats['std']:.1f} [{scale * stats['min']:{fmt}}, {scale * stats['max']:{fmt}}]"
    return text


def _method_rows(study: dict[str, Any], finished_only: bool = False) -> list[str]:
    lines = ["| method | seeds | " + " | ".join(col for _, col in METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for m in study["methods"]:
        name, n = m["name"], len(m["seeds_finished"])
        if finished_only and not n:
            continue
        seeds_cell = f"{n}/{m['seeds_asked']}" + (" (fewer than asked)" if n < m["seeds_asked"] else "")
        lines.append(f"| {name} | {seeds_cell} | " + " | ".join(_cell(m["metrics"][k]) for k, _ in METRICS) + " |")
    return lines


def _paired_rows(study: dict[str, Any]) -> list[str]:
    # A column only where some difference exists (FN precision: only against a baseline that cancels).
    compared = [(k, col) for k, col in METRICS if any(m["vs_baseline"].get(k, {}).get("n") for m in study["methods"])]
    lines = [
        "| method | baseline | pairs | " + " | ".join(f"Δ {col}" for _, col in compared) + " |",
        "|---" * (len(compared) + 3) + "|",
    ]
    for m in study["methods"]:
        pairs = max((d["n"] for d in m["vs_baseline"].values()), default=0)
        if pairs:
            cells = " | ".join(_cell(m["vs_baseline"][k], signed=True) for k, _ in compared)
            lines.append(f"| {m['name']} | {m['baseline']} | {pairs} | {cells} |")
    return lines


def _commits_line(study: dict[str, Any]) -> str:
    return f"Commit(s): {', '.join(f'`{c}`' for c in study['commits']) or '–'}."


def markdown(study: dict[str, Any]) -> str:
    """results.md: the per-method table, the paired differences, and every run's provenance."""
    seeds = study["seeds"]
    lines = [
        f"# Study `{study['grid']}`, seeds {', '.join(map(str, seeds))}",
        "",
        f"{_commits_line(study)} Numbers in %: mean ± std over the "
        "finished seeds [min, max]; differences are method − baseline, seed by seed.",
        "",
        *_method_rows(study),
        "",
        "## Paired differences to the baseline",
        "",
        *_paired_rows(study),
    ]
    lines += [
        "",
        "## Runs",
        "",
        "| method | seed | status | commit(s) | wall (s) | attempts | exit |",
        "|---" * 7 + "|",
    ]
    for r in study["runs"]:
        commits = ", ".join(f"`{c[:10]}{'-dirty' * c.endswith('-dirty')}`" for c in r["commits"]) or "–"
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['status']} | {commits} | {r['wall_s']:.0f} | {r['attempts']} | "
            f"{'–' if r['exit_status'] is None else r['exit_status']} |"
        )
    total = sum(r["wall_s"] for r in study["runs"])
    lines += ["", f"Wall time of all runs: {total / 60:.0f} min.", ""]
    lines += ["## Methods (overrides of configs/default.py)", ""]
    lines += [
        f"- {m['name']} (vs {m['baseline']}): " + ", ".join(f"`{k}={v}`" for k, v in m["overrides"].items())
        for m in study["methods"]
    ]
    lines += ["", "Commands (the last attempt of each run; planned for runs not started):", "", "```"]
    lines += [" ".join(r["command"]) for r in study["runs"]]
    lines += ["```", "", "Plots: accuracy.png, fn_precision.png, schedule.png (when the grid has schedule runs).", ""]
    return "\n".join(lines)


def readme_tables(study: dict[str, Any], command: str) -> str:
    """The README's block: the methods with a finished seed, their paired differences, the runs' commits
    and the `command` that wrote it."""
    return "\n".join(
        [
            *_method_rows(study, finished_only=True),
            "",
            "Paired differences to the baseline (same seeds):",
            "",
            *_paired_rows(study),
            "",
            f"{_commits_line(study)} Written by `{command}`.",
        ]
    )


README_BEGIN, README_END = "<!-- study tables: begin -->", "<!-- study tables: end -->"


def check_readme(path: pathlib.Path) -> str:
    """The text of `path`, which must hold the study-tables markers once each, in order."""
    text = path.read_text() if path.is_file() else ""
    if (
        text.count(README_BEGIN) != 1
        or text.count(README_END) != 1
        or text.index(README_BEGIN) > text.index(README_END)
    ):
        raise errors.ConfigError(
            f"--readme={str(path)!r} is invalid: allowed is a file holding the lines {README_BEGIN} and {README_END} "
            "once each, in that order."
        )
    return text


def update_readme(path: pathlib.Path, study: dict[str, Any], command: str) -> None:
    """Replaces what lies between the markers of `path` with `readme_tables(study, command)` (atomically)."""
    text = check_readme(path)
    head, rest = text.split(README_BEGIN)
    tail = rest.split(README_END)[1]
    write_text_atomic(path, f"{head}{README_BEGIN}\n{readme_tables(study, command)}\n{README_END}{tail}")


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(grid_name: str, methods: Sequence[grids.Method], seeds: Sequence[int], runs: Sequence[runner.Run], out):
    """Writes OUT/study.json, OUT/results.md and the plots; returns the study summary."""
    from fnc_jax import checkpoints  # noqa: PLC0415 (imports TensorFlow: not before a flag error is possible)

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = summarize(grid_name, methods, seeds, runs)
    checkpoints.write_json_atomic(out / "study.json", study)
    write_text_atomic(out / "results.md", markdown(study))
    plots.write_all(study, runs, out)
    return study
