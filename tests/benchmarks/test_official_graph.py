"""`python -m benchmarks.official_graph` on a stand-in official objective.py: it runs, its JSON is sane, and its
equality check sees agreement.

The stand-in is this test's own small TF implementation of the official default FNC loss as docs/method.md
§3-5 defines it (multi-view NT-Xent over all V views, hidden_norm, FN scores = max over the anchor image's
V views of the cosine to every column, own columns excluded, top-k AND cosine > threshold, attraction),
written vectorised over the anchor views; it is not the official code.
"""

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

STAND_IN = """
from absl import flags
import tensorflow.compat.v1 as tf

FLAGS = flags.FLAGS


def add_contrastive_loss(hidden, hidden_norm=True, temperature=1.0, tpu_context=None, weights=1.0):
    views = 2 + FLAGS.support_size
    if hidden_norm:
        hidden = tf.math.l2_normalize(hidden, -1)
    n = tf.shape(hidden)[0] // views
    z = tf.reshape(hidden, [views, n, -1])  # view-major rows: (V, N, d)
    sims = tf.einsum("ank,ck->anc", z, hidden)  # (V, N, V*N) cosines of every anchor view to every column
    column_sample = tf.tile(tf.range(n), [views])  # sample index of each column
    own = tf.equal(tf.range(n)[:, None], column_sample[None, :])  # (N, V*N): the anchor image's own columns

    # False negatives: one set per sample, from the max over its views; no gradient through the selection.
    scores = tf.stop_gradient(tf.reduce_max(sims, axis=0))
    scores = tf.where(own, tf.fill(tf.shape(scores), -2.0), scores)
    _, top = tf.math.top_k(scores, k=FLAGS.fn_topk)
    in_top = tf.reduce_max(tf.one_hot(top, views * n), axis=1) > 0
    fn = tf.logical_and(tf.logical_and(in_top, scores > FLAGS.fn_threshold), tf.logical_not(own))

    # Attraction: targets = the V-1 other views of the same image and the false negatives.
    column_view = tf.repeat(tf.range(views), n)
    self_col = tf.logical_and(own[None], tf.equal(tf.range(views)[:, None, None], column_view[None, None, :]))
    targets = tf.logical_or(tf.logical_and(own[None], tf.logical_not(self_col)), fn[None])
    targets = tf.cast(targets, tf.float32)
    logits = sims / temperature
    lse = tf.reduce_logsumexp(tf.where(self_col, logits - 1e9, logits), axis=2)
    mean_target = tf.reduce_sum(logits * targets, axis=2) / tf.reduce_sum(targets, axis=2)
    return 2.0 / views * tf.reduce_sum(tf.reduce_mean(lse - mean_target, axis=1)) * weights
"""


def run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.official_graph", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_against_stand_in(tmp_path):
    (tmp_path / "objective.py").write_text(STAND_IN)
    out = tmp_path / "result.json"
    proc = run("--official-dir", str(tmp_path), "--shapes", "16x4", "--repeats", "2", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert json.loads(out.read_text()) == result
    (row,) = result["shapes"]
    assert (row["global_batch_N"], row["views_V"], row["dim_d"]) == (16, 4, 128)
    assert row["jax_devices_in_worker"] == 1  # no simulated devices in the worker
    sides = [row["official"], row["ours"]["default"], row["ours"]["fast"]]
    for side in sides:
        assert side["median_ms"] > 0 and side["best_ms"] > 0 and side["best_ms"] <= max(side["round_median_ms"])
        assert len(side["times_ms"]) == 2 and all(len(ts) == 2 for ts in side["times_ms"])
        assert side["loss"] > 0
    for path in ("default", "fast"):
        assert row["official_over_ours"][path] > 0 and row["ours_over_bound"][path] > 0
        assert row["loss_abs_diff"][path] < 1e-5, row["loss_abs_diff"]
        assert row["grad_max_abs_diff"][path] < 1e-5, row["grad_max_abs_diff"]
    assert row["grad_max_abs"] > 0
    assert row["bound_4pass_ms"] > 0 and row["official_over_bound"] > 0 and row["official_over_bound_paired"] > 0
    assert all(row["ours_over_bound_paired"][path] > 0 for path in ("default", "fast"))
    assert row["matmul_rate_median_gflops_per_s"] > 0
    assert all(len(row["matmul_rates_gflops_per_s"][s]) == 4 for s in ("official", "ours"))  # 2 rounds x 2 repeats


def test_missing_official_objective(tmp_path):
    proc = run("--official-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--official-dir" in lines[0] and "add_contrastive_loss" in lines[0]
    (tmp_path / "objective.py").write_text("def other():\n    pass\n")
    proc = run("--official-dir", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "--official-dir" in proc.stderr
