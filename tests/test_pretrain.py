"""Tests of pretraining runs (`fnc_jax.pretrain`): end to end with checkpoints and resume, the workdir's
config record, config validation, and the command line's handling of user errors."""

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
import fnc_test_runs as runs  # noqa: E402

from fnc_jax import checkpoints, config_base, configuration, errors, main, optim, pretrain  # noqa: E402
from fnc_jax.data import layout  # noqa: E402
from fnc_jax.objectives import FNConfig  # noqa: E402


def test_pretrain_end_to_end_checkpoints_and_resume(tmp_path):
    config = runs.step_config(total_steps=4, checkpoint_every_steps=2, log_every_steps=1)
    workdir = tmp_path / "run"
    results = pretrain.run(config, str(workdir))
    assert results["steps"] == 4 and not results["preempted"]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 16
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["steps"] == 4 and np.isfinite(saved["final_train_metrics"]["loss"])
    assert list(workdir.glob("events.out.tfevents.*"))
    assert 0.0 <= saved["final_train_metrics"]["fn_precision"] <= 1.0
    # Extending the run (total_steps may change) resumes at step 4 instead of starting again.
    config.total_steps = 6
    results = pretrain.run(config, str(workdir))
    assert results["steps"] == 6
    history = json.loads((workdir / "train_history.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]


def test_incompatible_workdir_is_refused_and_start_over_keeps_the_old_run(tmp_path):
    config = runs.step_config()
    checkpoints.record_config(tmp_path, config.to_dict(), start_over=False)
    (tmp_path / "checkpoints").mkdir()
    changed = runs.step_config(batch_size=32)
    with pytest.raises(ValueError, match="batch_size"):
        checkpoints.record_config(tmp_path, changed.to_dict(), start_over=False)
    allowed = runs.step_config(**{"eval.knn_ks": (5,), "log_every_steps": 3, "total_steps": 9})
    checkpoints.record_config(tmp_path, allowed.to_dict(), start_over=False)
    checkpoints.record_config(tmp_path, changed.to_dict(), start_over=True)
    backups = list(tmp_path.glob("previous-*"))
    assert len(backups) == 1 and (backups[0] / "checkpoints").is_dir() and (backups[0] / "config.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 32


def test_a_run_written_before_a_field_existed_resumes_while_it_is_at_its_default(tmp_path):
    """config.json of an older version lacks the fields added since: at their defaults they are no change."""
    defaults = config_base.pretrain_config().to_dict()
    old = runs.step_config().to_dict()
    del old["augment"]["crop_on_device"], old["augment"]["canvas_size"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    checkpoints.record_config(tmp_path, runs.step_config().to_dict(), start_over=False, defaults=defaults)
    (tmp_path / "config.json").write_text(json.dumps(old))
    moved = runs.step_config(**{"augment.on_device": True, "augment.crop_on_device": True})
    with pytest.raises(ValueError, match=r"\(augment\.crop_on_device, augment\.on_device changed"):
        checkpoints.record_config(tmp_path, moved.to_dict(), start_over=False, defaults=defaults)
    with pytest.raises(ValueError, match=r"\(augment\.canvas_size, augment\.crop_on_device changed"):
        checkpoints.record_config(tmp_path, runs.step_config().to_dict(), start_over=False)  # no defaults given
    # The quickstart sets the probe's LR multiplier to 0.1: a run from before it existed used 1.0.
    del old["optim"]["probe_lr_multiplier"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"\(optim\.probe_lr_multiplier changed"):
        checkpoints.record_config(tmp_path, runs.step_config().to_dict(), start_over=False, defaults=defaults)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"batch_size": 12}, "batch_size"),  # not divisible by 8 devices
        ({"fn.mode": "attract"}, "fn.mode"),
        ({"fn.support_set": "support_only", "views.support_size": 0}, "views.support_size"),
        ({"memory.multiplier": 2}, "memory.multiplier"),  # smaller than V = 3
        ({"data.image_size": 4}, "data.image_size"),
        ({"model.depth": 20}, "model.depth"),
        ({"optim.name": "sgd"}, "optim.name"),
        ({"augment.crop_on_device": True}, "augment.crop_on_device"),  # needs on_device
        ({"augment.solarize_p": 0.2}, "augment.solarize_p"),  # needs on_device
        ({"augment.canvas_size": -1}, "augment.canvas_size"),
        ({"ema.init": "zeros"}, "ema.init"),
        ({"loss.temperature": 0.0}, "loss.temperature"),
        ({"dtype": "float16"}, "dtype"),
        ({"loss.name": "nce"}, "loss.name"),
        ({"loss.tau_plus": 1.0}, "loss.tau_plus"),
        ({"loss.beta": -1.0}, "loss.beta"),
        ({"loss.name": "dcl", "fn.mode": "attraction"}, "fn.mode"),  # DCL / HCL: elimination or none
        ({"loss.name": "hcl", "fn.mode": "none", "memory.multiplier": 4}, "memory.multiplier"),  # in-batch only
        ({"fn.start_fraction": 1.5}, "fn.start_fraction"),
        ({"fn.start_fraction": 0.6, "fn.ramp_fraction": 0.6}, "fn.ramp_fraction"),  # the ramp ends after the run
        ({"fn.ramp_fraction": 0.5, "fn.ramp_from_topk": 4}, "fn.ramp_from_topk"),  # above fn.topk = 3
        ({"fn.ramp_fraction": 0.5, "fn.ramp_from_threshold": float("inf")}, "fn.ramp_from_threshold"),
        ({"fn.mode": "none", "fn.start_fraction": 0.5}, "fn.start_fraction"),  # nothing to schedule
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    config = runs.step_config(**overrides)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        configuration.validate_pretrain(config, num_devices=8)
    assert "allowed" in str(err.value)


@pytest.mark.parametrize(
    "overrides, path",
    [
        ({"augment.use_randaugment": True}, layout.HOST),
        ({"augment.on_device": True, "augment.use_randaugment": True}, layout.DEVICE_COLOUR),
        (
            {"augment.on_device": True, "augment.crop_on_device": True, "augment.use_randaugment": True},
            layout.DEVICE_CROP,
        ),
        ({"augment.on_device": True, "augment.use_randaugment": True, "augment.solarize_p": 0.2}, layout.DEVICE_COLOUR),
    ],
)
def test_valid_augment_configs_and_their_data_path(overrides, path):
    """The whole recipe, RandAugment included, on every data path."""
    config = runs.step_config(**overrides)
    configuration.validate_pretrain(config, num_devices=8)
    assert layout.data_path(config) == path


def test_official_config_is_valid_and_official():
    config = runs.load_config("imagenet")
    fn = configuration.validate_pretrain(config, num_devices=128)
    assert fn == FNConfig()  # the objective's defaults are the official ones
    assert configuration.num_views(config) == 10 and config.memory.multiplier == 16
    schedule, warmup, total = optim.schedule_from_config(config, 1_281_167)
    assert (warmup, total) == (3127, 31279)
    assert float(schedule(warmup)) == pytest.approx(6.4)


def test_the_command_line_turns_user_errors_into_one_line_and_status_2(monkeypatch, capsys):
    def bad_value(argv):
        raise errors.ConfigError(
            "config.fn.mode='attract' is invalid: allowed values are attraction, elimination, none."
        )

    monkeypatch.setattr(main, "run", bad_value)
    with pytest.raises(SystemExit) as exit_info:
        main.main(["fnc_jax.main"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err
        == "fnc_jax: error: config.fn.mode='attract' is invalid: allowed values are attraction, elimination, none.\n"
    )

    def bug(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(main, "run", bug)
    with pytest.raises(KeyError):  # a bug keeps its traceback
        main.main(["fnc_jax.main"])


def test_an_unusable_workdir_is_a_user_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(
        errors.ConfigError, match=r"--workdir='.*a_file/run' is invalid .* allowed are writable directories"
    ):
        checkpoints.record_config(blocker / "run", runs.step_config().to_dict(), start_over=False)
