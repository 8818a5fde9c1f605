"""Tests of the pretraining step (`fnc_jax.step`): the sharded step equals one device, and views cut on the device."""

import pathlib
import sys

import jax
import numpy as np
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "helpers"))
import fnc_test_runs as runs  # noqa: E402

from fnc_jax import checkpoints, configuration, parallel, pretrain, step  # noqa: E402
from fnc_jax.data import layout  # noqa: E402
from fnc_jax.objectives import FNSchedule  # noqa: E402


def _random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    v = configuration.num_views(config)
    s = config.data.image_size
    return {
        "images": rng.uniform(size=(config.batch_size, v, s, s, 3)).astype(np.float32),
        "labels": rng.integers(0, 3, size=config.batch_size).astype(np.int32),
    }


def _step_on(config, devices, batch, steps=1, learning_rate=0.05):
    """Runs `steps` train steps (`step.build_step` with a constant LR and a 3-class probe) on a mesh over
    `devices`; returns (first state, last state, metrics of every step)."""
    mesh = parallel.create_mesh(devices)
    fn = configuration.validate_pretrain(config, num_devices=len(devices))
    program = step.build_step(
        config, fn, mesh, num_classes=3, num_train=config.batch_size, schedule=optax.constant_schedule(learning_rate)
    )
    state = program.initial_state()
    history, first_state = [], None
    for _ in range(steps):
        state, metrics = program.step_fn(state, parallel.global_batch(batch, mesh))
        history.append(jax.device_get(metrics))
        first_state = first_state or jax.device_get(state)
    return first_state, state, history


def test_sharded_step_equals_single_device_and_loss_decreases():
    """Global BN, the gathered loss and the queue make 8 devices compute the 1-device step; training
    on a fixed batch then lowers the loss while the queue fills with labelled rows."""
    config = runs.step_config(**{"memory.multiplier": 4, "augment.blur": True})
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


def test_sharded_step_with_randaugment_on_the_device_equals_single_device():
    """The official recipe at full speed (augment.crop_on_device, RandAugment on): 8 devices cut the views
    from sharded canvases and run jitter, RandAugment, grayscale and blur on them as one device does."""
    config = runs.step_config(
        **{
            "augment.on_device": True,
            "augment.crop_on_device": True,
            "augment.use_randaugment": True,
            "augment.blur": True,
        }
    )
    n, v = config.batch_size, configuration.num_views(config)
    canvases, crops = layout.random_canvases(n, v, canvas=20, seed=1)
    labels = np.random.default_rng(1).integers(0, 3, n).astype(np.int32)
    batch = {"images": canvases, "crops": crops, "labels": labels}
    settings = step.StepSettings.from_config(config, configuration.fn_config(config), True, 8, 1).augment
    assert settings.path == layout.DEVICE_CROP and settings.randaugment  # the step's static settings carry both
    state1, _, m1 = _step_on(config, jax.devices()[:1], batch)
    state8, _, m8 = _step_on(config, jax.devices()[:8], batch)
    for key in ("loss", "contrastive_loss", "probe_loss", "grad_norm"):
        np.testing.assert_allclose(m8[0][key], m1[0][key], rtol=2e-4, err_msg=key)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{"loss.name": "dcl", "fn.mode": "elimination"}, {"loss.name": "hcl", "fn.mode": "none", "loss.beta": 0.5}],
    ids=["dcl-elimination", "hcl"],
)
def test_each_objective_trains_on_8_devices_and_resumes_exactly(overrides, tmp_path):
    """DCL and HCL in the real step on 8 devices: the loss on a fixed batch goes down, and 3 steps, a
    checkpoint, a restore into a fresh state and 3 more steps end bitwise where 6 straight steps end."""
    config = runs.step_config(**overrides)
    batch = _random_batch(config)
    mesh = parallel.create_mesh(jax.devices()[:8])
    fn = configuration.validate_pretrain(config, num_devices=8)
    program = step.build_step(config, fn, mesh, num_classes=3, num_train=16, schedule=optax.constant_schedule(0.05))
    global_batch = parallel.global_batch(batch, mesh)

    def run(state, steps):
        metrics = []
        for _ in range(steps):
            state, m = program.step_fn(state, global_batch)
            metrics.append(jax.device_get(m))
        return state, metrics

    straight, m_straight = run(program.initial_state(), 6)
    losses = [float(m["contrastive_loss"]) for m in m_straight]
    assert losses[-1] < losses[0], losses
    if overrides["fn.mode"] == "elimination":
        assert all(float(m["mean_num_fn"]) > 0 for m in m_straight)

    half, m_first = run(program.initial_state(), 3)
    store = checkpoints.Checkpoints(tmp_path / "checkpoints", keep=1)
    store.save(3, half)
    store.wait()
    resumed, m_second = run(store.restore(program.initial_state()), 3)
    store.close()
    for a, b in zip(m_first + m_second, m_straight, strict=True):
        assert {k: np.asarray(v).tolist() for k, v in a.items()} == {k: np.asarray(v).tolist() for k, v in b.items()}
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_false_negative_schedule_runs_in_one_compiled_step():
    """8 steps on 8 devices with cancellation from step 2 and k ramped 1 -> 3 over steps 2..6: the logged k,
    nothing selected before the start, and the one executable serving every step (the step is traced)."""
    config = runs.step_config(
        **{
            "total_steps": 8,
            "fn.start_fraction": 0.25,
            "fn.ramp_fraction": 0.5,
            "fn.ramp_from_topk": 1,
            "fn.ramp_from_threshold": 0.0,
        }
    )
    fn = configuration.validate_pretrain(config, num_devices=8)
    mesh = parallel.create_mesh(jax.devices()[:8])
    program = step.build_step(config, fn, mesh, num_classes=3, num_train=16, schedule=optax.constant_schedule(0.05))
    assert program.settings.fn_schedule == FNSchedule(start_step=2, ramp_steps=4, from_topk=1, from_threshold=0.0)
    state, batch = program.initial_state(), parallel.global_batch(_random_batch(config), mesh)
    metrics = []
    for _ in range(8):
        state, m = program.step_fn(state, batch)
        metrics.append(jax.device_get(m))
    assert [int(m["fn_topk"]) for m in metrics] == [0, 0, 1, 2, 2, 3, 3, 3]  # 1 + 2 * (step - 2) / 4, rounded half up
    assert [float(m["mean_num_fn"]) for m in metrics[:2]] == [0.0, 0.0]
    assert all(0 < float(m["mean_num_fn"]) <= int(m["fn_topk"]) for m in metrics[2:])
    assert program.step_fn._cache_size() == 1
    assert "FN k 3, cos > 0.000" in pretrain._summary({k: float(v) for k, v in metrics[-1].items()})
