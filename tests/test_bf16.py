"""bfloat16 compute (`config.dtype='bfloat16'`): a few train steps on the 8 simulated devices track float32.

The networks compute in bf16 while parameters, optimiser state, BatchNorm statistics, the EMA copy, the
memory queue and the loss stay float32. Both runs start from the same initial state and see the same
batches. Two comparisons: the bf16 step applied to the float32 run's state at every step (pure precision:
within 1%), and the two independent trajectories (within a few %, the learning rate still in warm-up; FN
selection is discrete, so a flipped top-k / threshold decision moves the loss a little).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnc_jax import configuration, parallel, step
from fnc_jax.config_base import pretrain_config

STEPS = 3
BATCH, VIEWS, SIZE, CLASSES = 16, 4, 16, 10


def tiny_config(dtype: str):
    c = pretrain_config()
    c.dtype = dtype
    c.batch_size = BATCH
    c.total_steps = 20
    c.data.image_size = SIZE
    c.views.support_size = VIEWS - 2
    c.augment.use_randaugment = False
    c.model.depth = 18
    c.model.width_multiplier = 0.125
    c.model.proj_out_dim = 32
    c.memory.multiplier = 8  # the official path: EMA encoder + memory queue
    return c  # warm-up (10 epochs of 10 steps) is capped at total_steps - 1: the LR ramps over 19 steps


def build(dtype: str):
    config = tiny_config(dtype)
    mesh = parallel.create_mesh()
    fn = configuration.validate_pretrain(config, num_devices=mesh.size)
    # Not donating: the bf16 step is also applied to the float32 run's states, which must survive.
    program = step.build_step(config, fn, mesh, num_classes=CLASSES, num_train=10 * BATCH, donate_state=False)
    return mesh, program.initial_state(), program.step_fn


def batches(mesh):
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        host = {
            "images": rng.random((BATCH, VIEWS, SIZE, SIZE, 3), dtype=np.float32),
            "labels": rng.integers(0, CLASSES, BATCH).astype(np.int32),
        }
        yield parallel.global_batch(host, mesh)


def run(dtype: str, replay_step=None):
    """Trajectory of `dtype`; with `replay_step`, also that step's losses on this run's states."""
    mesh, state, step = build(dtype)
    losses, replayed, metrics = [], [], None
    for batch in batches(mesh):
        if replay_step is not None:
            replayed.append(float(replay_step(state, batch)[1]["contrastive_loss"]))
        state, metrics = step(state, batch)  # not donated: `state` stays valid for the replay above
        losses.append(float(metrics["contrastive_loss"]))
    return {"state": state, "metrics": metrics, "losses": losses, "step": step, "batch": batch, "replayed": replayed}


def _subjaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                yield from all_eqns(sub)


@pytest.fixture(scope="module")
def runs():
    bf16 = run("bfloat16")
    f32 = run("float32", replay_step=bf16["step"])
    return {"float32": f32, "bfloat16": bf16}


@pytest.mark.slow
def test_bf16_losses_track_float32(runs):
    f32, bf16 = runs["float32"]["losses"], runs["bfloat16"]["losses"]
    replayed = runs["float32"]["replayed"]  # the bf16 step on the float32 run's states
    assert all(np.isfinite(f32)) and all(np.isfinite(bf16))
    np.testing.assert_allclose(replayed, f32, rtol=0.01)
    np.testing.assert_allclose(bf16, f32, rtol=0.03)
    assert bool(runs["bfloat16"]["metrics"]["finite"])


@pytest.mark.slow
def test_bf16_state_and_loss_stay_float32(runs):
    state, metrics = runs["bfloat16"]["state"], runs["bfloat16"]["metrics"]
    assert int(state.step) == STEPS
    for name, tree in (
        ("params", state.params),
        ("batch_stats", state.batch_stats),
        ("opt_state", state.opt_state),
        ("ema_params", state.ema_params),
        ("ema_batch_stats", state.ema_batch_stats),
        ("memory", state.memory),
    ):
        dtypes = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}, (name, dtypes)
    for key in ("loss", "contrastive_loss", "grad_norm"):
        assert metrics[key].dtype == jnp.float32, key


@pytest.mark.slow
def test_bf16_step_computes_convolutions_in_bf16_and_the_loss_in_f32(runs):
    r = runs["bfloat16"]
    step, batch, state = r["step"], r["batch"], r["state"]
    jaxpr = jax.make_jaxpr(step)(state, batch).jaxpr
    eqns = list(all_eqns(jaxpr))
    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
    # The objective runs under shard_map (forward and its transpose): none of its operands is bf16.
    loss_maps = [e for e in eqns if e.primitive.name == "shard_map"]
    assert loss_maps
    for e in loss_maps:
        assert all(v.aval.dtype != jnp.bfloat16 for v in e.invars if hasattr(v, "aval"))
    dots = [e for e in eqns if e.primitive.name == "dot_general" and e.outvars[0].aval.ndim == 2]
    assert any(e.outvars[0].aval.dtype == jnp.float32 for e in dots)  # the similarity matmuls
