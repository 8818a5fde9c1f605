"""The denominator of the per-view FNC loss, LSE_{j in D(i)} <z_a(i), K_j> / t, with a hand-written VJP.

D(i) is every column but the anchor's own (self) column, minus the `drop` columns (eliminated false
negatives). Its gradient with respect to the logits is the softmax over D, so the forward keeps per row
only the log-sum-exp and the backward rebuilds the softmax block by block and contracts it with the
candidates (d anchors) and the anchors (d candidates); a traced temperature gets -sum(dS * S) / t.

Blocks: the similarities are computed in (B, Cc) tiles, Cc columns of one candidate view at a time,
small enough to stay in cache, so that the elementwise work around the matmuls (exp, masks, the
false-negative score maximum) costs no trip to memory per (B, C) pass. The forward runs tile-major
(every anchor view of one tile, so the views' score maximum of a tile is final at once), the backward
view-major (one view's d anchors accumulate in cache over the tiles).

The positives (the anchor image's other views, always in D) enter from `own`, the similarities the
caller computed from gathered rows, and are masked out of the tiles with every own column: the
log-sum-exp and the target term (fnc.py) then see the same positive values, so a row whose
denominator is its targets has loss exactly 0. The shift of the log-sum-exp starts at the largest
positive logit; with unit-norm features and a static temperature (2 / t + ln C < 80) no logit can
exceed it by more than 2 / t, so no row maximum is needed; otherwise it is carried online over tiles.

Matmul passes: 4 with the tiles recomputed in the backward (forward, recompute, d anchors,
d candidates; memory a few tiles); 3 with `store_blocks` (memory the Va (B, C) blocks).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# exp(x) overflows float32 above x = 88.7; with the positive shift every term is below exp(2 / t), so
# the C terms sum below exp(2 / t + ln C): kept under this bound.
_MAX_LOG_TERM = 80.0
# Target tile size in float32 elements (B * Cc): 2 MiB.
_TILE_ELEMENTS = 1 << 19


class _Static(NamedTuple):
    num_samples: int  # N: candidate column v * N + g is view v of global sample g
    tile: int  # Cc, a divisor of N
    aggregation: str | None  # None, "max" or "mean": also return the views' aggregated raw similarities
    grad_candidates: bool  # False: the candidates are constants (the memory queue)
    grad_temperature: bool  # the temperature is traced and needs its cotangent
    store_blocks: bool  # keep the tiles for the backward instead of recomputing them
    fixed_shift: bool  # the positives' largest logit bounds the row (see the module docstring)


def _tile_size(num_samples: int, batch: int) -> int:
    """The largest divisor of N with B * Cc <= _TILE_ELEMENTS (N itself when only tiny ones exist)."""
    best = max(
        (c for c in range(1, num_samples + 1) if num_samples % c == 0 and batch * c <= _TILE_ELEMENTS), default=1
    )
    return best if best >= min(64, num_samples) else num_samples


def _similarities(anchor: Array, candidates: Array) -> Array:
    return jnp.dot(anchor, candidates.T, preferred_element_type=jnp.float32)


def _tile_columns(static: _Static, tile: Array, shape: tuple[int, int], global_ids: Array) -> tuple[Array, Array]:
    """The (B, Cc) bool mask of the anchor images' own columns (any view) in tile `tile`, and the tile's view."""
    start = tile * static.tile
    view, offset = start // static.num_samples, start % static.num_samples
    same_sample = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + offset == global_ids[:, None]
    return same_sample, view


def _tile_slice(x: Array, tile: Array, size: int, axis: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, tile * size, size, axis)


def _zero_like(*arrays: Array) -> Array:
    """A stop-gradient 0 with the arrays' sharding type (varying axes under shard_map): scan carries that
    start from a constant must match the body's outputs."""
    return jax.lax.stop_gradient(sum(a.reshape(-1)[0] * 0 for a in arrays))


# ----------------------------------------------------------------------------------------------
# Forward: tile-major.


def _forward(static: _Static, anchors, candidates, temperature, global_ids, drop, own):
    """(lse (Va, B), scores (B, C) or None, tiles (Va, T, B, Cc) or None)."""
    num_views, batch, _ = anchors.shape
    num_tiles = candidates.shape[0] // static.tile
    views = jnp.arange(num_views)
    zero = _zero_like(anchors, candidates, temperature)
    # Start: the positives (v != a), shifted by their largest logit; the tiles leave them out.
    positive_logits = jnp.where(jnp.eye(num_views, dtype=bool)[:, None, :], -jnp.inf, own / temperature)
    shift = jnp.max(positive_logits, axis=2)
    total = jnp.sum(jnp.exp(positive_logits - shift[..., None]), axis=2)

    def view_body(carry, x):
        acc, tiles = carry
        view, anchor, shift_a, total_a, tile, same_sample, tile_view, candidate_tile, drop_tile = x
        s = _similarities(anchor, candidate_tile)
        left_out = same_sample & (tile_view < num_views)
        if drop_tile is not None:
            left_out |= drop_tile
        logits = jnp.where(left_out, -jnp.inf, s / temperature)
        if not static.fixed_shift:  # online: rescale the running total to the new maximum
            new_shift = jnp.maximum(shift_a, jnp.max(logits, axis=1))
            total_a, shift_a = total_a * jnp.exp(shift_a - new_shift), new_shift
        total_a = total_a + jnp.sum(jnp.exp(logits - shift_a[:, None]), axis=1)
        if static.aggregation is not None:
            acc = jnp.maximum(acc, s) if static.aggregation == "max" else acc + s
        if tiles is not None:  # written in place into the carried buffer (no stacked-output copies)
            tiles = jax.lax.dynamic_update_slice(tiles, s[None, None], (view, tile, 0, 0))
        return (acc, tiles), (shift_a, total_a)

    def tile_body(carry, tile):
        shift, total, scores, tiles = carry
        candidate_tile = _tile_slice(candidates, tile, static.tile, 0)
        drop_tile = None if drop is None else _tile_slice(drop, tile, static.tile, 1)
        same_sample, tile_view = _tile_columns(static, tile, (batch, static.tile), global_ids)
        acc = None
        if static.aggregation is not None:
            start = -jnp.inf if static.aggregation == "max" else 0.0
            acc = jnp.full((batch, static.tile), start, jnp.float32) + zero

        def body(acc, x):
            return view_body(acc, (*x, tile, same_sample, tile_view, candidate_tile, drop_tile))

        (acc, tiles), (shift, total) = jax.lax.scan(body, (acc, tiles), (views, anchors, shift, total))
        if acc is not None:
            scores = jax.lax.dynamic_update_slice_in_dim(scores, acc, tile * static.tile, 1)
        return (shift, total, scores, tiles), None

    scores = tiles = None
    if static.aggregation is not None:
        scores = jnp.zeros((batch, candidates.shape[0]), jnp.float32) + zero
    if static.store_blocks:
        tiles = jnp.zeros((num_views, num_tiles, batch, static.tile), jnp.float32) + zero
    init = (shift, total, scores, tiles)
    (shift, total, scores, tiles), _ = jax.lax.scan(tile_body, init, jnp.arange(num_tiles))
    lse = shift + jnp.log(total)
    if scores is not None:
        scores = jax.lax.stop_gradient(scores if static.aggregation == "max" else scores / num_views)
    return lse, scores, tiles


# ----------------------------------------------------------------------------------------------
# Backward: view-major.


def _backward(static: _Static, residuals, g):
    anchors, candidates, temperature, global_ids, drop, lse, tiles = residuals
    num_views, batch, _ = anchors.shape
    num_tiles = candidates.shape[0] // static.tile
    zero = _zero_like(anchors, candidates, temperature, g)

    def tile_body(d_anchor, x):
        tile, view, anchor, anchor_t, lse_a, g_a = x
        candidate_tile = _tile_slice(candidates, tile, static.tile, 0)
        s = _similarities(anchor, candidate_tile) if tiles is None else tiles[view, tile]
        same_sample, tile_view = _tile_columns(static, tile, (batch, static.tile), global_ids)
        left_out = same_sample & (tile_view == view)  # the self column; the positives are in D
        if drop is not None:
            left_out |= _tile_slice(drop, tile, static.tile, 1)
        p = jnp.exp(jnp.where(left_out, -jnp.inf, s / temperature) - lse_a[:, None])
        ds = p * (g_a / temperature)[:, None]
        # (d, Cc) = anchor^T ds with the transpose made outside this loop: a plain (not transposed-operand)
        # matmul, which XLA:CPU gives to its fast GEMM (a transposed left operand falls back to a slower one).
        d_tile = anchor_t @ ds if static.grad_candidates else None
        ds_s = jnp.sum(ds * s) if static.grad_temperature else None
        return d_anchor + ds @ candidate_tile, (d_tile, ds_s)

    def view_body(d_candidates_t, x):
        view, anchor, lse_a, g_a = x
        anchor_t = anchor.T
        body = lambda d, tile: tile_body(d, (tile, view, anchor, anchor_t, lse_a, g_a))  # noqa: E731
        d_anchor, (d_tiles, ds_s) = jax.lax.scan(body, jnp.zeros_like(anchor) + zero, jnp.arange(num_tiles))
        if d_tiles is not None:
            d_candidates_t = d_candidates_t + d_tiles  # (T, d, Cc)
        return d_candidates_t, (d_anchor, None if ds_s is None else jnp.sum(ds_s))

    num_columns, dim = candidates.shape
    init = jnp.zeros((num_tiles, dim, static.tile), jnp.float32) + zero if static.grad_candidates else None
    d_candidates_t, (d_anchors, ds_s) = jax.lax.scan(view_body, init, (jnp.arange(num_views), anchors, lse, g))
    if d_candidates_t is None:
        d_candidates = jnp.zeros_like(candidates)
    else:
        d_candidates = jnp.transpose(d_candidates_t, (0, 2, 1)).reshape(num_columns, dim)
    # l = s / t, so d lse / d t = sum_j p_j * (-s_j / t^2) = -(1 / t) * sum_j (p_j / t) s_j.
    d_temperature = -jnp.sum(ds_s) / temperature if static.grad_temperature else jnp.zeros_like(temperature)
    return d_anchors, d_candidates, d_temperature, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _denominator(static: _Static, anchors, candidates, temperature, global_ids, drop, own):
    return _forward(static, anchors, candidates, temperature, global_ids, drop, own)[:2]


def _denominator_fwd(static, anchors, candidates, temperature, global_ids, drop, own):
    lse, scores, tiles = _forward(static, anchors, candidates, temperature, global_ids, drop, own)
    return (lse, scores), (anchors, candidates, temperature, global_ids, drop, lse, tiles)


def _denominator_bwd(static, residuals, cotangents):
    # The scores output is stop-gradient: its cotangent is ignored. `own` carries no gradient here: the
    # positives' logits are differentiated through the tiles (the own columns are in the backward's D).
    return _backward(static, residuals, cotangents[0])


_denominator.defvjp(_denominator_fwd, _denominator_bwd)


def denominator_lse(
    anchors: Array,
    candidates: Array,
    temperature: float | Array,
    own: Array,
    *,
    num_samples: int,
    global_ids: Array,
    drop: Array | None = None,
    aggregation: str | None = None,
    grad_candidates: bool = True,
    store_blocks: bool = False,
    unit_norm: bool = False,
) -> tuple[Array, Array | None]:
    """(Va, B) log sum_{j != self, not drop} exp(<anchors[a, i], candidates[j]> / t), tile by tile.

    Args:
      anchors: `(Va, B, d)` float32 anchor features; the anchor image's own columns for local sample i
        are `v * num_samples + global_ids[i]` (v < Va), its self column that of v = a.
      candidates: `(C, d)` float32 candidate features, C a multiple of N.
      temperature: a float, or a traced scalar (then it gets its cotangent).
      own: `(Va, B, Va)` <anchors[a, i], own column v> computed from gathered rows (no gradient here).
      drop: optional `(B, C)` bool columns also left out of the denominator (never own columns).
      aggregation: None, or "max" / "mean": also return the `(B, C)` max / mean over the anchor views of
        the raw similarities (stop-gradient), from the same tiles.
      grad_candidates: False when the candidates are constants (skips their gradient's matmul pass).
      store_blocks: keep the tiles for the backward (3 matmul passes, memory the Va blocks) instead of
        recomputing them (4 passes, memory a few tiles).
      unit_norm: anchors and candidates have norm <= 1 (l2-normalised), which bounds the logits.

    Returns:
      `(lse, scores)`, scores None without an aggregation.
    """
    static = _Static(
        num_samples=num_samples,
        tile=_tile_size(num_samples, anchors.shape[1]),
        aggregation=aggregation,
        grad_candidates=grad_candidates,
        grad_temperature=isinstance(temperature, jax.Array),
        store_blocks=store_blocks,
        fixed_shift=unit_norm
        and not isinstance(temperature, jax.Array)
        and 2.0 / temperature + math.log(candidates.shape[0]) < _MAX_LOG_TERM,
    )
    temperature = jnp.asarray(temperature, jnp.float32)
    own = jax.lax.stop_gradient(own)
    return _denominator(static, anchors, candidates, temperature, global_ids.astype(jnp.int32), drop, own)
