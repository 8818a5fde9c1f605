"""`python -m fnc_jax.study --grid=NAME --seeds=0,1,2 --out=DIR`: runs a grid (resuming), then reports.

Run the same command again to resume a study cut short: finished runs are skipped, half-finished ones
resume from their checkpoints. `--report-only` rewrites OUT/results.md, OUT/study.json and the plots
from what has finished; `--readme=README.md` also rewrites the README's study tables (between its
markers) from the same report. `--steps` / `--epochs` / `--set FIELD=VALUE` change every run of the grid (a
shorter or smaller study; recorded with each run, so a run dir never mixes two recipes). A bad flag
prints one line naming the flag, its value and what is allowed, and exits with status 2; the command
exits with status 1 when a run failed (after reporting the rest).
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import sys
from typing import Any

from fnc_jax import config_base, errors
from fnc_jax.study import grids, report, runner


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors become a UserError (one line, status 2)
        raise errors.ConfigError(f"{message} (see python -m fnc_jax.study --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fnc_jax.study", description=__doc__.splitlines()[0])
    p.add_argument("--grid", required=True, help=f"one of {', '.join([*grids.GRIDS, 'all'])}")
    p.add_argument("--methods", help="comma-separated subset of the grid's methods (with their baselines)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, paired across methods")
    p.add_argument("--out", required=True, help="study directory (runs/, results.md, study.json, plots)")
    p.add_argument("--steps", help="total_steps of every run (overrides epochs)")
    p.add_argument("--epochs", help="epochs of every run")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override for every run")
    p.add_argument("--report-only", action="store_true", help="only write the report from the finished runs")
    p.add_argument("--readme", help="also rewrite the study tables between the markers of this file (README.md)")
    return p


def _seeds(text: str) -> list[int]:
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts) or len(set(map(int, parts))) != len(parts):
        raise errors.ConfigError(
            f"--seeds={text!r} is invalid: allowed are distinct non-negative integers separated by commas (0,1,2)."
        )
    return [int(p) for p in parts]


def _positive(flag: str, text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise errors.ConfigError(f"--{flag}={text!r} is invalid: allowed are {kind.__name__} values > 0.")
    return value


def _methods(grid: str, subset: str | None) -> tuple[grids.Method, ...]:
    methods = grids.grid(grid)
    if subset is None:
        return methods
    names = subset.split(",")
    allowed = [m.name for m in methods]
    if not set(names) <= set(allowed):
        raise errors.ConfigError(
            f"--methods={subset!r} is invalid: allowed are methods of --grid={grid}: {', '.join(allowed)}."
        )
    return tuple(m for m in methods if m.name in names)


def _extra(args: argparse.Namespace) -> dict[str, Any]:
    """The overrides every run gets: --set, then --steps / --epochs."""
    extra: dict[str, Any] = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or not field or field == "seed":
            raise errors.ConfigError(
                f"--set={item!r} is invalid: allowed is FIELD=VALUE with a config field other than seed (use --seeds)."
            )
        extra[field] = value
    if args.steps is not None and args.epochs is not None:
        raise errors.ConfigError(f"--steps={args.steps!r} with --epochs={args.epochs!r} is invalid: allowed is one.")
    if args.steps is not None:
        extra["total_steps"] = _positive("steps", args.steps, int)
    if args.epochs is not None:
        extra["epochs"] = _positive("epochs", args.epochs, int)
    return extra


def run(argv: list[str]) -> None:
    args = _parser().parse_args(argv[1:])
    seeds = _seeds(args.seeds)
    methods = runner.with_overrides(_methods(args.grid, args.methods), _extra(args))
    grids.validate(methods, config_base.pretrain_config())  # every field exists, before any run starts
    out = pathlib.Path(args.out).resolve()
    runs = runner.plan(methods, seeds, out)
    runner.check_recorded(runs)
    readme = pathlib.Path(args.readme) if args.readme else None
    if readme is not None:
        report.check_readme(readme)
    counts = runner.run_all(runs, out) if not args.report_only else None
    study = report.write(args.grid, methods, seeds, runs, out)
    print(report.markdown(study).split("\n## Runs")[0])
    if readme is not None:
        subset = f" --methods={args.methods}" if args.methods else ""
        command = (
            f"python -m fnc_jax.study --grid={args.grid}{subset} --seeds={args.seeds} --out={args.out} --report-only"
        )
        report.update_readme(readme, study, f"{command} --readme={args.readme}")
    print(f"Wrote {out / 'results.md'}, {out / 'study.json'}, the plots{f' and {readme}' * (readme is not None)}.")
    if counts is not None:
        print(f"Runs: {counts['ok']} done, {counts['skipped']} skipped (finished earlier), {counts['failed']} failed.")
        if counts["failed"]:
            sys.exit(1)


def main() -> None:
    # SIGTERM (a kill, a scheduler) becomes an exit, so the running training process is stopped with it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    errors.exit_on_user_error(run, sys.argv)


if __name__ == "__main__":
    main()
