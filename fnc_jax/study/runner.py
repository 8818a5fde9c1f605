"""Runs a grid: each (method, seed) as its own `python -m fnc_jax.main` process in OUT/runs/<method>/seed<k>.

Why subprocesses: every run gets a fresh JAX runtime and its own log, a crash or a non-finite loss ends
only that run (recorded, the study goes on), and a killed study resumes by running the same command again:
finished runs (results.json with `quality`, not preempted) are skipped, half-finished ones resume from
their own checkpoints. Seeds are paired (every method for seed 0, then seed 1, ...) with the baselines
first, so a study cut short still gives paired comparisons. Each run dir's `study_run.json` records the
overrides, the exact command, the commit (dirty flag: tracked files only) and every attempt's wall time
and exit status; a run dir recorded with other overrides is refused before anything runs, and so is a
second study process on the same OUT (a lock file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fnc_jax
from fnc_jax import errors
from fnc_jax.study import grids

REPO_ROOT = pathlib.Path(fnc_jax.__file__).resolve().parents[1]
CONFIG = "configs/default.py"
RUN_FILE = "study_run.json"
RESULTS_FILE = "results.json"
LOG_FILE = "study.log"
LOCK_FILE = ".study.lock"
CACHE_DIR = "jax_cache"


@dataclasses.dataclass(frozen=True)
class Run:
    method: grids.Method
    seed: int
    workdir: pathlib.Path
    overrides: tuple[str, ...]  # "field=value", the seed included, in command order

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "fnc_jax.main",
            f"--config={config_path()}",
            f"--workdir={self.workdir}",
            *(f"--config.{o}" for o in self.overrides),
        ]


def config_path() -> pathlib.Path:
    """configs/default.py of the repository this package lives in (not the cwd)."""
    path = REPO_ROOT / CONFIG
    if not path.exists():
        raise errors.InputNotFoundError(
            f"{CONFIG} not found next to the fnc_jax package (looked in {REPO_ROOT}); the study runs from a checkout."
        )
    return path


def run_dir(out: pathlib.Path, method: str, seed: int) -> pathlib.Path:
    return out / "runs" / method / f"seed{seed}"


def with_overrides(methods: Sequence[grids.Method], extra: dict[str, Any]) -> tuple[grids.Method, ...]:
    """The methods with `extra` (e.g. total_steps for a tiny study) added; `extra` wins over a method's own."""
    return tuple(dataclasses.replace(m, overrides={**m.overrides, **extra}) for m in methods)


def plan(methods: Sequence[grids.Method], seeds: Sequence[int], out: pathlib.Path) -> list[Run]:
    """The runs in order: seeds paired (all methods of a seed before the next), baselines first per seed."""
    baselines = {m.baseline for m in methods}
    ordered = [m for m in methods if m.name in baselines] + [m for m in methods if m.name not in baselines]
    return [
        Run(m, seed, run_dir(out, m.name, seed), (f"seed={seed}", *(f"{k}={v}" for k, v in m.overrides.items())))
        for seed in seeds
        for m in ordered
    ]


def read_json(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def finished(workdir: pathlib.Path) -> bool:
    results = read_json(workdir / RESULTS_FILE)
    return bool(results) and "quality" in results and not results.get("preempted", False)


def check_recorded(runs: Sequence[Run]) -> None:
    """Refuses (before any run starts) a run dir whose recorded overrides differ from the planned ones
    (as a set: each field appears once, so the order of the --set flags does not matter)."""
    for run in runs:
        record = read_json(run.workdir / RUN_FILE)
        if record is not None and set(record["overrides"]) != set(run.overrides):
            old, new = set(record["overrides"]) - set(run.overrides), set(run.overrides) - set(record["overrides"])
            raise errors.ConfigError(
                f"{run.workdir} holds a run with other overrides (recorded {sorted(old)}, asked {sorted(new)}): "
                "allowed is the recorded set; use another --out or restore those values."
            )


def git_commit() -> tuple[str, bool]:
    """(HEAD, dirty) of the package's checkout; dirty = tracked files differ from HEAD."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "HEAD") or "unknown", bool(git("status", "--porcelain", "--untracked-files=no"))


def execute(run: Run, cache: pathlib.Path) -> dict[str, Any]:
    """Runs (or resumes) one run to its end; appends the attempt to its study_run.json and returns that.

    `cache` is JAX's persistent compilation cache (unless the environment names one): the seeds of a
    method compile the same train step, so only the first compiles it (the cache changes no number).

    Interrupted (Ctrl-C, or SIGTERM to the study: `__main__` makes that an exit), the run gets SIGTERM
    too, saves a checkpoint at its next step and exits, so nothing trains on unattended.
    """
    from fnc_jax import checkpoints  # noqa: PLC0415 (imports TensorFlow: not before a flag error is possible)

    run.workdir.mkdir(parents=True, exist_ok=True)
    record = read_json(run.workdir / RUN_FILE) or {
        "method": run.method.name,
        "baseline": run.method.baseline,
        "seed": run.seed,
        "overrides": list(run.overrides),
        "attempts": [],
    }
    commit, dirty = git_commit()
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    started = time.time()
    with open(run.workdir / LOG_FILE, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(run.command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(run.command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            record["attempts"].append(
                {
                    "commit": commit,
                    "dirty": dirty,
                    "command": run.command,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    "wall_s": round(time.time() - started, 1),
                    "exit_status": proc.returncode,
                }
            )
            checkpoints.write_json_atomic(run.workdir / RUN_FILE, record)  # tmp + os.replace
    return record["attempts"][-1]


def _say(line: str) -> None:
    print(line, flush=True)  # the study usually runs in the background, its output in a file


@contextlib.contextmanager
def lock(out: pathlib.Path) -> Iterator[None]:
    """One study process per OUT at a time: two would train the same run dir at once."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise errors.ConfigError(
                f"--out={str(out)!r} is invalid: another study is running there (pid {handle.read().strip() or '?'}); "
                "allowed is an --out no other study process uses."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def run_all(runs: Sequence[Run], out: pathlib.Path, say: Callable[[str], None] = _say) -> dict[str, int]:
    """Runs every unfinished run in order (holding OUT's lock); a failed run is recorded and the study goes on."""
    check_recorded(runs)
    counts = {"skipped": 0, "ok": 0, "failed": 0}
    with lock(out):
        for i, run in enumerate(runs, 1):
            where = f"[{i}/{len(runs)}] {run.method.name} seed {run.seed}"
            if finished(run.workdir):
                counts["skipped"] += 1
                say(f"{where}: finished earlier, skipped")
                continue
            say(f"{where}: running in {run.workdir}")
            attempt = execute(run, out / CACHE_DIR)
            ok = attempt["exit_status"] == 0 and finished(run.workdir)
            counts["ok" if ok else "failed"] += 1
            say(
                f"{where}: {'done' if ok else 'FAILED (exit ' + str(attempt['exit_status']) + ')'} in "
                f"{attempt['wall_s']:.0f} s (log: {run.workdir / LOG_FILE})"
            )
    return counts
