"""The study command end to end: a tiny grid (the multi-view baseline and one schedule run, 1 seed, a few
steps of a shrunk quickstart) run by `python -m fnc_jax.study` in a subprocess, reported, rerun (nothing
re-trained) and refused with a changed override or a bad flag."""

import json
import pathlib
import subprocess
import sys

import pytest

from fnc_jax import errors
from fnc_jax.study import __main__ as cli
from fnc_jax.study import grids, report, runner

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
METHODS = ("multiview", "attraction_start0.5_ramp0.25")
TINY = [
    "--steps=4",
    "--set=batch_size=32",
    "--set=data.image_size=16",
    "--set=model.width_multiplier=0.125",
    "--set=log_every_steps=1",
    "--set=eval.probe_epochs=5",
    "--set=eval.compare_random_init=False",
]


def study(out: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    # The attraction run is named first: the runner still puts the baseline first.
    args = [sys.executable, "-m", "fnc_jax.study", "--grid=schedule", f"--methods={METHODS[1]},{METHODS[0]}"]
    return subprocess.run(
        [*args, "--seeds=0", f"--out={out}", *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900
    )


# Two real training processes (~2.5 minutes on 2 cores): the one end-to-end test of the study command in CI.
def test_a_tiny_grid_runs_reports_skips_when_rerun_and_refuses_a_changed_override(tmp_path):
    out = tmp_path / "study"
    first = study(out, *TINY)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[1/2] multiview seed 0: running" in first.stdout and "[2/2] attraction_start0.5_ramp0.25" in first.stdout

    summary = json.loads((out / "study.json").read_text())
    assert [m["name"] for m in summary["methods"]] == list(METHODS)
    assert [(r["method"], r["status"], r["exit_status"]) for r in summary["runs"]] == [
        (METHODS[0], "finished", 0),
        (METHODS[1], "finished", 0),
    ]
    baseline, schedule = summary["methods"]
    for m in (baseline, schedule):
        assert m["seeds_finished"] == [0] and m["metrics"]["knn_top1_k20"]["n"] == 1
    assert baseline["metrics"]["fn_precision_last_window"]["n"] == 0  # no cancellation: no precision
    assert schedule["metrics"]["fn_precision_last_window"]["n"] == 1
    own, base = schedule["metrics"]["linear_probe_top1"], baseline["metrics"]["linear_probe_top1"]
    assert schedule["vs_baseline"]["linear_probe_top1"]["mean"] == pytest.approx(own["mean"] - base["mean"])
    run = summary["runs"][1]
    assert "--config.total_steps=4" in run["command"] and "--config.seed=0" in run["command"]
    assert "--config.fn.start_fraction=0.5" in run["command"] and len(run["commits"]) == 1
    record = json.loads((out / "runs" / METHODS[1] / "seed0" / "study_run.json").read_text())
    assert len(record["attempts"]) == 1 and record["attempts"][0]["wall_s"] > 0
    assert "pretrain step 4/4" in (out / "runs" / METHODS[1] / "seed0" / "study.log").read_text()

    table = (out / "results.md").read_text()
    assert f"| {METHODS[0]} | 1/1 |" in table and f"| {METHODS[1]} | 1/1 |" in table
    assert f"| {METHODS[1]} | {METHODS[0]} | 1 |" in table  # the paired difference row
    for png in ("accuracy.png", "fn_precision.png", "schedule.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    again = study(out, *TINY)  # nothing re-trained
    assert again.returncode == 0, again.stderr
    assert "0 done, 2 skipped" in again.stdout
    assert len(json.loads((out / "runs" / METHODS[1] / "seed0" / "study_run.json").read_text())["attempts"]) == 1

    two_seeds = study(out, *TINY, "--report-only", "--seeds=0,1")
    assert two_seeds.returncode == 0, two_seeds.stderr
    assert f"| {METHODS[0]} | 1/2 (fewer than asked) |" in (out / "results.md").read_text()

    changed = study(out, *[f for f in TINY if f != "--steps=4"], "--steps=5")
    assert changed.returncode == 2
    error = changed.stderr.strip().splitlines()[-1]
    assert error.startswith("fnc_jax: error: ") and "holds a run with other overrides" in error, changed.stderr
    assert "total_steps=4" in error and "total_steps=5" in error


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--seeds=0,a", "--seeds='0,a' is invalid: allowed are distinct non-negative integers"),
        ("--steps=-1", "--steps='-1' is invalid: allowed are int values > 0"),
        ("--set=nofield", "--set='nofield' is invalid: allowed is FIELD=VALUE"),
        ("--set=fn.no_such=1", "override config.fn.no_such is invalid: no such config field"),
        ("--methods=nope", "--methods='nope' is invalid: allowed are methods of --grid=schedule"),
        ("--bogus=1", "unrecognized arguments: --bogus=1"),
        (
            "--readme=/no/such/README.md",
            "--readme='/no/such/README.md' is invalid: allowed is a file holding the lines",
        ),
    ],
)
def test_a_bad_flag_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, flag, message):
    out = tmp_path / "study"
    monkeypatch.setattr(sys, "argv", ["fnc_jax.study", "--grid=schedule", "--seeds=0", f"--out={out}", flag])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("fnc_jax: error: "), err
    assert message in err
    assert not out.exists()  # refused before anything was written


def test_the_command_line_error_is_the_only_line_on_stderr(tmp_path):
    # Nothing heavy (TensorFlow, JAX) is imported before the flags are checked: no log noise, under a second.
    result = study(tmp_path / "study", "--seeds=")
    assert result.returncode == 2
    assert (
        result.stderr == "fnc_jax: error: --seeds='' is invalid: allowed are distinct non-negative integers "
        "separated by commas (0,1,2).\n"
    )


def test_seeds_are_paired_with_the_baselines_first_and_recorded_overrides_are_kept(tmp_path):
    methods = runner.with_overrides(grids.grid("long"), {"total_steps": 3})
    runs = runner.plan(tuple(reversed(methods)), [1, 0], tmp_path)
    assert [(r.method.name, r.seed) for r in runs] == [
        ("long_multiview", 1),
        ("long_fnc_elimination", 1),
        ("long_fnc_attraction", 1),
        ("long_multiview", 0),
        ("long_fnc_elimination", 0),
        ("long_fnc_attraction", 0),
    ]
    assert runs[2].overrides == ("seed=1", "fn.mode=attraction", f"epochs={grids.LONG_EPOCHS}", "total_steps=3")
    assert runs[2].command[3] == f"--config={runner.REPO_ROOT / 'configs' / 'default.py'}"
    assert runs[2].command[4:] == [
        f"--workdir={tmp_path}/runs/long_fnc_attraction/seed1",
        *[f"--config.{o}" for o in runs[2].overrides],
    ]
    runner.check_recorded(runs)  # nothing recorded yet
    runs[2].workdir.mkdir(parents=True)
    record = {"overrides": [*runs[2].overrides[:-1], "total_steps=4"]}
    (runs[2].workdir / runner.RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(errors.ConfigError, match=r"long_fnc_attraction/seed1 holds a run with other overrides"):
        runner.check_recorded(runs)


def test_a_second_study_on_the_same_out_is_refused(tmp_path):
    with runner.lock(tmp_path):
        with pytest.raises(errors.ConfigError, match="another study is running there"):
            with runner.lock(tmp_path):
                pass
    with runner.lock(tmp_path):  # released: free again
        pass


def test_a_failed_run_is_reported_with_its_reason(tmp_path):
    (run,) = runner.plan(grids.grid("baselines")[:1], [0], tmp_path)
    assert report.run_entry(run)["status"] == "not run"
    run.workdir.mkdir(parents=True)
    attempt = {"commit": "abc", "dirty": False, "command": run.command, "wall_s": 12.5, "exit_status": 1}
    (run.workdir / runner.RUN_FILE).write_text(json.dumps({"overrides": list(run.overrides), "attempts": [attempt]}))
    (run.workdir / runner.LOG_FILE).write_text("step 1\nfnc_jax.loop.NonFiniteError: Non-finite loss | at step 3\n\n")
    entry = report.run_entry(run)
    assert entry["status"] == "failed: fnc_jax.loop.NonFiniteError: Non-finite loss / at step 3"
    assert (entry["commits"], entry["wall_s"], entry["exit_status"]) == (["abc"], 12.5, 1)


# A stand-in for `python -m fnc_jax.main` (argv: workdir, method, seed): writes what a finished run writes,
# accuracies set by method and seed; the method named "broken" fails, so failures, pairing and the report's
# statistics are checked in seconds (the real training processes are the end-to-end test above).
FAKE_RUN = """
import json, pathlib, sys
workdir, method, seed = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if method == "broken":
    sys.exit("RuntimeError: broken on purpose")
acc = 0.8 + 0.01 * seed + (0.02 if method == "better" else 0.0)
fn_mode = "none" if method == "base" else "attraction"
quality = {"pretrained": {"knn_top1_k20": acc, "knn_top1_k200": acc, "linear_probe_top1": acc + 0.05},
           "fn_precision_last_window": 0.5}
history = [{"step": s, "fn_precision": 0.1 * s, "mean_num_fn": 1.0, "fn_topk": s, "fn_threshold": 0.9} for s in (1, 2)]
(workdir / "results.json").write_text(json.dumps({"quality": quality, "preempted": False, "config": {"fn": {"mode": fn_mode}}}))
(workdir / "train_history.json").write_text(json.dumps({"history": history}))
"""


def test_the_runner_and_report_pair_seeds_record_failures_and_skip_finished_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(
        runner.Run,
        "command",
        property(lambda r: [sys.executable, "-c", FAKE_RUN, str(r.workdir), r.method.name, str(r.seed)]),
    )
    methods = (grids.Method("better", {"fn.mode": "attraction"}, "base"), grids.Method("base", {}, "base"))
    methods += (grids.Method("broken", {}, "base"),)
    runs = runner.plan(methods, [0, 1, 2], tmp_path)
    lines = []
    assert runner.run_all(runs, tmp_path, say=lines.append) == {"skipped": 0, "ok": 6, "failed": 3}
    assert lines[0] == f"[1/9] base seed 0: running in {tmp_path}/runs/base/seed0"
    assert lines[-1].startswith("[9/9] broken seed 2: FAILED (exit 1)")

    study = report.write("fake", methods, [0, 1, 2], runs, tmp_path)
    better, base, broken = study["methods"]
    assert better["metrics"]["knn_top1_k20"]["mean"] == pytest.approx(0.83)
    assert better["metrics"]["knn_top1_k20"]["std"] == pytest.approx(0.01)
    assert (better["metrics"]["knn_top1_k20"]["min"], better["metrics"]["knn_top1_k20"]["max"]) == pytest.approx(
        (0.82, 0.84)
    )
    diff = better["vs_baseline"]["linear_probe_top1"]
    assert (diff["n"], diff["mean"], diff["std"]) == (3, pytest.approx(0.02), pytest.approx(0.0, abs=1e-12))
    assert (
        base["metrics"]["fn_precision_last_window"]["n"] == 0
        and better["metrics"]["fn_precision_last_window"]["n"] == 3
    )
    assert broken["seeds_finished"] == [] and not base["vs_baseline"]
    assert {r["status"] for r in study["runs"] if r["method"] == "broken"} == {
        "failed: RuntimeError: broken on purpose"
    }
    assert json.loads((tmp_path / "study.json").read_text())["methods"][0]["name"] == "better"

    table = (tmp_path / "results.md").read_text()
    assert (
        "| better | 3/3 | 83.0 ± 1.0 [82.0, 84.0] | 83.0 ± 1.0 [82.0, 84.0] | 88.0 ± 1.0 [87.0, 89.0] | 50.0 ± 0.0"
        in table
    )
    assert "| broken | 0/3 (fewer than asked) |" in table
    assert "| better | base | 3 | +2.0 ± 0.0 [+2.0, +2.0] |" in table
    for png in ("accuracy.png", "fn_precision.png", "schedule.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n{report.README_BEGIN}\nold table\n{report.README_END}\nafter\n")
    report.update_readme(readme, study, "the command")
    text = readme.read_text()
    assert text.startswith(f"# Title\n{report.README_BEGIN}\n| method | seeds |") and text.endswith(
        f"Written by `the command`.\n{report.README_END}\nafter\n"
    )
    assert "old table" not in text and "| broken |" not in text  # only methods with a finished seed
    assert "| better | base | 3 | +2.0 ± 0.0 [+2.0, +2.0] |" in text and "Commit(s): `" in text
    report.update_readme(readme, study, "the command")
    assert readme.read_text() == text  # idempotent: the markers stay

    lines.clear()
    assert runner.run_all(runs, tmp_path, say=lines.append) == {"skipped": 6, "ok": 0, "failed": 3}  # retried
    assert len(json.loads((runs[0].workdir / runner.RUN_FILE).read_text())["attempts"]) == 1
    assert len(json.loads((runs[2].workdir / runner.RUN_FILE).read_text())["attempts"]) == 2
