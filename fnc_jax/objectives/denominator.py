"""The denominator of the per-view FNC loss, LSE_{j in D(i)} <z_a(i), K_j> / t, with a hand-written VJP.

Its gradient with respect to the logits is the softmax over the denominator, so the backward pass needs
per row only the log-sum-exp: it rebuilds the softmax block by block (one fused exp, the self column
and the eliminated false negatives masked by an iota compare) and contracts it with the candidates
(d anchors) and the anchors (d candidates); the temperature, when traced, gets sum(dS * S) / -t. The
target term of the loss is linear in the logits and sparse (gathered rows), left to autodiff (fnc.py).
D(i) is every column but the anchor's own (self) column, minus the `drop` columns (elimination).

Two layouts, one maths:
- `scan_lse` (low_memory=True): a `lax.scan` over the anchor views in both passes; the forward keeps
  the (Va, B) log-sum-exps, the backward recomputes each view's (B, C) similarity block: 4 matmul
  passes in all (forward, recompute, d anchors, d candidates), peak memory a few (B, C) blocks. It can
  also return the raw similarities aggregated over the views (max / mean): with the official defaults
  those are the false-negative scores, so they cost no separate pass.
- `similarity_blocks` + `blocks_lse` (low_memory=False): one batched matmul whose (Va, B, C) blocks are
  kept for the backward (the matmuls' gradients left to autodiff): 3 passes, memory Va blocks.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class _Static(NamedTuple):
    num_samples: int  # N: column a * N + g is the self column of anchor view a, sample g
    aggregation: str | None  # None, "max" or "mean": also return the aggregated raw similarities
    grad_candidates: bool  # False: the candidates are constants (the memory queue)
    grad_temperature: bool  # the temperature is traced and needs its cotangent
    store_blocks: bool  # keep every view's (B, C) block for the backward instead of recomputing it
    positive_shift: bool  # shift the log-sum-exp by the positives' largest logit (see _row_lse)


# exp(x) overflows float32 above x = 88.7; the shift by a positive keeps every term below
# exp(2 / t) with unit-norm features, so the C terms sum below exp(2 / t + ln C): kept under this.
_MAX_LOG_TERM = 80.0


def _similarities(anchor: Array, candidates: Array) -> Array:
    return jnp.dot(anchor, candidates.T, preferred_element_type=jnp.float32)


def _left_out(shape: tuple[int, ...], view: Array, global_ids: Array, drop: Array | None, num_samples: int) -> Array:
    """(B, C) bool: the self column (from an iota, fused into its consumer) and the `drop` columns."""
    out = jax.lax.broadcasted_iota(jnp.int32, shape, 1) == (view * num_samples + global_ids)[:, None]
    return out if drop is None else out | drop


def _logits(s, view, global_ids, drop, temperature, num_samples) -> Array:
    """(B, C) logits with the self column (and `drop`) at -inf."""
    return jnp.where(_left_out(s.shape, view, global_ids, drop, num_samples), -jnp.inf, s / temperature)


def _own_values(s: Array, global_ids: Array, num_views: int, num_samples: int) -> Array:
    """(B, Va) the block's similarities at the anchor image's own columns v * N + g (stop-gradient)."""
    columns = jnp.arange(num_views)[None, :] * num_samples + global_ids[:, None]
    return jax.lax.stop_gradient(jnp.take_along_axis(s, columns, axis=1))


def _row_lse(s, own, view, global_ids, drop, temperature, static: _Static) -> Array:
    """(B,) log-sum-exp of the logits of one view's block.

    The shift m must keep exp(l - m) finite. With `positive_shift` (unit-norm features, a static
    temperature with 2 / t + ln C < 80) it is the largest positive logit (the own views other than self,
    always in the denominator): every l - m <= 2 / t, one term is exp(0), and no extra (B, C) pass is
    needed. Otherwise it is the row maximum, one more pass (taken on the raw similarities and divided
    after: dividing by t > 0 is monotone in floating point too, so it is bitwise the logits' maximum).
    """
    if static.positive_shift:
        is_self = jnp.arange(own.shape[1])[None, :] == view
        m = jnp.max(jnp.where(is_self, -jnp.inf, own), axis=1) / temperature
    else:
        left_out = _left_out(s.shape, view, global_ids, drop, static.num_samples)
        m = jnp.max(jnp.where(left_out, -jnp.inf, s), axis=1) / temperature
    terms = jnp.exp(_logits(s, view, global_ids, drop, temperature, static.num_samples) - m[:, None])
    return m + jnp.log(jnp.sum(terms, axis=1))


def _aggregate(acc: Array, s: Array, aggregation: str) -> Array:
    """Running max or sum over views of the raw similarities (the false-negative scores' aggregation)."""
    return jnp.maximum(acc, s) if aggregation == "max" else acc + s


def _finish_aggregate(acc: Array, num_views: int, aggregation: str) -> Array:
    return jax.lax.stop_gradient(acc if aggregation == "max" else acc / num_views)


def _block_gradient(s, view, global_ids, drop, temperature, lse, g, num_samples):
    """(dS (B, C), sum_ij dS_ij s_ij): d(sum_i g_i lse_i)/dS = g_i softmax_ij / t."""
    p = jnp.exp(_logits(s, view, global_ids, drop, temperature, num_samples) - lse[:, None])
    ds = p * (g / temperature)[:, None]
    return ds, jnp.sum(ds * s)


def _temperature_cotangent(ds_s: Array | None, temperature: Array, static: _Static) -> Array:
    # l = s / t, so d lse / d t = sum_j p_j * (-s_j / t^2) = -(1 / t) * sum_j (p_j / t) s_j.
    return -ds_s / temperature if static.grad_temperature else jnp.zeros_like(temperature)


def _forward(static: _Static, anchors, candidates, temperature, global_ids, drop):
    """(lse (Va, B), own (Va, B, Va), scores (B, C) or None, blocks (Va, B, C) or None), view by view."""
    num_views = anchors.shape[0]
    views = jnp.arange(num_views)

    def body(acc, x):
        view, anchor = x
        s = _similarities(anchor, candidates)
        own = _own_values(s, global_ids, num_views, static.num_samples)
        lse = _row_lse(s, own, view, global_ids, drop, temperature, static)
        acc = None if static.aggregation is None else _aggregate(acc, s, static.aggregation)
        return acc, (lse, own, s if static.store_blocks else None)

    init = None
    if static.aggregation is not None:
        # A zero with the anchors' and candidates' sharding type (varying axes under shard_map), so that
        # the constant start of the carry matches the body's output.
        zero = jax.lax.stop_gradient(anchors[0, 0, 0] * 0 + candidates[0, 0] * 0)
        start = -jnp.inf if static.aggregation == "max" else 0.0
        init = jnp.full((anchors.shape[1], candidates.shape[0]), start, jnp.float32) + zero
    acc, (lse, own, blocks) = jax.lax.scan(body, init, (views, anchors))
    scores = None if acc is None else _finish_aggregate(acc, num_views, static.aggregation)
    return lse, own, scores, blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _denominator(static: _Static, anchors, candidates, temperature, global_ids, drop):
    return _forward(static, anchors, candidates, temperature, global_ids, drop)[:3]


def _denominator_fwd(static, anchors, candidates, temperature, global_ids, drop):
    lse, own, scores, blocks = _forward(static, anchors, candidates, temperature, global_ids, drop)
    return (lse, own, scores), (anchors, candidates, temperature, global_ids, drop, lse, blocks)


def _denominator_bwd(static, residuals, cotangents):
    anchors, candidates, temperature, global_ids, drop, lse, blocks = residuals
    g = cotangents[0]  # the own values and scores outputs are stop-gradient: their cotangents are ignored

    def body(d_cand, x):
        view, anchor, lse_a, g_a, s = x
        s = _similarities(anchor, candidates) if s is None else s
        ds, ds_s = _block_gradient(s, view, global_ids, drop, temperature, lse_a, g_a, static.num_samples)
        if static.grad_candidates:
            d_cand = d_cand + jax.lax.dot_general(ds, anchor, (((0,), (0,)), ((), ())))
        return d_cand, (ds @ candidates, ds_s if static.grad_temperature else None)

    init = jnp.zeros_like(candidates) if static.grad_candidates else None
    views = jnp.arange(anchors.shape[0])
    d_candidates, (d_anchors, ds_s) = jax.lax.scan(body, init, (views, anchors, lse, g, blocks))
    if d_candidates is None:
        d_candidates = jnp.zeros_like(candidates)
    d_temperature = _temperature_cotangent(None if ds_s is None else jnp.sum(ds_s), temperature, static)
    return d_anchors, d_candidates, d_temperature, None, None


_denominator.defvjp(_denominator_fwd, _denominator_bwd)


def denominator_lse(
    anchors: Array,
    candidates: Array,
    temperature: float | Array,
    *,
    num_samples: int,
    global_ids: Array,
    drop: Array | None = None,
    aggregation: str | None = None,
    grad_candidates: bool = True,
    store_blocks: bool = False,
    unit_norm: bool = False,
) -> tuple[Array, Array, Array | None]:
    """(Va, B) log sum_{j != self, not drop} exp(<anchors[a, i], candidates[j]> / t), view by view.

    Args:
      anchors: `(Va, B, d)` float32 anchor features; view a's self column for local sample i is
        `a * num_samples + global_ids[i]`.
      candidates: `(C, d)` float32 candidate features.
      temperature: a float, or a traced scalar (then it gets its cotangent).
      drop: optional `(B, C)` bool columns also left out of the denominator (no gradient).
      aggregation: None, or "max" / "mean": also return the `(B, C)` max / mean over the anchor views of
        the raw similarities <anchors[a, i], candidates[j]> (stop-gradient), from the same blocks.
      grad_candidates: False when the candidates are constants (skips their gradient's matmul pass).
      store_blocks: keep the Va blocks for the backward (3 matmul passes, memory Va blocks) instead of
        recomputing them (4 passes, memory a few blocks).
      unit_norm: anchors and candidates have norm <= 1 (l2-normalised), which bounds the logits.

    Returns:
      `(lse, own, scores)`: own `(Va, B, Va)` are the blocks' similarities at the anchor image's own
      columns v * N + g (stop-gradient), scores None without an aggregation.
    """
    static = _Static(
        num_samples=num_samples,
        aggregation=aggregation,
        grad_candidates=grad_candidates,
        grad_temperature=isinstance(temperature, jax.Array),
        store_blocks=store_blocks,
        positive_shift=unit_norm
        and not isinstance(temperature, jax.Array)
        and 2.0 / temperature + math.log(candidates.shape[0]) < _MAX_LOG_TERM,
    )
    temperature = jnp.asarray(temperature, jnp.float32)
    return _denominator(static, anchors, candidates, temperature, global_ids.astype(jnp.int32), drop)
