"""Tests of the false-negative schedule (`FNSchedule`): nothing before the start, the fixed selection after
the ramp, the ramped k and threshold in between (equal to the fixed selection at that k / threshold), one
compiled function for every step, and the same for the memory loss and DCL/HCL with elimination."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnc_jax.objectives import FNConfig, FNSchedule, dcl_loss, fnc_memory_loss, update_memory
from fnc_jax.objectives import fnc_loss as eager_fnc_loss

V, B, D = 4, 12, 16
FINAL = FNConfig(topk=8, threshold=0.2)
SCHEDULE = FNSchedule(start_step=10, ramp_steps=7, from_topk=1, from_threshold=0.9)


# Compiled (the settings static, the step traced): much faster here than running op by op.
fnc_loss = jax.jit(eager_fnc_loss, static_argnames=("fn", "schedule"))


def clustered(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=B)
    h = (rng.normal(size=(3, D)) * 2.0)[labels][None] + rng.normal(size=(V, B, D))
    return jnp.asarray(h, jnp.float32), jnp.asarray(labels, jnp.int32)


def expected_limits(step: int) -> tuple[int, float]:
    """The ramp written out: k rises linearly (rounded half up) from 1 to 8, the threshold moves from 0.9 to 0.2."""
    progress = min(max((step - SCHEDULE.start_step) / SCHEDULE.ramp_steps, 0.0), 1.0)
    return math.floor(1 + progress * (FINAL.topk - 1) + 0.5), 0.9 + progress * (FINAL.threshold - 0.9)


@pytest.mark.parametrize("mode", ["attraction", "elimination"])
def test_before_the_start_the_loss_is_the_baseline(mode):
    h, labels = clustered()
    fn = FNConfig(mode=mode, topk=8, threshold=0.2)
    baseline, _ = fnc_loss(h, fn=FNConfig(mode="none"), labels=labels)
    for step in (0, SCHEDULE.start_step - 1):
        loss, aux = fnc_loss(h, fn=fn, labels=labels, schedule=SCHEDULE, step=step)
        assert not np.any(aux["fn_mask"]) and int(aux["fn_topk"]) == 0
        assert float(loss) == float(baseline)


@pytest.mark.parametrize("mode", ["attraction", "elimination"])
def test_after_the_ramp_the_selection_is_the_fixed_one_exactly(mode):
    h, labels = clustered(1)
    fn = FNConfig(mode=mode, topk=8, threshold=0.2)
    fixed, fixed_aux = fnc_loss(h, fn=fn, labels=labels)
    end = SCHEDULE.start_step + SCHEDULE.ramp_steps
    for step in (end, end + 1000):
        loss, aux = fnc_loss(h, fn=fn, labels=labels, schedule=SCHEDULE, step=step)
        np.testing.assert_array_equal(aux["fn_mask"], fixed_aux["fn_mask"])
        assert float(loss) == float(fixed)
        assert int(aux["fn_topk"]) == 8 and float(aux["fn_threshold"]) == np.float32(0.2)


@pytest.mark.parametrize("selection", ["topk", "topk_and_threshold"])
def test_during_the_ramp_the_selection_follows_k_and_the_threshold(selection):
    """At each step of the ramp the scheduled mask is the fixed selection at the ramp's k and threshold,
    and with top-k alone every anchor keeps exactly k candidates."""
    h, labels = clustered(2)
    fn = FNConfig(selection=selection, topk=8, threshold=0.2)
    for step in range(SCHEDULE.start_step, SCHEDULE.start_step + SCHEDULE.ramp_steps + 1, 2):
        k, threshold = expected_limits(step)
        _, aux = fnc_loss(h, fn=fn, labels=labels, schedule=SCHEDULE, step=step)
        assert int(aux["fn_topk"]) == k
        np.testing.assert_allclose(float(aux["fn_threshold"]), threshold, rtol=1e-6)
        same = FNConfig(selection=selection, topk=k, threshold=float(aux["fn_threshold"]))
        _, fixed = fnc_loss(h, fn=same, labels=labels)
        np.testing.assert_array_equal(aux["fn_mask"], fixed["fn_mask"])
        if selection == "topk":
            assert aux["num_fn"].tolist() == [k] * B


def test_one_compiled_function_serves_every_step():
    h, labels = clustered(3)
    traces = []

    @jax.jit
    def loss_and_grad(h, step):
        traces.append(1)  # runs at trace time only
        return jax.value_and_grad(
            lambda x: eager_fnc_loss(x, fn=FINAL, labels=labels, schedule=SCHEDULE, step=step)[0]
        )(h)

    selected = []
    for step in range(0, 25, 3):
        loss, grad = loss_and_grad(h, jnp.int32(step))
        assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
        selected.append(float(loss))
    assert len(traces) == 1
    assert len(set(selected[:4])) == 1 and selected[-1] != selected[0]  # constant before the start, then changes


def test_memory_loss_and_dcl_follow_the_schedule():
    h, labels = clustered(4)
    ema = h / jnp.linalg.norm(h, axis=-1, keepdims=True)
    memory = update_memory(jnp.zeros((2 * V * B, D)), ema.reshape(V * B, D))
    memory_labels = update_memory(-jnp.ones(2 * V * B, jnp.int32), jnp.tile(labels, V))
    args = dict(labels=labels, memory_labels=memory_labels)
    none, _ = fnc_memory_loss(h, ema, memory, fn=FNConfig(mode="none"), **args)
    early, aux = fnc_memory_loss(h, ema, memory, fn=FINAL, schedule=SCHEDULE, step=0, **args)
    assert float(early) == float(none) and not np.any(aux["fn_mask"])
    late, _ = fnc_memory_loss(h, ema, memory, fn=FINAL, schedule=SCHEDULE, step=100, **args)
    fixed, _ = fnc_memory_loss(h, ema, memory, fn=FINAL, **args)
    assert float(late) == float(fixed)

    eliminate = FNConfig(mode="elimination", topk=8, threshold=0.2)
    plain, _ = dcl_loss(h, labels=labels)
    early, aux = dcl_loss(h, fn=eliminate, labels=labels, schedule=SCHEDULE, step=3)
    assert float(early) == float(plain) and int(aux["fn_topk"]) == 0
    late, aux = dcl_loss(h, fn=eliminate, labels=labels, schedule=SCHEDULE, step=50)
    assert float(late) == float(dcl_loss(h, fn=eliminate, labels=labels)[0]) and int(aux["fn_topk"]) == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(start_step=-1), "start_step=-1"),
        (dict(ramp_steps=2.5), "ramp_steps=2.5"),
        (dict(from_topk=True), "from_topk=True"),
        (dict(from_threshold=float("nan")), "from_threshold=nan"),
    ],
)
def test_invalid_schedules_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FNSchedule(**kwargs)


def test_a_ramp_from_above_the_final_k_is_refused():
    h, _ = clustered()
    with pytest.raises(ValueError, match=r"from_topk=12 .* 0\.\.fn\.topk=8"):
        eager_fnc_loss(h, fn=FINAL, schedule=FNSchedule(start_step=0, ramp_steps=4, from_topk=12), step=0)
