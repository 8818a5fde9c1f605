"""Faults: SIGTERM (preemption notice), kill -9 during checkpoint saves, and bad configs failing fast.

The SIGTERM and kill -9 tests drive real `python -m fnc_jax.main` training processes with the tiny
memory + EMA config shared with tests/test_resume.py (`fnc_test_runs.TINY`, 8 CPU devices), and
restart them in the same workdir the way a scheduler would. The compiled train step comes from the
session's persistent compilation cache after the first compile.
"""

import pathlib
import random
import re
import signal
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
import fnc_test_runs as runs  # noqa: E402

from fnc_jax import pretrain, step  # noqa: E402

TOTAL = runs.TINY["total_steps"]
RUN_TIMEOUT = 600  # s per training process: a hung run fails the test instead of hanging CI


def _resumed_from(text: str) -> int | None:
    match = re.search(r"Resumed from step (\d+)", text)
    return int(match.group(1)) if match else None


@pytest.mark.slow  # in CI: the 2-process CLI preemption (test_multiprocess_training) and test_resume
def test_sigterm_saves_at_the_next_step_and_the_restart_finishes(tmp_path, tmp_path_factory):
    workdir = tmp_path / "run"
    # Only the end of the run would save by itself: a checkpoint before step 8 comes from the SIGTERM.
    args = runs.cli_args(workdir, overrides={"checkpoint_every_steps": 1000})
    env = runs.subprocess_env(num_devices=8, cache=runs.cache_dir(tmp_path_factory))
    log1 = tmp_path / "first.log"
    proc = runs.start(args, log1, env)
    try:
        runs.wait_for(
            lambda: runs.progress_steps(log1.read_text(errors="replace")),
            procs=[proc],
            timeout=RUN_TIMEOUT,
            what="the first training step",
            log=log1,
        )
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=RUN_TIMEOUT)
    finally:
        runs.kill_all([proc])
    out1 = log1.read_text(errors="replace")
    assert code == 0, runs.tail(log1)
    results = runs.read_json(workdir / "results.json")
    stopped = results["steps"]
    assert results["preempted"] is True and 1 <= stopped < TOTAL, results
    assert f"Stopped for preemption at step {stopped}" in out1
    assert runs.checkpoint_steps(workdir) == [stopped]
    assert [h["step"] for h in runs.history(workdir)] == list(range(1, stopped + 1))

    code, out2 = runs.run(args, tmp_path / "second.log", env, timeout=RUN_TIMEOUT)
    assert code == 0, out2[-5000:]
    assert _resumed_from(out2) == stopped
    assert runs.progress_steps(out2) == list(range(stopped + 1, TOTAL + 1))
    results = runs.read_json(workdir / "results.json")
    assert results["preempted"] is False and results["steps"] == TOTAL
    assert [h["step"] for h in runs.history(workdir)] == list(range(1, TOTAL + 1))
    print(
        f"\nSIGTERM after step 1 was seen: stopped and saved at step {stopped}; the restart resumed there "
        f"and finished step {TOTAL}."
    )


def _complete_steps(workdir: pathlib.Path) -> list[int]:
    """Finished saves as the trainer will see them: orbax only names a step directory once it is complete."""
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def _saving_step(workdir: pathlib.Path, at_least: int):
    """A predicate: is a save of a step >= `at_least` in progress (its temporary directory exists)?"""

    def saving() -> bool:
        for name in runs.tmp_checkpoint_dirs(workdir):
            step = name.split(".", 1)[0]
            if step.isdigit() and int(step) >= at_least:
                return True
        return False

    return saving


def test_kill_9_during_checkpoint_saves_never_breaks_the_workdir(tmp_path, tmp_path_factory):
    """SIGKILL at a random moment while a save is in flight (its temporary directory exists); the
    restart resumes from the last complete checkpoint, cleans up, and finishes the run."""
    workdir = tmp_path / "run"
    # A save after every step, so a good part of the run is spent writing checkpoints.
    args = runs.cli_args(workdir, overrides={"checkpoint_every_steps": 1, "keep_checkpoints": 2})
    env = runs.subprocess_env(num_devices=8, cache=runs.cache_dir(tmp_path_factory))
    step = random.Random(1234).choice([2, 3])
    log = tmp_path / "killed.log"
    proc = runs.start(args, log, env)
    try:
        runs.wait_for(
            _saving_step(workdir, step), procs=[proc], timeout=RUN_TIMEOUT, what=f"a save of step >= {step}", log=log
        )
        in_flight = runs.tmp_checkpoint_dirs(workdir)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        runs.kill_all([proc])
    out = log.read_text(errors="replace")
    assert "Non-finite" not in out and "Traceback" not in out, runs.tail(log)
    complete = _complete_steps(workdir)
    print(f"\nSIGKILL with saves in flight {in_flight}; complete checkpoints {complete}")
    assert in_flight, "the kill did not land during a save"
    expected_resume = complete[-1] if complete else None
    assert expected_resume is None or expected_resume < TOTAL, "the run finished before it was killed"
    # The history is rewritten with every checkpoint: the kill lost no logged step a checkpoint covers.
    before = runs.history(workdir)
    assert [h["step"] for h in before] == list(range(1, len(before) + 1))
    assert len(before) >= (expected_resume or 0)

    code, out = runs.run(args, tmp_path / "final.log", env, timeout=RUN_TIMEOUT)
    assert code == 0, out[-5000:]
    assert _resumed_from(out) == expected_resume
    assert runs.progress_steps(out) == list(range((expected_resume or 0) + 1, TOTAL + 1))
    results = runs.read_json(workdir / "results.json")
    assert results["preempted"] is False and results["steps"] == TOTAL
    assert runs.tmp_checkpoint_dirs(workdir) == []  # leftovers of the killed saves were cleaned up
    assert runs.checkpoint_steps(workdir)[-1] == TOTAL
    assert int(runs.load_checkpoint(workdir, TOTAL)["['step']"]) == TOTAL
    after = runs.history(workdir)
    assert [h["step"] for h in after] == list(range(1, TOTAL + 1))  # every logged step, once
    assert after[: expected_resume or 0] == before[: expected_resume or 0]  # those before the kill kept as logged


# ----------------------------------------------------------------------------- bad configs fail fast


def _no_compilation(*args, **kwargs):
    raise AssertionError("a bad config got as far as building the model and compiling")


@pytest.mark.parametrize(
    "config_name, overrides, error, message",
    [
        ("default", {"data.name": "mnist_6k"}, ValueError, "data.name='mnist_6k' is not an embedded dataset"),
        (
            "default",
            {"data.source": "tfds", "data.name": "no_such_dataset_xyz"},
            ValueError,
            "data.name='no_such_dataset_xyz' is not a TFDS dataset",
        ),
        ("default", {"data.source": "hdf5"}, ValueError, "config.data.source='hdf5' is invalid"),
        (
            "default",
            {"batch_size": 12},
            ValueError,
            "config.batch_size=12 is invalid: allowed values are multiples of the device count (8)",
        ),
        (
            "default",
            {"fn.support_set": "support_only"},
            ValueError,
            "config.fn.support_set='support_only' needs support views, but config.views.support_size=0",
        ),
        (
            "default",
            {"memory.multiplier": 1},
            ValueError,
            "config.memory.multiplier=1 is invalid: allowed values are "
            "0 (no memory) or integers >= the number of views V = 2",
        ),
        (
            "default",
            {"data.image_size": 4},
            ValueError,
            "config.data.image_size=4 is invalid: allowed values are integers >= 8",
        ),
        (
            "default",
            {"batch_size": 8000},
            ValueError,
            "config.batch_size=8000 is invalid: the training split has only 4000 images",
        ),
        (
            "imagenet",
            {"data.data_dir": "{tmp}/no_imagenet_here"},
            FileNotFoundError,
            "TFDS dataset data.name='imagenet2012' is not prepared in data.data_dir='{tmp}/no_imagenet_here'. To "
            "prepare it once, first download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
            "https://image-net.org/download-images into MANUAL_DIR, then run: tfds build imagenet2012 "
            "--data_dir={tmp}/no_imagenet_here --manual_dir=MANUAL_DIR",
        ),
    ],
    ids=[
        "unknown-embedded",
        "unknown-tfds",
        "unknown-source",
        "batch-vs-devices",
        "support-only-no-support",
        "memory-below-views",
        "image-too-small",
        "batch-vs-dataset",
        "imagenet-not-prepared",
    ],
)
def test_bad_config_fails_before_compiling_and_names_the_field(
    tmp_path, monkeypatch, config_name, overrides, error, message
):
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    if config_name == "default":
        config = runs.tiny_config(**overrides)
    else:
        config = runs.load_config(config_name, **overrides)
    monkeypatch.setattr(step, "build_step", _no_compilation)
    workdir = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(error) as err:
        pretrain.run(config, str(workdir))
    elapsed = time.monotonic() - start
    assert message.format(tmp=tmp_path) in str(err.value)
    assert not (workdir / "config.json").exists()  # a bad config is never recorded (it would block the fix)
    assert elapsed < 60, f"failing took {elapsed:.1f} s"


def test_cli_bad_config_exits_fast_with_the_message(tmp_path):
    args = runs.cli_args(tmp_path / "run", overrides={"batch_size": 12})
    start = time.monotonic()
    code, out = runs.run(args, tmp_path / "log.txt", runs.subprocess_env(num_devices=8, cache=None), timeout=180)
    elapsed = time.monotonic() - start
    assert code == 2  # a user error: one line, no traceback
    assert (
        "fnc_jax: error: config.batch_size=12 is invalid: allowed values are multiples of the device count (8)" in out
    )
    assert "Traceback" not in out
    assert "Compiled (or reused) the pretrain step" not in out
    print(f"\nthe CLI failed in {elapsed:.1f} s (Python, TensorFlow and JAX imports included)")
