"""Tests of fnc_jax.objectives: parity with the official implementation, invariants, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fnc_jax.objectives import FNConfig, false_negative_mask, fnc_loss, fnc_memory_loss, update_memory

# ----------------------------------------------------------------------------------------------
# A direct NumPy transcription of docs/method.md §3-5 (loops over anchors; single device).


def np_l2(x):
    return x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def reference_mask(queries, candidates, n, fn, labels=None, cand_labels=None):
    """(B, C) mask from (V, B, d) queries and (C, d) candidates, per docs/method.md §4."""
    v_q, b = queries.shape[:2]
    c = candidates.shape[0]
    own_views = min(v_q, c // n)
    u = queries if fn.support_set == "all_views" else queries[2:]
    s = np.einsum("ubd,cd->ubc", u, candidates)
    s = s.max(0) if fn.aggregation == "max" else s.mean(0)
    mask = np.zeros((b, c), bool)
    for i in range(b):
        own = np.array([(col // n) < own_views and col % n == i for col in range(c)])
        if fn.selection == "oracle":
            mask[i] = (cand_labels == labels[i]) & ~own
            continue
        sel = ~own
        if fn.selection in ("threshold", "topk_and_threshold"):
            sel &= s[i] > fn.threshold
        if fn.selection in ("topk", "topk_and_threshold"):
            k = min(fn.topk, int((~own).sum()))
            order = sorted(np.flatnonzero(~own), key=lambda col: (-s[i, col], col))  # ties: lower index
            top = np.zeros(c, bool)
            top[order[:k]] = True
            sel &= top
        mask[i] = sel
    return mask


def reference_loss(h, tau=0.1, fn=FNConfig(), hidden_norm=True, labels=None):
    """In-batch loss on one device; h is (V, B, d)."""
    v, b, _ = h.shape
    z = np_l2(h) if hidden_norm else h
    cand = z.reshape(v * b, -1)
    cand_labels = None if labels is None else np.tile(labels, v)
    mask = np.zeros((b, v * b), bool) if fn.mode == "none" else reference_mask(z, cand, b, fn, labels, cand_labels)
    total = 0.0
    for a in range(v):
        for i in range(b):
            logits = cand @ z[a, i] / tau
            self_col = a * b + i
            pos = [w * b + i for w in range(v) if w != a]
            denom = [col for col in range(v * b) if col != self_col]
            targets = list(pos)
            if fn.mode == "attraction":
                targets += list(np.flatnonzero(mask[i]))
            elif fn.mode == "elimination":
                denom = [col for col in denom if not mask[i, col]]
            lse = np.log(np.sum(np.exp(logits[denom].astype(np.float64))))
            total += (lse - np.mean(logits[targets])) / b
    return total * 2.0 / v, mask


def random_embeddings(seed, v, b, d=16, clusters=None):
    rng = np.random.default_rng(seed)
    if clusters is None:
        return rng.normal(size=(v, b, d)).astype(np.float32), None
    labels = rng.integers(0, clusters, size=b)
    centers = rng.normal(size=(clusters, d)) * 2.0
    h = centers[labels][None] + rng.normal(size=(v, b, d))
    return h.astype(np.float32), labels.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Parity with the official implementation (tests/golden/README.md).


def _golden_groups(golden_path):
    z = np.load(golden_path)
    groups = {}
    for i in range(len(z["case_kind"])):
        key = (str(z["case_kind"][i]), str(z["case_input"][i]), int(z["case_topk"][i]), bool(z["case_hidden_norm"][i]))
        groups.setdefault(key, []).append(i)
    return z, groups


def test_golden_parity_with_official_implementation(golden_path):
    z, groups = _golden_groups(golden_path)
    assert sum(len(v) for v in groups.values()) == 172
    checked = 0
    for (kind, name, k, hidden_norm), cases in groups.items():
        b = int(z["case_B"][cases[0]])
        v = int(z["case_V"][cases[0]]) if "case_V" in z.files else int(z["case_support"][cases[0]]) + 2

        # Temperature and threshold are traced, so one compilation serves each group.
        @jax.jit
        def loss_and_grad(hidden, tau, threshold, k=k, hidden_norm=hidden_norm, kind=kind, name=name, v=v, b=b):
            fn = FNConfig(topk=k, threshold=threshold)
            if kind == "plain":
                f = lambda x: fnc_loss(x.reshape(v, b, -1), temperature=tau, hidden_norm=hidden_norm, fn=fn)
            else:
                ema = jnp.asarray(z[name + "_ema"]).reshape(v, b, -1)
                mem = jnp.asarray(z[name + "_memory"])
                f = lambda x: fnc_memory_loss(
                    x.reshape(v, b, -1), ema, mem, temperature=tau, hidden_norm=hidden_norm, fn=fn
                )
            return jax.value_and_grad(f, has_aux=True)(hidden)

        hidden = jnp.asarray(z[name] if kind == "plain" else z[name + "_hidden"])
        for i in cases:
            (loss, aux), grad = loss_and_grad(
                hidden, jnp.float32(z["case_temperature"][i]), jnp.float32(z["case_threshold"][i])
            )
            where = (
                f"case {i} ({kind}, {name}, k={k}, threshold={z['case_threshold'][i]}, tau={z['case_temperature'][i]})"
            )
            np.testing.assert_array_equal(
                np.asarray(aux["fn_mask"]).reshape(b, -1), z[f"c{i:03d}_fnmask"].astype(bool), err_msg=where
            )
            np.testing.assert_allclose(loss, z["case_loss"][i], rtol=1e-5, atol=1e-5, err_msg=where)
            np.testing.assert_allclose(grad, z[f"c{i:03d}_grad"], rtol=0, atol=1e-5, err_msg=where)
            checked += 1
    assert checked == 172


# ----------------------------------------------------------------------------------------------
# Invariants of docs/method.md §11.


def test_two_views_without_fn_is_simclr_nt_xent():
    h, _ = random_embeddings(0, 2, 6)
    z = np_l2(h.astype(np.float64))
    zz = np.concatenate([z[0], z[1]])  # 2N rows
    n = 6
    tau = 0.2
    expected = 0.0
    for a in range(2):
        for i in range(n):
            logits = zz @ z[a, i] / tau
            logits[a * n + i] = -np.inf
            expected += -(logits[(1 - a) * n + i] - np.log(np.exp(logits).sum())) / n
    loss, _ = fnc_loss(jnp.asarray(h), temperature=tau, fn=FNConfig(mode="none"))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("fn", [FNConfig(topk=0), FNConfig(threshold=1.0), FNConfig(mode="elimination", topk=0)])
def test_empty_selection_equals_multicrop_baseline(fn):
    h, _ = random_embeddings(1, 4, 5)
    baseline, _ = fnc_loss(jnp.asarray(h), fn=FNConfig(mode="none"))
    loss, aux = fnc_loss(jnp.asarray(h), fn=fn)
    assert int(aux["num_fn"].sum()) == 0
    np.testing.assert_allclose(loss, baseline, rtol=1e-6)


def test_elimination_at_two_views_is_equation_2():
    h, _ = random_embeddings(2, 2, 7)
    fn = FNConfig(mode="elimination", selection="topk", topk=3)
    loss, aux = fnc_loss(jnp.asarray(h), fn=fn, temperature=0.5)
    mask = np.asarray(aux["fn_mask"]).reshape(7, 14)
    z = np_l2(h.astype(np.float64))
    zz = z.reshape(14, -1)
    n = 7
    expected = 0.0
    for a in range(2):
        for i in range(n):
            s = zz @ z[a, i] / 0.5
            keep = [c for c in range(2 * n) if c != a * n + i and not mask[i, c]]
            expected += -np.log(np.exp(s[(1 - a) * n + i]) / np.exp(s[keep]).sum()) / n
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert mask.sum() == 3 * n


@pytest.mark.parametrize(
    "fn",
    [
        FNConfig(),
        FNConfig(mode="elimination", threshold=0.2),
        FNConfig(aggregation="mean", topk=3, threshold=-1.0),
        FNConfig(support_set="support_only", topk=4, threshold=0.1),
        FNConfig(mode="elimination", aggregation="mean", support_set="support_only", selection="topk", topk=5),
        FNConfig(selection="threshold", threshold=0.3),
        FNConfig(mode="none"),
    ],
    ids=lambda fn: f"{fn.mode}-{fn.aggregation}-{fn.support_set}-{fn.selection}-{fn.topk}",
)
def test_matches_numpy_reference(fn):
    h, _ = random_embeddings(3, 4, 6, clusters=2)
    expected, expected_mask = reference_loss(h.astype(np.float64), tau=0.3, fn=fn)
    for low_memory in (True, False):
        loss, aux = fnc_loss(jnp.asarray(h), temperature=0.3, fn=fn, low_memory=low_memory)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(aux["fn_mask"]).reshape(6, -1), expected_mask)


def test_mean_aggregation_hand_computed():
    # Two samples, two views each, d = 2. Scores of sample 0 against sample 1's columns:
    # view 0 of sample 0 = e1, view 1 = e2; sample 1's views = e1 and (e1+e2)/sqrt2.
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    d = (e1 + e2) / np.sqrt(2)
    h = np.stack([np.stack([e1, e1]), np.stack([e2, d])]).astype(np.float32)  # (V=2, B=2, 2)
    cand = h.reshape(4, 2)
    # Column 1 (view 0 of sample 1, = e1): scores 1 (view 0), 0 (view 1): max 1, mean 0.5.
    # Column 3 (view 1 of sample 1, = d): scores .707, .707: max .707, mean .707.
    for aggregation, selected in (("max", [1]), ("mean", [3])):
        fn = FNConfig(aggregation=aggregation, selection="topk", topk=1)
        mask = false_negative_mask(jnp.asarray(h[:, :1]), jnp.asarray(cand), fn=fn, num_samples=2)
        assert np.flatnonzero(np.asarray(mask)[0]).tolist() == selected


def test_support_only_scores_with_support_views_only():
    h, _ = random_embeddings(4, 4, 5)
    z = np_l2(h)
    fn = FNConfig(support_set="support_only", selection="topk", topk=2)
    mask = false_negative_mask(jnp.asarray(z), jnp.asarray(z.reshape(20, -1)), fn=fn, num_samples=5)
    scores = np.einsum("ubd,cd->ubc", z[2:], z.reshape(20, -1)).max(0)
    for i in range(5):
        own = [v * 5 + i for v in range(4)]
        scores[i, own] = -np.inf
        assert sorted(np.flatnonzero(np.asarray(mask)[i])) == sorted(np.argsort(-scores[i], kind="stable")[:2])
    with pytest.raises(ValueError, match="support_only"):
        fnc_loss(jnp.asarray(h[:2]), fn=fn)


def test_k_larger_than_candidates_equals_threshold_only():
    h, _ = random_embeddings(5, 3, 4)
    big_k, aux_k = fnc_loss(jnp.asarray(h), fn=FNConfig(topk=1000, threshold=0.0))
    thr, aux_t = fnc_loss(jnp.asarray(h), fn=FNConfig(selection="threshold", threshold=0.0))
    np.testing.assert_array_equal(aux_k["fn_mask"], aux_t["fn_mask"])
    np.testing.assert_allclose(big_k, thr, rtol=1e-6)
    everything, aux = fnc_loss(jnp.asarray(h), fn=FNConfig(selection="topk", topk=1000))
    assert aux["num_fn"].tolist() == [3 * 3] * 4  # every non-own column


def test_single_sample_two_views_has_zero_loss():
    h, _ = random_embeddings(6, 2, 1)
    loss, aux = fnc_loss(jnp.asarray(h))
    assert float(loss) == 0.0
    assert int(aux["num_fn"].sum()) == 0


def test_ties_keep_the_lower_column_index():
    base = np.eye(8, dtype=np.float32)[:6].reshape(2, 3, 8)  # one-hot rows: cosines exactly 0 or 1
    h = np.concatenate([base, base], axis=1)  # samples 3..5 duplicate samples 0..2
    mask = np.asarray(fnc_loss(jnp.asarray(h), fn=FNConfig(selection="topk", topk=1))[1]["fn_mask"])
    for i in range(3):
        # Sample i's duplicate i+3 scores exactly 1 in both views; view 0 (column i+3) wins the tie.
        assert np.flatnonzero(mask[i].reshape(-1)).tolist() == [i + 3]
        assert np.flatnonzero(mask[i + 3].reshape(-1)).tolist() == [i]


def test_oracle_selects_every_same_label_candidate_and_metrics():
    h, labels = random_embeddings(8, 3, 12, clusters=3)
    loss, aux = fnc_loss(jnp.asarray(h), fn=FNConfig(selection="oracle"), labels=jnp.asarray(labels))
    assert float(aux["fn_precision"]) == 1.0 and float(aux["fn_recall"]) == 1.0
    same = (labels[:, None] == labels[None, :]) & ~np.eye(12, dtype=bool)
    assert aux["num_fn"].tolist() == (3 * same.sum(1)).tolist()
    _, aux = fnc_loss(jnp.asarray(h), fn=FNConfig(selection="topk", topk=4), labels=jnp.asarray(labels))
    mask = np.asarray(aux["fn_mask"]).reshape(12, 3, 12)
    true_fn = (mask & same[:, None, :]).sum()
    assert int(aux["fn_true"]) == true_fn and int(aux["fn_selected"]) == mask.sum()
    np.testing.assert_allclose(aux["fn_precision"], true_fn / mask.sum())
    np.testing.assert_allclose(aux["fn_recall"], true_fn / (3 * same.sum()))
    with pytest.raises(ValueError, match="oracle"):
        fnc_loss(jnp.asarray(h), fn=FNConfig(selection="oracle"))


def test_support_views_for_detection_only():
    h, _ = random_embeddings(9, 4, 5)
    fn = FNConfig(mode="elimination", selection="topk", topk=2, support_as_positives=False)
    loss, aux = fnc_loss(jnp.asarray(h), fn=fn)
    assert aux["fn_mask"].shape == (5, 2, 5)
    z = np_l2(h)
    expected_mask = reference_mask(z, z[:2].reshape(10, -1), 5, fn)
    np.testing.assert_array_equal(np.asarray(aux["fn_mask"]).reshape(5, 10), expected_mask)
    # The loss itself is the 2-view loss over the main views with that mask eliminated.
    total = 0.0
    cand = z[:2].reshape(10, -1)
    for a in range(2):
        for i in range(5):
            s = cand @ z[a, i] / 0.1
            keep = [c for c in range(10) if c != a * 5 + i and not expected_mask[i, c]]
            total += -np.log(np.exp(s[(1 - a) * 5 + i]) / np.exp(s[keep]).sum()) / 5
    np.testing.assert_allclose(loss, total, rtol=1e-5)


def test_low_memory_equals_vectorised_including_gradients():
    h, _ = random_embeddings(10, 5, 6)
    for fn in (FNConfig(topk=3, threshold=0.0), FNConfig(mode="elimination", aggregation="mean", topk=4)):
        outs = [
            jax.value_and_grad(lambda x: fnc_loss(x, fn=fn, low_memory=lm)[0])(jnp.asarray(h)) for lm in (True, False)
        ]
        np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-6)
        np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-6)


def test_jit_and_finite_gradients_for_duplicate_and_zero_embeddings():
    h = np.zeros((3, 4, 8), np.float32)
    h[:, 1] = 1.0  # identical rows
    h[:, 2] = 1.0
    for fn in (FNConfig(), FNConfig(mode="elimination", selection="topk", topk=3), FNConfig(mode="none")):
        grad = jax.jit(jax.grad(lambda x: fnc_loss(x, fn=fn)[0]))(jnp.asarray(h))
        assert np.isfinite(np.asarray(grad)).all()
    bf16, _ = fnc_loss(jnp.asarray(random_embeddings(11, 2, 4)[0], jnp.bfloat16))
    assert bf16.dtype == jnp.float32


def test_memory_loss_update_and_layout():
    rng = np.random.default_rng(12)
    v, b, m, d = 2, 4, 3, 8
    queue = jnp.asarray(np_l2(rng.normal(size=(m * b, d))).astype(np.float32))
    ema = jnp.asarray(np_l2(rng.normal(size=(v, b, d))).astype(np.float32))
    new = update_memory(queue, ema.reshape(v * b, d))
    np.testing.assert_array_equal(new[: v * b], ema.reshape(v * b, d))
    np.testing.assert_array_equal(new[v * b :], queue[: (m - v) * b])
    labels = update_memory(-jnp.ones(m * b, jnp.int32), jnp.tile(jnp.arange(b), v))
    assert labels[v * b :].tolist() == [-1] * ((m - v) * b)
    loss, aux = fnc_memory_loss(
        jnp.asarray(rng.normal(size=(v, b, d)), jnp.float32), ema, new, labels=jnp.arange(b), memory_labels=labels
    )
    assert aux["fn_mask"].shape == (b, m, b) and np.isfinite(float(loss))
    with pytest.raises(ValueError, match="M >= V"):
        fnc_memory_loss(jnp.ones((3, b, d)), jnp.ones((3, b, d)), jnp.ones((2 * b, d)))


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("fn.mode", dict(mode="attract")),
        ("fn.aggregation", dict(aggregation="min")),
        ("fn.support_set", dict(support_set="support")),
        ("fn.selection", dict(selection="top")),
        ("fn.topk", dict(topk=-1)),
        ("fn.topk", dict(topk=2.5)),
        ("fn.threshold", dict(threshold=float("nan"))),
    ],
)
def test_config_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as err:
        FNConfig(**kwargs)
    assert "allowed" in str(err.value)


def test_invalid_temperature_rejected():
    with pytest.raises(ValueError, match="temperature"):
        fnc_loss(jnp.ones((2, 2, 4)), temperature=0.0)


# ----------------------------------------------------------------------------------------------
# Sharded (8 simulated devices) == single device on the global batch, loss and gradients.

MESH_AXIS = "data"


@functools.cache
def _mesh():
    return Mesh(np.array(jax.devices()[:8]), (MESH_AXIS,))


SHARDED_FNS = [
    FNConfig(topk=3, threshold=0.0),
    FNConfig(mode="elimination", selection="topk", topk=4),
    FNConfig(mode="none"),
    FNConfig(mode="attraction", aggregation="mean", support_set="support_only", selection="threshold", threshold=0.3),
]


@pytest.mark.parametrize("fn", SHARDED_FNS, ids=lambda fn: f"{fn.mode}-{fn.selection}")
def test_sharded_in_batch_equals_single_device(fn):
    v, n = 3, 16  # 2 samples per device
    h, labels = random_embeddings(13, v, n, clusters=3)
    labels = np.where(np.arange(n) < 11, 0, labels).astype(np.int32)  # uneven label distribution
    h, labels = jnp.asarray(h), jnp.asarray(labels)

    def single(x):
        return fnc_loss(x, fn=fn, labels=labels)

    keys = ("mean_num_fn", "fn_precision", "fn_recall", "fn_true", "fn_selected")
    specs = {"fn_mask": P(MESH_AXIS), "num_fn": P(MESH_AXIS), **{k: P() for k in keys}}

    def per_device(x, y):
        loss, aux = fnc_loss(x, fn=fn, labels=y, axis_name=MESH_AXIS)
        return loss, {k: aux[k] for k in specs}

    sharded = jax.shard_map(
        per_device, mesh=_mesh(), in_specs=(P(None, MESH_AXIS), P(MESH_AXIS)), out_specs=(P(), specs)
    )
    (l1, a1), g1 = jax.value_and_grad(single, has_aux=True)(h)
    (l8, a8), g8 = jax.jit(jax.value_and_grad(lambda x: sharded(x, labels), has_aux=True))(h)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    np.testing.assert_allclose(g8, g1, atol=1e-6)
    assert float(jnp.abs(g1).sum()) > 0
    np.testing.assert_array_equal(a8["fn_mask"], a1["fn_mask"])
    np.testing.assert_array_equal(a8["num_fn"], a1["num_fn"])
    for k in keys:
        np.testing.assert_allclose(a8[k], a1[k], rtol=1e-6, err_msg=k)


# The two FNC modes; the no-cancellation memory loss takes the same gathered path (and is covered sharded
# in-batch above and single-device against the golden file).
@pytest.mark.parametrize("fn", SHARDED_FNS[:2], ids=lambda fn: fn.mode)
def test_sharded_memory_loss_equals_single_device(fn):
    v, n, m, d = 2, 16, 3, 8
    rng = np.random.default_rng(14)
    h, labels = random_embeddings(15, v, n, d=d, clusters=2)
    ema = jnp.asarray(np_l2(h + 0.1 * rng.normal(size=h.shape)).astype(np.float32))
    old = jnp.asarray(np_l2(rng.normal(size=(m * n, d))).astype(np.float32))
    memory = update_memory(old, ema.reshape(v * n, d))
    mem_labels = update_memory(jnp.asarray(rng.integers(0, 2, m * n), jnp.int32), jnp.tile(jnp.asarray(labels), v))
    h, labels = jnp.asarray(h), jnp.asarray(labels)

    def single(x):
        return fnc_memory_loss(x, ema, memory, fn=fn, labels=labels, memory_labels=mem_labels)

    def per_device(x, e, y):
        loss, aux = fnc_memory_loss(x, e, memory, fn=fn, labels=y, memory_labels=mem_labels, axis_name=MESH_AXIS)
        return loss, aux["fn_mask"], aux["fn_precision"]

    sharded = jax.shard_map(
        per_device,
        mesh=_mesh(),
        in_specs=(P(None, MESH_AXIS), P(None, MESH_AXIS), P(MESH_AXIS)),
        out_specs=(P(), P(MESH_AXIS), P()),
    )
    (l1, a1), g1 = jax.value_and_grad(single, has_aux=True)(h)
    (l8, (mask8, prec8)), g8 = jax.value_and_grad(
        lambda x: (lambda o: (o[0], o[1:]))(sharded(x, ema, labels)), has_aux=True
    )(h)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    np.testing.assert_allclose(g8, g1, atol=1e-6)
    np.testing.assert_array_equal(mask8, a1["fn_mask"])
    np.testing.assert_allclose(prec8, a1["fn_precision"], rtol=1e-6)
