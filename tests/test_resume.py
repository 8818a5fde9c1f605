"""Exact resume, and the workdir's config record (refusal, --start_over, allowed changes).

How the run is stopped half-way (fixture `resumed`): the interrupted run is the real
training loop stopped by a real SIGTERM, delivered to this process by `os.kill` at a chosen step
boundary (a wrapper around `PreemptionWatcher.should_stop` sends it just before the watcher is asked
about step 3). From there on everything is the production path: the watcher's signal handler, the
save at the step boundary (step 3 is not a periodic checkpoint step: every 4), the early exit with
`preempted: true`, and a second `pretrain` call that restores the latest checkpoint and rebuilds the
input stream at step 3. The signal is what a scheduler sends; only its timing is chosen, so that the
stop lands on a known step inside the warm-up and between two periodic checkpoints. A subprocess
signalled at a wall-clock moment stops at an unpredictable step (tests/test_faults.py covers that,
through the CLI); stopping via `total_steps` would change the learning-rate schedule and so not test
resume at all. The runs are in-process to share one compiled train step.
"""

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
import fnc_test_runs as runs  # noqa: E402

from fnc_jax import checkpoints, optim, pretrain, step  # noqa: E402
from fnc_jax.data import sources  # noqa: E402

TOTAL, STOP_AT = runs.TINY["total_steps"], 3


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """One uninterrupted 8-step run and one stopped by SIGTERM at step 3 and resumed (same config)."""
    root = tmp_path_factory.mktemp("resume")
    return runs.straight_and_resumed(runs.tiny_config(), root, stop_at=STOP_AT, cache=runs.cache_dir(tmp_path_factory))


def test_sigterm_stops_at_the_step_boundary(resumed):
    first = resumed["first"]
    assert first["preempted"] is True
    assert first["steps"] == STOP_AT
    assert resumed["after_stop"]["checkpoints"] == [STOP_AT]  # the preemption save (periodic ones: 4, 8)
    assert [h["step"] for h in resumed["after_stop"]["history"]] == list(range(1, STOP_AT + 1))
    second = resumed["second"]
    assert second["preempted"] is False and second["steps"] == TOTAL


def test_resume_is_exact(resumed):
    """Bitwise-equal state (params, BN stats, optimiser, EMA, queue, probe) and identical logged metrics."""
    straight, interrupted = resumed["straight"], resumed["interrupted"]
    assert runs.checkpoint_steps(straight) == [4, TOTAL]
    assert runs.checkpoint_steps(interrupted) == [STOP_AT, 4, TOTAL]
    for at in (4, TOTAL):  # the periodic checkpoints of both runs (the resumed one crosses step 4)
        a, b = runs.load_checkpoint(straight, at), runs.load_checkpoint(interrupted, at)
        assert a.keys() == b.keys()
        different = [k for k in a if not np.array_equal(a[k], b[k])]
        assert not different, f"step {at}: {len(different)} leaves differ, e.g. {different[:5]}"

    final = runs.load_checkpoint(interrupted, TOTAL)
    # Memory + EMA mode really is on: a full queue with labels, an EMA that lags the online network,
    # an online probe, and the step counter at the end.
    assert int(final["['step']"]) == TOTAL
    assert final["['memory']"].shape == (2 * 16, 16) and np.all(final["['memory_labels']"] >= 0)
    assert any("ema_params" in k for k in final) and any("['probe']" in k for k in final)
    ema_kernel = next(k for k in final if k.startswith("['ema_params']['projection_head']") and "kernel" in k)
    assert not np.array_equal(final[ema_kernel], final[ema_kernel.replace("ema_params", "params", 1)])

    h_straight, h_resumed = runs.history(straight), runs.history(interrupted)
    print("\nstep  loss(straight)        loss(resumed)         learning_rate")
    for x, y in zip(h_straight, h_resumed):
        print(f"{x['step']:>4}  {x['loss']:.17g}  {y['loss']:.17g}  {y['learning_rate']:.9g}")
    assert [h["step"] for h in h_resumed] == list(range(1, TOTAL + 1))
    assert h_resumed == h_straight  # every metric of every step, exactly
    assert resumed["second"]["final_train_metrics"] == resumed["full"]["final_train_metrics"]


def test_learning_rate_schedule_continues(resumed):
    lrs = [h["learning_rate"] for h in runs.history(resumed["interrupted"])]
    config = runs.tiny_config()
    num_train = sources.get_source_info(config.data).num_examples[config.data.train_split]
    schedule, _, _ = optim.schedule_from_config(config, num_train)
    assert lrs == pytest.approx([float(schedule(s)) for s in range(TOTAL)], rel=1e-6)
    # Warm-up runs over steps 0..6 here: a schedule restarted at the resume would repeat lrs[0].
    assert lrs[STOP_AT] > lrs[STOP_AT - 1] > lrs[0]


def test_finished_run_accepts_evaluation_and_logging_changes(resumed, tmp_path, tmp_path_factory):
    """Changing only evaluation / logging / checkpoint cadence resumes (here: finds the run done)."""
    workdir = tmp_path / "run"
    shutil.copytree(resumed["straight"], workdir)
    changed = runs.tiny_config(
        **{
            "eval.batch_size": 128,
            "eval.knn_ks": (5,),
            "log_every_steps": 2,
            "checkpoint_every_steps": 3,
            "keep_checkpoints": 5,
        }
    )
    with runs.persistent_cache_in_process(runs.cache_dir(tmp_path_factory)):
        results = pretrain.run(changed, str(workdir))
    assert results["steps"] == TOTAL and results["preempted"] is False
    assert results["final_train_metrics"] == resumed["full"]["final_train_metrics"]  # not wiped
    assert runs.read_json(workdir / "config.json") == json.loads(json.dumps(changed.to_dict()))
    assert runs.history(workdir) == runs.history(resumed["straight"])  # nothing re-run, nothing lost


def _recorded_workdir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A workdir holding a run of the tiny config (config record, a checkpoint dir, results)."""
    workdir = tmp_path / "run"
    checkpoints.record_config(workdir, runs.tiny_config().to_dict(), start_over=False)
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    (workdir / "results.json").write_text("{}")
    return workdir


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("model.depth", {"model.depth": 34}),
        ("model.width_multiplier", {"model.width_multiplier": 0.5}),
        ("batch_size", {"batch_size": 32}),
        ("views.support_size", {"views.support_size": 1, "memory.multiplier": 3}),  # V = 3 needs M >= 3
    ],
)
def test_incompatible_config_is_refused(tmp_path, monkeypatch, field, overrides):
    workdir = _recorded_workdir(tmp_path)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    monkeypatch.setattr(step, "build_step", _must_not_be_called)
    with pytest.raises(ValueError, match=rf"different config \([^)]*{field}[^)]*changed\).*--start_over") as err:
        pretrain.run(runs.tiny_config(**overrides), str(workdir))
    assert str(workdir) in str(err.value)
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before  # nothing touched
    assert runs.read_json(workdir / "config.json") == json.loads(json.dumps(runs.tiny_config().to_dict()))


def test_start_over_moves_the_old_run_aside(tmp_path, monkeypatch):
    workdir = _recorded_workdir(tmp_path)
    old_config = runs.read_json(workdir / "config.json")

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop  # after the config is recorded: no need to train the new run

    monkeypatch.setattr(step, "build_step", stop)
    new = runs.tiny_config(batch_size=32)
    with pytest.raises(Stop):
        pretrain.run(new, str(workdir), start_over=True)
    moved = [p for p in workdir.iterdir() if p.name.startswith("previous-")]
    assert len(moved) == 1
    assert sorted(p.name for p in moved[0].iterdir()) == ["checkpoints", "config.json", "results.json"]
    assert (moved[0] / "checkpoints" / "4").is_dir()
    assert runs.read_json(moved[0] / "config.json") == old_config
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json", moved[0].name]
    assert runs.read_json(workdir / "config.json")["batch_size"] == 32


def test_cli_refuses_a_changed_model_with_a_clear_message(tmp_path, tmp_path_factory):
    workdir = _recorded_workdir(tmp_path)
    args = runs.cli_args(workdir, overrides={"model.depth": 34})
    code, out = runs.run(args, tmp_path / "log.txt", runs.subprocess_env(num_devices=8, cache=None), timeout=180)
    assert code != 0
    assert "model.depth changed" in out and "--start_over" in out and "previous-<time>" in out
    assert "Compiled (or reused) the pretrain step" not in out
    assert not any(p.name.startswith("previous-") for p in workdir.iterdir())


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("the refused run got past the config check")
