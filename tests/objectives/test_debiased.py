"""Tests of fnc_jax.objectives.debiased (DCL, HCL): a NumPy transcription of the definitions
(docs/related_objectives.md), identities with fnc_loss, elimination, sharding, validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fnc_jax.objectives import FNConfig, dcl_loss, fnc_loss, hcl_loss

# ----------------------------------------------------------------------------------------------
# The definitions transcribed literally (direct exponentials, loops over anchors and positives),
# on one device, in float64 (or long double where float64 would overflow).


def reference_loss(h, *, tau_plus, beta=None, t=0.1, hidden_norm=True, eliminated=None, dtype=np.float64):
    """Returns (loss, clamped) for (V, B, d) inputs: the scaled loss and, per (anchor, positive) pair,
    whether the clamp Ng >= M exp(-1/t) bound. `eliminated` is a (B, V*B) mask removed from the negatives;
    beta None = DCL, else HCL."""
    h = np.asarray(h, dtype)
    v, n, _ = h.shape
    z = h / np.sqrt(np.maximum((h * h).sum(-1, keepdims=True), 1e-12)) if hidden_norm else h
    cols = z.reshape(v * n, -1)
    total, clamped = dtype(0), []
    for a in range(v):
        for i in range(n):
            logits = cols @ z[a, i] / dtype(t)
            negs = [c for c in range(v * n) if c % n != i and (eliminated is None or not eliminated[i, c])]
            m = len(negs)
            neg = np.exp(logits[negs])
            if beta is None:
                mass = neg.sum()
            else:
                imp = neg**beta
                mass = (imp * neg).sum() / imp.mean() if m else dtype(0)
            for w in range(v):
                if w == a:
                    continue
                pos = np.exp(logits[w * n + i])
                ng = (mass - tau_plus * m * pos) / (1 - tau_plus)
                floor = m * np.exp(dtype(-1.0 / t))
                clamped.append(bool(ng < floor))
                ng = max(ng, floor)
                total += -np.log(pos / (pos + ng)) / ((v - 1) * n)
    return total * 2 / v, np.array(clamped)


def reference_grad(h, eps=1e-5, **kwargs):
    """Central finite differences of `reference_loss` (float64 / long double)."""
    dtype = kwargs.get("dtype", np.float64)
    x = np.asarray(h, dtype)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (reference_loss(up, **kwargs)[0] - reference_loss(down, **kwargs)[0]) / (2 * eps)
    return grad


def mixed_embeddings(seed, v, b, d=4, scale=1.0):
    """Half of the samples have tight views (pos >> negatives, the clamp binds), half loose views."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(1, b, d))
    noise = np.where(np.arange(b)[None, :, None] < b // 2, 0.05, 1.5)
    return (scale * (centers + noise * rng.normal(size=(v, b, d)))).astype(np.float32)


def objective(beta):
    """DCL for beta None, else HCL with that beta."""
    return dcl_loss if beta is None else functools.partial(hcl_loss, beta=beta)


# The vectorised form compiles about twice as fast as the default rematerialised scan; the tests of the
# definitions and of sharding run the default, test_low_memory_equals_vectorised ties the two together.
FAST = dict(low_memory=False)


def loss_and_grad(loss_fn, x):
    """((loss, aux), d loss / d x) of `loss_fn(x) -> (loss, aux)`, jitted (eager dispatch is slow)."""
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jnp.asarray(x))


def evaluate(loss_fn, x):
    return jax.jit(loss_fn)(jnp.asarray(x))


# (seed, V, tau_plus, beta, temperature, hidden_norm): V = 2 and V > 2, DCL (beta None) and HCL.
REFERENCE_CASES = [
    (21, 2, 0.1, None, 0.1, True),
    (25, 2, 0.5, None, 0.2, True),
    (43, 4, 0.3, None, 0.1, True),
    (21, 2, 0.1, 1.0, 0.1, True),
    (32, 3, 0.2, 0.5, 0.5, True),
    (41, 4, 0.1, 2.0, 0.1, True),
    (1, 3, 0.3, 1.0, 1.0, False),
]


@pytest.mark.parametrize("seed,v,tau_plus,beta,t,hidden_norm", REFERENCE_CASES)
def test_matches_numpy_reference_values_and_finite_difference_gradients(seed, v, tau_plus, beta, t, hidden_norm):
    h = mixed_embeddings(seed, v, 5)
    kwargs = dict(tau_plus=tau_plus, beta=beta, t=t, hidden_norm=hidden_norm)
    expected, clamped = reference_loss(h, **kwargs)
    assert clamped.any() and not clamped.all()  # the inputs exercise both branches of the clamp
    (loss, aux), grad = loss_and_grad(
        lambda x: objective(beta)(x, temperature=t, tau_plus=tau_plus, hidden_norm=hidden_norm), h
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, reference_grad(h, **kwargs), rtol=1e-4, atol=1e-5)
    assert aux["fn_mask"].shape == (5, v, 5) and not aux["fn_mask"].any()


@pytest.mark.parametrize("beta", [None, 1.0], ids=["dcl", "hcl"])
def test_raw_dot_products_stay_finite_where_direct_exponentials_overflow(beta):
    # Logits up to ~2600 (HCL's exponents twice that): exp overflows float32 and float64, not long double.
    h = mixed_embeddings(3, 3, 4, scale=3.0)
    kwargs = dict(tau_plus=0.2, beta=beta, t=0.1, hidden_norm=False)
    assert 710 < np.abs(np.einsum("vbd,wcd->vbwc", h, h)).max() / 0.1 < 11356 / 2
    expected, _ = reference_loss(h, dtype=np.longdouble, **kwargs)
    (loss, _), grad = loss_and_grad(lambda x: objective(beta)(x, temperature=0.1, tau_plus=0.2, hidden_norm=False), h)
    np.testing.assert_allclose(loss, float(expected), rtol=1e-5)
    ref_grad = reference_grad(h, eps=1e-6, dtype=np.longdouble, **kwargs).astype(np.float64)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-3, atol=1e-3 * np.abs(ref_grad).max())


def test_tau_plus_zero_is_fnc_without_cancellation_at_two_views_only():
    h = jnp.asarray(mixed_embeddings(4, 2, 6, d=8))
    for fn in (None, FNConfig(mode="elimination", selection="topk", topk=3)):
        (l_dcl, _), g_dcl = loss_and_grad(lambda x: dcl_loss(x, tau_plus=0.0, fn=fn, **FAST), h)
        (l_fnc, _), g_fnc = loss_and_grad(lambda x: fnc_loss(x, fn=fn or FNConfig(mode="none"), **FAST), h)
        np.testing.assert_allclose(l_dcl, l_fnc, rtol=1e-6)
        np.testing.assert_allclose(g_dcl, g_fnc, atol=1e-6)
    # With V > 2 the other positives are in fnc_loss's denominator but not among DCL's negatives.
    h4 = jnp.asarray(mixed_embeddings(4, 4, 6, d=8))
    l_dcl = evaluate(lambda x: dcl_loss(x, tau_plus=0.0, **FAST)[0], h4)
    np.testing.assert_allclose(l_dcl, reference_loss(h4, tau_plus=0.0)[0], rtol=1e-5)
    assert abs(float(l_dcl - evaluate(lambda x: fnc_loss(x, fn=FNConfig(mode="none"), **FAST)[0], h4))) > 0.1


def test_hcl_with_beta_zero_is_dcl_exactly():
    h = jnp.asarray(mixed_embeddings(5, 3, 6))
    fn = FNConfig(mode="elimination", selection="topk", topk=3)
    (l_h, _), g_h = loss_and_grad(lambda x: hcl_loss(x, beta=0.0, tau_plus=0.3, fn=fn, **FAST), h)
    (l_d, _), g_d = loss_and_grad(lambda x: dcl_loss(x, tau_plus=0.3, fn=fn, **FAST), h)
    np.testing.assert_array_equal(l_h, l_d)
    np.testing.assert_array_equal(g_h, g_d)


# ----------------------------------------------------------------------------------------------
# False-negative elimination.


def test_elimination_removes_the_selected_candidates_from_the_negatives():
    # Samples 0 and 1 are near duplicates; with a 0.9 threshold each selects both views of the other.
    rng = np.random.default_rng(6)
    base = np.eye(8)[:4] * 3.0
    base[1] = base[0] + 0.01
    noise = np.array([0.02, 0.02, 0.5, 0.5])[None, :, None]
    h = (base[None] + noise * rng.normal(size=(2, 4, 8))).astype(np.float32)
    fn = FNConfig(mode="elimination", selection="threshold", threshold=0.9)
    expected_mask = np.zeros((4, 8), bool)
    expected_mask[0, [1, 5]] = expected_mask[1, [0, 4]] = True
    for beta in (None, 1.0):
        loss, aux = evaluate(lambda x: objective(beta)(x, temperature=0.5, tau_plus=0.1, fn=fn, **FAST), h)
        np.testing.assert_array_equal(aux["fn_mask"].reshape(4, 8), expected_mask)
        np.testing.assert_array_equal(aux["num_fn"], [2, 2, 0, 0])
        expected, _ = reference_loss(h, t=0.5, tau_plus=0.1, beta=beta, eliminated=expected_mask)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
        assert abs(expected - reference_loss(h, t=0.5, tau_plus=0.1, beta=beta)[0]) > 0.1


@pytest.mark.parametrize("beta", [None, 0.5], ids=["dcl", "hcl"])
def test_elimination_matches_reference_with_per_row_counts_and_clamp(beta):
    # Clustered samples: |F(i)| varies across rows; M(i) and the clamp bound count the remaining negatives.
    rng = np.random.default_rng(7)
    labels = np.array([0, 0, 0, 1, 1, 2])
    h = (2.0 * rng.normal(size=(3, 8))[labels][None] + rng.normal(size=(3, 6, 8))).astype(np.float32)
    h[:, :2] = h[:1, :2] + 0.05 * rng.normal(size=(3, 2, 8))  # tight views: the clamp binds there
    fn = FNConfig(mode="elimination", selection="topk_and_threshold", topk=4, threshold=0.5)
    fn_loss = objective(beta)
    (loss, aux), grad = loss_and_grad(lambda x: fn_loss(x, tau_plus=0.4, fn=fn, **FAST), h)
    mask = np.asarray(aux["fn_mask"]).reshape(6, 18)
    assert len(set(np.asarray(aux["num_fn"]).tolist())) > 1
    kwargs = dict(tau_plus=0.4, beta=beta, eliminated=mask)
    expected, clamped = reference_loss(h, **kwargs)
    assert clamped.any() and not clamped.all()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, reference_grad(h, **kwargs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beta", [None, 1.0], ids=["dcl", "hcl"])
def test_no_negatives_left_gives_zero_loss_and_zero_gradient(beta):
    h = jnp.asarray(mixed_embeddings(8, 3, 4))
    everything = FNConfig(mode="elimination", selection="threshold", threshold=-2.0)
    for x, fn in ((h, everything), (h[:, :1], None)):  # all eliminated; B = 1 (no other image)
        (loss, _), grad = loss_and_grad(lambda y: objective(beta)(y, tau_plus=0.2, fn=fn, **FAST), x)
        assert float(loss) == 0.0
        np.testing.assert_array_equal(grad, np.zeros(x.shape))


def test_empty_selection_equals_no_cancellation():
    h = jnp.asarray(mixed_embeddings(9, 3, 6))
    empty = FNConfig(mode="elimination", selection="threshold", threshold=2.0)
    no_fn = evaluate(lambda x: dcl_loss(x, **FAST)[0], h)
    np.testing.assert_allclose(evaluate(lambda x: dcl_loss(x, fn=empty, **FAST)[0], h), no_fn)


def test_low_memory_equals_vectorised():
    # HCL runs every step DCL runs (and its second logsumexp); elimination exercises the negatives mask.
    h = jnp.asarray(mixed_embeddings(9, 3, 6))
    elim = FNConfig(mode="elimination", selection="topk", topk=2)
    (l1, _), g1 = loss_and_grad(lambda x: hcl_loss(x, beta=1.5, fn=elim), h)
    (l2, _), g2 = loss_and_grad(lambda x: hcl_loss(x, beta=1.5, fn=elim, low_memory=False), h)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    np.testing.assert_allclose(g1, g2, atol=1e-6)


def test_support_views_for_detection_only_and_metrics_as_fnc():
    rng = np.random.default_rng(10)
    labels = rng.integers(0, 2, size=6).astype(np.int32)
    h = (2.0 * rng.normal(size=(2, 8))[labels][None] + rng.normal(size=(4, 6, 8))).astype(np.float32)
    fn = FNConfig(mode="elimination", selection="topk", topk=3, support_as_positives=False)
    loss, aux = evaluate(lambda x: dcl_loss(x, fn=fn, labels=labels, **FAST), h)
    mask = np.asarray(aux["fn_mask"]).reshape(6, 12)  # views 0, 1 only; scored with all 4 views
    np.testing.assert_allclose(loss, reference_loss(h[:2], tau_plus=0.1, eliminated=mask)[0], rtol=1e-5)
    _, fnc_aux = evaluate(lambda x: fnc_loss(x, fn=fn, labels=labels, **FAST), h)
    assert set(aux) == set(fnc_aux)
    for key in fnc_aux:
        np.testing.assert_array_equal(aux[key], fnc_aux[key], err_msg=key)


# ----------------------------------------------------------------------------------------------
# Validation, traced arguments.


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("tau_plus", dict(tau_plus=1.0)),
        ("tau_plus", dict(tau_plus=-0.1)),
        ("tau_plus", dict(tau_plus=float("nan"))),
        ("tau_plus", dict(tau_plus=True)),
        ("beta", dict(beta=-1.0)),
        ("beta", dict(beta=float("inf"))),
        ("temperature", dict(temperature=0.0)),
        ("fn.mode", dict(fn=FNConfig(mode="attraction"))),
    ],
)
def test_invalid_arguments_name_the_field_and_what_is_allowed(field, kwargs):
    for fn_loss in (dcl_loss, hcl_loss):
        if "beta" in kwargs and fn_loss is dcl_loss:
            continue
        with pytest.raises(ValueError, match=f"^{field.replace('.', '[.]')}=") as err:
            fn_loss(jnp.ones((2, 3, 4)), **kwargs)
        assert "allowed values are" in str(err.value)


def test_traced_tau_plus_beta_and_temperature_are_accepted():
    h = jnp.asarray(mixed_embeddings(11, 2, 4))
    traced = jax.jit(lambda tp, b, t: hcl_loss(h, tau_plus=tp, beta=b, temperature=t, **FAST)[0])
    fixed = evaluate(lambda x: hcl_loss(x, tau_plus=0.2, beta=0.5, temperature=0.3, **FAST)[0], h)
    np.testing.assert_allclose(traced(0.2, 0.5, 0.3), fixed, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Sharded (8 simulated devices) == single device on the global batch, loss and gradients.

MESH_AXIS = "data"


@pytest.mark.parametrize("fn", [None, FNConfig(mode="elimination", selection="topk", topk=4)], ids=["none", "elim"])
@pytest.mark.parametrize("beta", [None, 1.0], ids=["dcl", "hcl"])
def test_sharded_equals_single_device(beta, fn):
    v, n = 3, 16  # 2 samples per device
    rng = np.random.default_rng(12)
    labels = rng.integers(0, 3, size=n).astype(np.int32)
    h = 2.0 * rng.normal(size=(3, 8))[labels][None] + rng.normal(size=(v, n, 8))
    h, labels = jnp.asarray(h.astype(np.float32)), jnp.asarray(labels)
    fn_loss = objective(beta)
    keys = ("mean_num_fn", "fn_precision", "fn_recall")
    specs = {"fn_mask": P(MESH_AXIS), "num_fn": P(MESH_AXIS), **{k: P() for k in keys}}

    def per_device(x, y):
        loss, aux = fn_loss(x, tau_plus=0.2, fn=fn, labels=y, axis_name=MESH_AXIS)
        return loss, {k: aux[k] for k in specs}

    mesh = Mesh(np.array(jax.devices()[:8]), (MESH_AXIS,))
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(None, MESH_AXIS), P(MESH_AXIS)), out_specs=(P(), specs))
    (l1, a1), g1 = loss_and_grad(lambda x: fn_loss(x, tau_plus=0.2, fn=fn, labels=labels, **FAST), h)
    (l8, a8), g8 = loss_and_grad(lambda x: sharded(x, labels), h)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    np.testing.assert_allclose(g8, g1, atol=1e-6)
    assert float(jnp.abs(g1).sum()) > 0
    assert fn is None or int(a1["num_fn"].sum()) > 0
    np.testing.assert_array_equal(a8["fn_mask"], a1["fn_mask"])
    np.testing.assert_array_equal(a8["num_fn"], a1["num_fn"])
    for k in keys:
        np.testing.assert_allclose(a8[k], a1[k], rtol=1e-6, err_msg=k)
