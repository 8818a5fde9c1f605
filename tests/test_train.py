"""Tests of the pretraining system: the sharded step, the loop, checkpoints and config validation."""

import functools
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import common
from fnc_jax import checkpoints, config_base, configuration, parallel, train
from fnc_jax.objectives import FNConfig

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(**overrides):
    c = load_config("default")
    c.batch_size = 16
    c.views.support_size = 1
    c.model.width_multiplier = 0.125
    c.model.proj_layers = 2
    c.model.proj_out_dim = 16
    c.data.image_size = 16
    c.eval.final_report = False
    c.fn.topk = 3
    c.fn.threshold = 0.0
    c.update_from_flattened_dict(overrides)
    return c


def _random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    v = configuration.num_views(config)
    s = config.data.image_size
    return {
        "images": rng.uniform(size=(config.batch_size, v, s, s, 3)).astype(np.float32),
        "labels": rng.integers(0, 3, size=config.batch_size).astype(np.int32),
    }


def _step_on(config, devices, batch, steps=1, learning_rate=0.05):
    """Runs `steps` train steps on a mesh over `devices` with a constant LR; returns (state, metrics list)."""
    mesh = parallel.create_mesh(devices)
    replicated = parallel.replicated(mesh)
    fn = configuration.validate_pretrain(config, num_devices=len(devices))
    model, ema_model = train.build_model(config, 3), train.build_model(config, 0)
    schedule = optax.constant_schedule(learning_rate)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)), train=False))
    tx = train.optim.create_optimizer(
        name="lars", schedule=schedule, weight_decay=1e-4, momentum=0.9, trust_coefficient=1e-3,
        params=params["params"],
    )
    state = jax.jit(functools.partial(train.init_state, config, model, ema_model, tx), out_shardings=replicated)()
    step = jax.jit(
        functools.partial(
            train.train_step, model=model, ema_model=ema_model, tx=tx, schedule=schedule,
            settings=train.StepSettings.from_config(config, fn, probe=True, num_devices=mesh.size), mesh=mesh,
        ),
        out_shardings=(replicated, replicated),
    )
    history, first_state = [], None
    for _ in range(steps):
        state, metrics = step(state, parallel.global_batch(batch, mesh))
        history.append(jax.device_get(metrics))
        first_state = first_state or jax.device_get(state)
    return first_state, state, history


def test_sharded_step_equals_single_device_and_loss_decreases():
    """Global BN, the gathered loss and the queue make 8 devices compute the 1-device step; training
    on a fixed batch then lowers the loss while the queue fills with labelled rows."""
    config = tiny_config(**{"memory.multiplier": 4, "augment.blur": True})
    batch = _random_batch(config)
    state1, _, m1 = _step_on(config, jax.devices()[:1], batch)
    state8, final8, m8 = _step_on(config, jax.devices()[:8], batch, steps=6)
    for key in ("loss", "contrastive_loss", "probe_loss", "mean_num_fn", "fn_precision", "grad_norm"):
        np.testing.assert_allclose(m8[0][key], m1[0][key], rtol=2e-4, err_msg=key)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(state8.memory, state1.memory, atol=1e-5)
    assert float(m1[0]["mean_num_fn"]) > 0  # the FN path is exercised

    losses = [float(m["contrastive_loss"]) for m in m8]
    assert losses[-1] < losses[0], losses
    assert all(bool(m["finite"]) for m in m8) and int(final8.step) == 6
    v, n = configuration.num_views(config), config.batch_size
    # 6 steps of V*N rows replaced every zero row of the M*N queue; the labels follow the rows.
    assert int((np.abs(np.asarray(final8.memory)).sum(1) == 0).sum()) == 0
    np.testing.assert_array_equal(final8.memory_labels[: v * n], np.tile(batch["labels"], v))


@pytest.mark.slow  # two step compilations (~60 s); CI runs test_augment_jax's sharded cut instead
def test_step_cuts_views_from_sharded_canvases():
    """With augment.crop_on_device the sharded step cuts the views from (canvas, crops) itself: the same
    step as on the views cut beforehand and sent whole (to one device)."""
    config = tiny_config(**{"augment.on_device": True, "augment.crop_on_device": True, "augment.blur": True})
    n, v = config.batch_size, configuration.num_views(config)
    canvases, crops = common.random_canvases(n, v, canvas=20, seed=1)
    labels = np.random.default_rng(1).integers(0, 3, n).astype(np.int32)
    batch = {"images": canvases, "crops": crops, "labels": labels}
    settings = train.augment_jax.ViewAugment.from_config(config, num_devices=1)
    views = {"images": np.asarray(train.augment_jax.host_views(batch, settings)), "labels": batch["labels"]}
    assert views["images"].shape == (n, v, 16, 16, 3)
    _, _, cut_here = _step_on(config, jax.devices()[:8], batch)
    _, _, sent_whole = _step_on(config, jax.devices()[:1], views)
    for key in ("loss", "contrastive_loss", "probe_loss", "grad_norm"):
        np.testing.assert_allclose(cut_here[0][key], sent_whole[0][key], rtol=2e-4, err_msg=key)


def test_pretrain_end_to_end_checkpoints_and_resume(tmp_path):
    config = tiny_config(total_steps=4, checkpoint_every_steps=2, log_every_steps=1)
    workdir = tmp_path / "run"
    results = train.pretrain(config, str(workdir))
    assert results["steps"] == 4 and not results["preempted"]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 16
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["steps"] == 4 and np.isfinite(saved["final_train_metrics"]["loss"])
    assert list(workdir.glob("events.out.tfevents.*"))
    assert 0.0 <= saved["final_train_metrics"]["fn_precision"] <= 1.0
    # Extending the run (total_steps may change) resumes at step 4 instead of starting again.
    config.total_steps = 6
    results = train.pretrain(config, str(workdir))
    assert results["steps"] == 6
    history = json.loads((workdir / "train_history.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]


def test_incompatible_workdir_is_refused_and_start_over_keeps_the_old_run(tmp_path):
    config = tiny_config()
    checkpoints.record_config(tmp_path, config.to_dict(), start_over=False)
    (tmp_path / "checkpoints").mkdir()
    changed = tiny_config(batch_size=32)
    with pytest.raises(ValueError, match="batch_size"):
        checkpoints.record_config(tmp_path, changed.to_dict(), start_over=False)
    allowed = tiny_config(**{"eval.knn_ks": (5,), "log_every_steps": 3, "total_steps": 9})
    checkpoints.record_config(tmp_path, allowed.to_dict(), start_over=False)
    checkpoints.record_config(tmp_path, changed.to_dict(), start_over=True)
    backups = list(tmp_path.glob("previous-*"))
    assert len(backups) == 1 and (backups[0] / "checkpoints").is_dir() and (backups[0] / "config.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 32


def test_a_run_written_before_a_field_existed_resumes_while_it_is_at_its_default(tmp_path):
    """config.json of an older version lacks the fields added since: at their defaults they are no change."""
    defaults = config_base.pretrain_config().to_dict()
    old = tiny_config().to_dict()
    del old["augment"]["crop_on_device"], old["augment"]["canvas_size"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    checkpoints.record_config(tmp_path, tiny_config().to_dict(), start_over=False, defaults=defaults)
    (tmp_path / "config.json").write_text(json.dumps(old))
    moved = tiny_config(**{"augment.on_device": True, "augment.crop_on_device": True})
    with pytest.raises(ValueError, match=r"\(augment\.crop_on_device, augment\.on_device changed"):
        checkpoints.record_config(tmp_path, moved.to_dict(), start_over=False, defaults=defaults)
    with pytest.raises(ValueError, match=r"\(augment\.canvas_size, augment\.crop_on_device changed"):
        checkpoints.record_config(tmp_path, tiny_config().to_dict(), start_over=False)  # no defaults given
    # The quickstart sets the probe's LR multiplier to 0.1: a run from before it existed used 1.0.
    del old["optim"]["probe_lr_multiplier"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"\(optim\.probe_lr_multiplier changed"):
        checkpoints.record_config(tmp_path, tiny_config().to_dict(), start_over=False, defaults=defaults)


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
        ({"augment.on_device": True, "augment.use_randaugment": True}, "augment.use_randaugment"),
        ({"augment.crop_on_device": True}, "augment.crop_on_device"),  # needs on_device
        ({"augment.canvas_size": -1}, "augment.canvas_size"),
        ({"ema.init": "zeros"}, "ema.init"),
        ({"loss.temperature": 0.0}, "loss.temperature"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        configuration.validate_pretrain(config, num_devices=8)
    assert "allowed" in str(err.value)


def test_official_config_is_valid_and_official():
    config = load_config("imagenet")
    fn = configuration.validate_pretrain(config, num_devices=128)
    assert fn == FNConfig()  # the objective's defaults are the official ones
    assert configuration.num_views(config) == 10 and config.memory.multiplier == 16
    schedule, warmup, total = train.schedule_for(config, 1_281_167)
    assert (warmup, total) == (3127, 31279)
    assert float(schedule(warmup)) == pytest.approx(6.4)
