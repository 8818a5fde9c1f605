"""Device RandAugment (fnc_jax.data.randaugment_jax) against the host ops (randaugment_host.rand_augment_op) on a photo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from skimage import data as skdata

from fnc_jax.data import randaugment_host, randaugment_jax, randaugment_policy

PHOTO = skdata.astronaut()[::8, ::8].copy()  # 64 x 64 real photo, uint8
SIGNED = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _host(name, seed):
    index = randaugment_policy.OPS.index(name)
    return (
        randaugment_host.rand_augment_op(tf.constant(PHOTO), index, tf.constant([seed, 0], tf.int64))
        .numpy()
        .astype(int)
    )


@pytest.mark.parametrize("name", [n for n in randaugment_policy.OPS if n != "Cutout"])
def test_device_op_matches_host_op(name):
    fn = jax.jit(lambda q, key: randaugment_jax.op(name)(q, 7, key))
    q = jnp.asarray(PHOTO, jnp.float32)
    hosts = {}
    for seed in range(8):  # both signs of the signed ops
        out = _host(name, seed)
        hosts[out.tobytes()] = out
    for k in range(4):
        device = np.asarray(fn(q, jax.random.key(k))).astype(int)
        best = min(hosts.values(), key=lambda h: np.abs(h - device).sum())
        diff = np.abs(best - device)
        if name in SIGNED:  # nearest neighbour: a rounding tie may pick the neighbouring pixel
            assert (diff > 1).mean() < 5e-3, name  # measured 0.16 % (ShearY ties)
        else:
            assert diff.max() <= 1, name


def test_cutout_is_one_grey_square_and_identity_at_magnitude_0():
    q = jnp.asarray(PHOTO, jnp.float32)
    out = np.asarray(randaugment_jax.op("Cutout")(q, 7, jax.random.key(0)))
    grey = np.all(out == 128, axis=-1)
    assert 0 < grey.sum() <= 56 * 56
    np.testing.assert_array_equal(out[~grey], PHOTO[~grey])
    # Posterize is left out: magnitude 0 keeps 0 bits, a shift by 8 that TF leaves undefined on uint8.
    for name in ("Rotate", "ShearX", "TranslateY", "Cutout", "Solarize", "Brightness"):
        host0 = randaugment_host.rand_augment_op(
            tf.constant(PHOTO), randaugment_policy.OPS.index(name), tf.constant([0, 0], tf.int64), magnitude=0
        ).numpy()
        dev0 = np.asarray(randaugment_jax.op(name)(q, 0, jax.random.key(1)))
        np.testing.assert_array_equal(dev0, host0, err_msg=name)


# --- the whole policy, host against device, over many draws ------------------------------------------


def _host_over_seeds(fn, n: int) -> np.ndarray:
    """fn(seed) for the seeds [i, 7], i < n, as one batched tf.data pipeline (graph mode)."""
    seeds = tf.data.Dataset.range(n).map(lambda i: tf.stack([i, tf.constant(7, tf.int64)]))
    return seeds.map(fn).batch(n).get_single_element().numpy()


def _within_binomial(count: int, n: int, p: float, sds: float = 4.5) -> bool:
    return abs(count - n * p) <= sds * np.sqrt(n * p * (1 - p))


def test_policy_chooses_ops_uniformly_and_signs_evenly_on_host_and_device():
    """Each layer's op is uniform over the 16 ops on both sides, and a signed op's sign is + with p = 0.5 at
    the same magnitude (TranslateX by exactly 70 px, one way or the other)."""
    n, layers = 2000, randaugment_policy.NUM_LAYERS
    host = _host_over_seeds(lambda s: tf.stack([i for i, _ in randaugment_host.layer_draws(s, layers)]), n)
    keys = jax.random.split(jax.random.key(0), n)
    device = np.asarray(
        jax.jit(jax.vmap(lambda k: jnp.stack([i for i, _ in randaugment_jax.layer_draws(k, layers)])))(keys)
    )
    p = 1 / len(randaugment_policy.OPS)
    for draws in (host, device):
        assert draws.shape == (n, layers)
        counts = np.bincount(draws.ravel(), minlength=len(randaugment_policy.OPS))
        assert all(_within_binomial(c, n * layers, p) for c in counts), counts
        assert np.mean(draws[:, 0] == draws[:, 1]) < 2 * p  # the layers draw independently

    ramp = np.tile(np.arange(160, dtype=np.uint8)[None, :, None], (4, 1, 3))  # (4, 160, 3)
    ramp[ramp == 128] = 127  # no grey 128 in the image: the grey pixels are the fill
    index = randaugment_policy.OPS.index("TranslateX")
    m = 400
    host = _host_over_seeds(lambda s: randaugment_host.rand_augment_op(tf.constant(ramp), index, s), m)
    device = np.asarray(
        jax.jit(jax.vmap(lambda k: randaugment_jax.op("TranslateX")(jnp.asarray(ramp, jnp.float32), 7, k)))(
            jax.random.split(jax.random.key(1), m)
        )
    )
    for out in (host, device):
        grey = np.all(out == 128, axis=(1, 3))  # (m, 160) grey columns
        assert np.all(grey.sum(1) == 70)  # the magnitude: 70 px either way
        to_the_left = grey[:, -1]  # x_in = x + 70: the image moves left, the fill enters on the right
        np.testing.assert_array_equal(grey[:, :70].all(1), ~to_the_left)
        assert _within_binomial(to_the_left.sum(), m, 0.5)


def test_policy_image_statistics_match_between_host_and_device():
    """RandAugment(2, 7) of a photo, 512 draws on each side: the mean and spread of the images' mean
    grey level, their share of fill (grey 128) and of untouched pixels agree within sampling error."""
    n = 512
    image = PHOTO / np.float32(255.0)
    host = _host_over_seeds(lambda s: randaugment_host.rand_augment(tf.constant(image), s), n)
    images = jnp.broadcast_to(jnp.asarray(image), (n, *image.shape))
    device = np.asarray(jax.jit(randaugment_jax.batch_rand_augment)(images, jax.random.key(2)))

    def statistics(views):
        q = np.round(views * 255).astype(int)
        original = np.floor(np.minimum(image * 255.5, 255)).astype(int)
        return {
            "mean": views.mean(axis=(1, 2, 3)),
            "std": views.std(axis=(1, 2, 3)),
            "fill": np.all(q == 128, axis=-1).mean(axis=(1, 2)),
            "untouched": np.all(q == original, axis=-1).mean(axis=(1, 2)),
        }

    h, d = statistics(host), statistics(device)
    for name in h:
        error = np.sqrt(h[name].var() / n + d[name].var() / n)
        assert abs(h[name].mean() - d[name].mean()) <= 4.5 * error, (name, h[name].mean(), d[name].mean())
        # The spread over draws too (a wrong op mixture shows here even when means agree).
        assert 0.8 < h[name].std() / d[name].std() < 1.25, (name, h[name].std(), d[name].std())
