"""The hand-written VJP of the FNC loss (objectives/denominator.py) against `jax.grad` of a plain implementation.

The plain loss below is the loss as the maths writes it (docs/method.md §3, §5): all (V, B, C) logits,
`where` masks, `jax.nn.logsumexp`, differentiated by autodiff. The mask is `false_negative_mask`'s (checked
against the NumPy reference and the official golden values in tests/test_objectives.py), so this compares
the losses' values and gradients only: anchors, candidates (through the l2 normalisation) and temperature.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnc_jax.objectives import FNConfig, FNSchedule, false_negative_mask, fnc_loss, fnc_memory_loss, l2_normalize


def plain_loss(embeddings, temperature, fn, schedule=None, step=0, memory=None, ema=None):
    z = l2_normalize(embeddings)
    v, b, _ = z.shape
    candidates = z.reshape(v * b, -1) if memory is None else memory
    queries = z if memory is None else ema
    c = candidates.shape[0]
    if fn.mode == "none":
        mask = jnp.zeros((b, c), bool)
    else:
        mask = false_negative_mask(queries, candidates, fn=fn, num_samples=b, schedule=schedule, step=step)
    logits = jnp.einsum("abd,cd->abc", z, candidates) / temperature
    col = jnp.arange(c)[None, None, :]
    sample = jnp.arange(b)[None, :, None]
    view = jnp.arange(v)[:, None, None]
    own = ((col // b) < v) & ((col % b) == sample)
    is_self = col == view * b + sample
    denominator = ~is_self & ~mask[None] if fn.mode == "elimination" else ~is_self
    targets = (own & ~is_self) | mask[None] if fn.mode == "attraction" else own & ~is_self
    lse = jax.nn.logsumexp(jnp.where(denominator, logits, -jnp.inf), axis=2)
    target_mean = jnp.sum(jnp.where(targets, logits, 0.0), axis=2) / jnp.sum(targets, axis=2)
    return jnp.sum(jnp.mean(lse - target_mean, axis=1)) * 2.0 / v


def clustered(seed, v, b, d=16):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, d)) * 2.0
    return jnp.asarray((centers[rng.integers(0, 3, b)][None] + rng.normal(size=(v, b, d))).astype(np.float32))


FNS = {
    "attraction": FNConfig(topk=3, threshold=0.2),
    "elimination": FNConfig(mode="elimination", topk=3, threshold=0.2),
    "none": FNConfig(mode="none"),
    "threshold_only": FNConfig(selection="threshold", threshold=0.5),
    "mean": FNConfig(aggregation="mean", threshold=0.1),
}


@pytest.mark.parametrize("low_memory", [True, False])
@pytest.mark.parametrize("fn_name", list(FNS))
@pytest.mark.parametrize("v,b", [(2, 7), (4, 6), (5, 3)])
def test_gradients_equal_autodiff_of_the_plain_loss(v, b, fn_name, low_memory):
    fn = FNS[fn_name]
    h = clustered(v * 10 + b, v, b)
    ours = jax.value_and_grad(lambda x, t: fnc_loss(x, temperature=t, fn=fn, low_memory=low_memory)[0], (0, 1))
    plain = jax.value_and_grad(lambda x, t: plain_loss(x, t, fn), (0, 1))
    t = jnp.float32(0.3)  # traced: its cotangent is checked too
    (loss, (grad, grad_t)), (loss_p, (grad_p, grad_t_p)) = ours(h, t), plain(h, t)
    np.testing.assert_allclose(loss, loss_p, rtol=1e-6)
    np.testing.assert_allclose(grad, grad_p, atol=2e-6)
    np.testing.assert_allclose(grad_t, grad_t_p, rtol=1e-5)
    assert np.abs(grad).max() > 1e-3 and abs(float(grad_t)) > 1e-3  # not a vacuous comparison


@pytest.mark.parametrize("low_memory", [True, False])
@pytest.mark.parametrize("mode", ["attraction", "elimination"])
def test_schedule_with_a_traced_step_keeps_the_gradients(mode, low_memory):
    fn = FNConfig(mode=mode, topk=4, threshold=0.1)
    schedule = FNSchedule(start_step=2, ramp_steps=4, from_topk=1, from_threshold=0.6)
    h = clustered(3, 4, 6)

    @jax.jit
    def both(x, step):
        ours = jax.grad(lambda x: fnc_loss(x, fn=fn, low_memory=low_memory, schedule=schedule, step=step)[0])(x)
        plain = jax.grad(lambda x: plain_loss(x, 0.1, fn, schedule=schedule, step=step))(x)
        return ours, plain

    for step in (0, 3, 10):  # before the start, during the ramp, after it
        ours, plain = both(h, jnp.int32(step))
        np.testing.assert_allclose(ours, plain, atol=2e-6, err_msg=f"step {step}")


@pytest.mark.parametrize("low_memory", [True, False])
@pytest.mark.parametrize("mode", ["attraction", "elimination", "none"])
def test_memory_loss_gradients_equal_autodiff(mode, low_memory):
    fn = FNConfig(mode=mode, topk=3, threshold=0.2)
    v, b, m = 3, 5, 5
    h = clustered(7, v, b)
    ema = l2_normalize(h + 0.1 * clustered(8, v, b))
    rng = np.random.default_rng(9)
    old = l2_normalize(jnp.asarray(rng.normal(size=((m - v) * b, 16)).astype(np.float32)))
    memory = jnp.concatenate([ema.reshape(v * b, -1), old])
    ours = jax.grad(
        lambda x, t: fnc_memory_loss(x, ema, memory, temperature=t, fn=fn, low_memory=low_memory)[0], (0, 1)
    )
    plain = jax.grad(lambda x, t: plain_loss(x, t, fn, memory=memory, ema=ema), (0, 1))
    (grad, grad_t), (grad_p, grad_t_p) = ours(h, jnp.float32(0.2)), plain(h, jnp.float32(0.2))
    np.testing.assert_allclose(grad, grad_p, atol=2e-6)
    np.testing.assert_allclose(grad_t, grad_t_p, rtol=1e-5)


def test_python_float_temperature_gives_the_same_gradient_as_a_traced_one():
    h = clustered(1, 3, 4)
    fixed = jax.grad(lambda x: fnc_loss(x, temperature=0.25)[0])(h)
    traced = jax.grad(lambda x: fnc_loss(x, temperature=jnp.float32(0.25))[0])(h)
    np.testing.assert_allclose(fixed, traced, atol=1e-7)


@pytest.mark.parametrize("traced", [False, True])  # static t: the fixed shift; traced t: the online one
@pytest.mark.parametrize("mode", ["attraction", "elimination"])
def test_several_tiles_per_view(mode, traced):
    # B * N > 2**19 elements: each view's (B, C) block is split into several column tiles.
    fn = FNConfig(mode=mode, topk=5, threshold=0.3)
    h = clustered(11, 3, 768)
    t = jnp.float32(0.2) if traced else 0.2
    for low_memory in (True, False):
        loss, grad = jax.value_and_grad(lambda x: fnc_loss(x, temperature=t, fn=fn, low_memory=low_memory)[0])(h)
        loss_p, grad_p = jax.value_and_grad(lambda x: plain_loss(x, t, fn))(h)
        np.testing.assert_allclose(loss, loss_p, rtol=1e-6)
        np.testing.assert_allclose(grad, grad_p, atol=1e-7)


@pytest.mark.parametrize("low_memory", [True, False])
@pytest.mark.parametrize("fn_name", list(FNS))
# Tiles of 4: 3 and 2 per view (T = 9, odd; T = 4, even), and 2 views per tile (T = 2; T = 3).
@pytest.mark.parametrize("v,b", [(3, 12), (2, 8), (4, 2), (6, 2)])
def test_symmetric_path_equals_autodiff_with_many_tiles(v, b, fn_name, low_memory, monkeypatch):
    # One device, static temperature: the symmetric path (each pair of tiles once). Tiny tiles put several
    # sample blocks in each view (or several views in a tile), so pairs of tiles in the same view, in
    # different views, and the mirrored score and drop blocks are all exercised.
    from fnc_jax.objectives import denominator

    monkeypatch.setattr(denominator, "_SQUARE_TILE_ELEMENTS", 16)
    monkeypatch.setattr(denominator, "_MIN_TILE", 4)
    calls = []
    symmetric = denominator._symmetric_denominator
    monkeypatch.setattr(denominator, "_symmetric_denominator", lambda *a: calls.append(a[0]) or symmetric(*a))
    fn = FNS[fn_name]
    h = clustered(v * 100 + b, v, b)
    loss, grad = jax.value_and_grad(lambda x: fnc_loss(x, temperature=0.2, fn=fn, low_memory=low_memory)[0])(h)
    loss_p, grad_p = jax.value_and_grad(lambda x: plain_loss(x, 0.2, fn))(h)
    assert calls and calls[0].tile == 4 and calls[0].store_blocks == (not low_memory)
    np.testing.assert_allclose(loss, loss_p, rtol=1e-6)
    np.testing.assert_allclose(grad, grad_p, atol=1e-6)
    assert np.abs(grad).max() > 1e-3


def test_symmetric_path_is_only_taken_where_it_applies(monkeypatch):
    from fnc_jax.objectives import denominator

    calls = []
    symmetric = denominator._symmetric_denominator
    monkeypatch.setattr(denominator, "_symmetric_denominator", lambda *a: calls.append(1) or symmetric(*a))
    h = clustered(2, 3, 8)
    fnc_loss(h, temperature=0.2)
    assert len(calls) == 1
    fnc_loss(h, temperature=jnp.float32(0.2))  # traced temperature: no common shift is known
    fnc_loss(h, temperature=0.2, hidden_norm=False)  # raw dot products: the logits are unbounded
    ema = l2_normalize(h)
    fnc_memory_loss(h, ema, ema.reshape(24, -1), temperature=0.2)  # the queue is not the anchors
    assert len(calls) == 1


@pytest.mark.parametrize("aggregation", ["max", "mean"])
@pytest.mark.parametrize("v,b", [(3, 12), (2, 8), (4, 2), (6, 2)])
def test_symmetric_path_scores_equal_the_dense_aggregation(v, b, aggregation, monkeypatch):
    # The scores of the symmetric path combine the pairs' direct blocks with their mirrored ones (kept
    # untransposed, merged block by block at the end): every (anchor view, column) entry exactly once.
    from fnc_jax.objectives import denominator

    monkeypatch.setattr(denominator, "_SQUARE_TILE_ELEMENTS", 16)
    monkeypatch.setattr(denominator, "_MIN_TILE", 4)
    z = l2_normalize(clustered(v * 10 + b, v, b))
    own = jnp.einsum("abd,vbd->abv", z, z)
    for store_blocks in (False, True):
        _, scores = denominator.denominator_lse(
            z,
            None,
            0.2,
            own,
            num_samples=b,
            global_ids=jnp.arange(b),
            aggregation=aggregation,
            store_blocks=store_blocks,
            unit_norm=True,
        )
        dense = jnp.einsum("abd,cd->abc", z, z.reshape(v * b, -1))
        expected = jnp.max(dense, axis=0) if aggregation == "max" else jnp.mean(dense, axis=0)
        np.testing.assert_allclose(scores, expected, atol=1e-6)
