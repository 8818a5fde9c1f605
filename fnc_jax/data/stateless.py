"""Stateless TensorFlow draws shared by the host augmentation modules (`augment`, `randaugment_host`).

Every draw is a `tf.random.stateless_*` draw from a shape-(2,) seed tensor, so a host view is a pure
function of (image, seed).
"""

import tensorflow as tf

# The host ops use explicit tf.cond / tf.switch_case and no Python control flow on tensors, so AutoGraph
# has nothing to convert; skipping its source transformation makes tracing (e.g. in
# `tf.data.Dataset.map`) several times faster.
plain_tf = tf.autograph.experimental.do_not_convert


def split(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """`num` independent sub-seeds of `seed`."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def uniform(seed: tf.Tensor, minval: float, maxval: float) -> tf.Tensor:
    """One float32 draw from U[minval, maxval)."""
    return tf.random.stateless_uniform([], seed, minval=minval, maxval=maxval)
