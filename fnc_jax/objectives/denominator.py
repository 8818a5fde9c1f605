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

Symmetric path (in-batch on one device, `candidates=None`): the candidates are the anchors' own rows, so
the (M, M) similarities (M = Va * N) are symmetric. Square (Tt, Tt) tiles: each diagonal tile and each
pair I < J is computed once; with one shift for all rows (1 / t, the largest possible logit of unit-norm
rows) a pair's exponentials give its rows' sums and, summed over the other axis, the mirrored tile's
rows' sums; the backward forms dS + dS^T of the pair in one tile, so 3 dots per pair serve both tiles.
About (T + 1) / 2T of the 4 (or 3) passes: 0.525 at N = 1024, V = 10 with Tt = 512. A pair's FN scores go
to its rows' images directly and to its columns' images through an untransposed (M, N) buffer, merged at
the end; stored tiles come from one batched product before the loops.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# exp(x) overflows float32 above x = 88.7; with the positive shift every term is below exp(2 / t), so
# the C terms sum below exp(2 / t + ln C): kept under this bound.
_MAX_LOG_TERM = 80.0
# Target tile size in float32 elements (B * Cc): 2 MiB.
_TILE_ELEMENTS = 1 << 19
# Narrower tiles cost more in loop overhead than they save: below this (and N), one tile per view.
_MIN_TILE = 64
# Square tiles of the symmetric path (Tt * Tt float32 elements): 1 MiB, 512 x 512.
_SQUARE_TILE_ELEMENTS = 1 << 18
# Padding of the rows of the mirrored scores (columns; _symmetric_forward).
_MIRRORED_PAD = 16


class _Static(NamedTuple):
    num_samples: int  # N: candidate column v * N + g is view v of global sample g
    tile: int  # Cc, a divisor of N; on the symmetric path Tt, a divisor or a multiple of N (_square_tile)
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
    return best if best >= min(_MIN_TILE, num_samples) else num_samples


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


def _positive_sums(own: Array, temperature: Array) -> tuple[Array, Array]:
    """(Va, B) the largest positive logit (v != a) and the positives' exp-sum shifted by it."""
    positive_logits = jnp.where(jnp.eye(own.shape[0], dtype=bool)[:, None, :], -jnp.inf, own / temperature)
    shift = jnp.max(positive_logits, axis=2)
    return shift, jnp.sum(jnp.exp(positive_logits - shift[..., None]), axis=2)


# ----------------------------------------------------------------------------------------------
# Forward: tile-major.


def _forward(static: _Static, anchors, candidates, temperature, global_ids, drop, own):
    """(lse (Va, B), scores (B, C) or None, tiles (Va, T, B, Cc) or None)."""
    num_views, batch, _ = anchors.shape
    num_tiles = candidates.shape[0] // static.tile
    views = jnp.arange(num_views)
    zero = _zero_like(anchors, candidates, temperature)
    # Start: the positives (v != a), shifted by their largest logit; the tiles leave them out.
    shift, total = _positive_sums(own, temperature)

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


# ----------------------------------------------------------------------------------------------
# One device, in-batch (`candidates=None`): the candidates are the anchors' own rows, so the (M, M)
# similarities (M = Va * N) are symmetric and each pair of square tiles I < J is computed once, for its
# rows and for its columns (the mirrored tile J, I is its transpose): about half the matmul work.


def _square_tile(num_views: int, num_samples: int) -> int:
    """The largest Tt with Tt * Tt <= _SQUARE_TILE_ELEMENTS that is a divisor of N (a tile lies in one view)
    or k * N with k a divisor of Va (a tile holds k whole views: small N)."""
    fits = [c for c in range(1, num_samples + 1) if num_samples % c == 0 and c * c <= _SQUARE_TILE_ELEMENTS]
    fits += [k * num_samples for k in range(2, num_views + 1) if num_views % k == 0]
    return max(c for c in fits if c * c <= _SQUARE_TILE_ELEMENTS)


class _Tiles(NamedTuple):
    """The square tiles of the (M, M) similarities and how they map onto the (N, M) layout."""

    rows: Array  # (T, Tt, d) the anchors, view-major, by tile
    rows_t: Array  # (T, d, Tt): plain left operands for the column gradients (module docstring)
    size: int
    num_samples: int

    @property
    def count(self) -> int:
        return self.rows.shape[0]

    @property
    def views_per_tile(self) -> int:
        return max(1, self.size // self.num_samples)

    @property
    def sample_rows(self) -> int:
        return min(self.size, self.num_samples)

    def z(self, tile: Array) -> Array:
        return self.rows[tile]

    def z_t(self, tile: Array) -> Array:
        return self.rows_t[tile]

    def similarities(self, tile_i: Array, tile_j: Array) -> Array:
        return _similarities(self.z(tile_i), self.z(tile_j))

    def batched(self, tiles_i, tiles_j) -> Array:
        """(P, Tt, Tt) the similarities of the tiles tiles_i[p] against tiles_j[p], one batched product."""
        return jnp.einsum("pid,pjd->pij", self.rows[tiles_i], self.rows[tiles_j], preferred_element_type=jnp.float32)

    def sample_start(self, tile: Array) -> Array:
        return (tile * self.size) % self.num_samples

    def own_columns(self, iota_r: Array, iota_c: Array, tile_i: Array, tile_j: Array) -> Array:
        """(Tt, Tt) bool: the row's and the column's images are the same (any views)."""
        if self.views_per_tile > 1:  # whole views: the pattern is the same in every tile
            return iota_r % self.num_samples == iota_c % self.num_samples
        return iota_r + self.sample_start(tile_i) == iota_c + self.sample_start(tile_j)

    def block(self, x: Array, tile_i: Array, tile_j: Array) -> Array:
        """The (Tt, Tt) block of an (N, M) array x (a row per image) for the rows of tile_i against the
        columns of tile_j."""
        start = (self.sample_start(tile_i), tile_j * self.size)
        block = jax.lax.dynamic_slice(x, start, (self.sample_rows, self.size))
        return jnp.tile(block, (self.views_per_tile, 1))

    def add_block(self, x: Array, tile_i: Array, tile_j: Array, update: Array, combine=jnp.add) -> Array:
        """x with the (Tt, Tt) update of the rows of tile_i against the columns of tile_j combined into its
        (N, M) layout (several views of an image in one tile are combined first)."""
        update = update.reshape(self.views_per_tile, self.sample_rows, self.size)
        update = functools.reduce(combine, list(update))
        start = (self.sample_start(tile_i), tile_j * self.size)
        old = jax.lax.dynamic_slice(x, start, (self.sample_rows, self.size))
        return jax.lax.dynamic_update_slice(x, combine(old, update), start)

    def add_mirrored(self, x: Array, tile_i: Array, tile_j: Array, update: Array, combine) -> Array:
        """x, an (M, N) array (a row per anchor row, a column per image), with the (Tt, Tt) update of the
        rows of tile_i against the columns of tile_j combined over tile_j's views into its rows of tile_i
        and its columns of tile_j's images: the mirrored tile's scores, kept untransposed."""
        update = update.reshape(self.size, self.views_per_tile, self.sample_rows)
        update = functools.reduce(combine, [update[:, v] for v in range(self.views_per_tile)])
        start = (tile_i * self.size, self.sample_start(tile_j))
        old = jax.lax.dynamic_slice(x, start, (self.size, self.sample_rows))
        return jax.lax.dynamic_update_slice(x, combine(old, update), start)

    def merge_mirrored(self, scores: Array, mirrored: Array, combine) -> Array:
        """scores (N, M) combined with the transpose of mirrored (M, N), block by block: each (Tt, Tt)
        block is transposed in cache, once (a whole-array transpose strides through memory)."""
        sample_blocks = self.num_samples // self.sample_rows
        tiles, samples = (jnp.asarray(a.reshape(-1), jnp.int32) for a in np.indices((self.count, sample_blocks)))

        def body(scores, x):
            tile, sample_block = x
            start = (sample_block * self.sample_rows, tile * self.size)
            block = jax.lax.dynamic_slice(scores, start, (self.sample_rows, self.size))
            mirror = jax.lax.dynamic_slice(mirrored, start[::-1], (self.size, self.sample_rows))
            return jax.lax.dynamic_update_slice(scores, combine(block, mirror.T), start), None

        return jax.lax.scan(body, scores, (tiles, samples))[0]


def _add_rows(x: Array, tile: Array, size: int, update: Array) -> Array:
    return jax.lax.dynamic_update_slice_in_dim(x, _tile_slice(x, tile, size, 0) + update, tile * size, 0)


def _tile_grid(static: _Static, anchors: Array) -> tuple[_Tiles, Array, Array, tuple[Array, Array]]:
    """The tiles, the (rows, columns) iotas of one tile and the upper pairs (I, J), I < J."""
    rows = anchors.reshape(-1, static.tile, anchors.shape[2])
    grid = _Tiles(rows, jnp.transpose(rows, (0, 2, 1)), static.tile, static.num_samples)
    iota_r = jax.lax.broadcasted_iota(jnp.int32, (grid.size, grid.size), 0)
    iota_c = jax.lax.broadcasted_iota(jnp.int32, (grid.size, grid.size), 1)
    pairs = tuple(jnp.asarray(tiles, jnp.int32) for tiles in np.triu_indices(grid.count, k=1))
    return grid, iota_r, iota_c, pairs


def _symmetric_forward(static: _Static, anchors, temperature, drop, own):
    """(lse (Va, N), scores (N, M) or None, tiles or None): the T diagonal tiles, then the P = T (T - 1) / 2
    pairs I < J (stored: their (T, Tt, Tt) and (P, Tt, Tt) similarities). One shift for every row, 1 / t,
    bounds every logit (unit-norm rows), so a tile's exponentials serve its rows' sums and, mirrored, its
    columns' sums. Scores: a pair's tile is combined into the (N, M) scores for its rows' images and,
    untransposed, into an (M, N) buffer for its columns' images (the mirrored tile); the two are merged at
    the end block by block, so each (Tt, Tt) block is transposed once, not once per pair. The buffer's
    rows are padded by 16 columns: a row length of a power of two puts the rows of a block in the same
    cache sets, which made the transposing reads 1.6x slower (XLA:CPU, N = 1024)."""
    num_views = anchors.shape[0]
    grid, iota_r, iota_c, pairs = _tile_grid(static, anchors)
    zero = _zero_like(anchors, temperature)
    shift = 1.0 / temperature
    total = jnp.zeros((grid.count * grid.size,), jnp.float32) + zero  # the tiles' terms, shifted by 1 / t
    combine = jnp.maximum if static.aggregation == "max" else jnp.add

    def diagonal_body(carry, x):
        total, scores = carry
        tile, stored = x
        s = grid.similarities(tile, tile) if stored is None else stored
        left_out = grid.own_columns(iota_r, iota_c, tile, tile)
        if drop is not None:
            left_out |= grid.block(drop, tile, tile)
        e = jnp.exp(jnp.where(left_out, -jnp.inf, s / temperature) - shift)
        total = _add_rows(total, tile, grid.size, jnp.sum(e, axis=1))
        if scores is not None:
            scores = grid.add_block(scores, tile, tile, s, combine)
        return (total, scores), None

    def pair_body(carry, x):
        total, scores, mirrored = carry
        (tile_i, tile_j), stored = x
        s = grid.similarities(tile_i, tile_j) if stored is None else stored
        own_column = grid.own_columns(iota_r, iota_c, tile_i, tile_j)
        e = jnp.exp(jnp.where(own_column, -jnp.inf, s / temperature) - shift)
        e_rows = e_columns = e
        if drop is not None:
            e_rows = jnp.where(grid.block(drop, tile_i, tile_j), 0.0, e)
            e_columns = jnp.where(grid.block(drop, tile_j, tile_i).T, 0.0, e)
        total = _add_rows(total, tile_i, grid.size, jnp.sum(e_rows, axis=1))
        total = _add_rows(total, tile_j, grid.size, jnp.sum(e_columns, axis=0))
        if scores is not None:
            scores = grid.add_block(scores, tile_i, tile_j, s, combine)
            mirrored = grid.add_mirrored(mirrored, tile_i, tile_j, s, combine)
        return (total, scores, mirrored), None

    scores = mirrored = None
    if static.aggregation is not None:
        start = -jnp.inf if static.aggregation == "max" else 0.0
        scores = jnp.full((static.num_samples, grid.count * grid.size), start, jnp.float32) + zero
        mirrored = jnp.full((grid.count * grid.size, static.num_samples + _MIRRORED_PAD), start, jnp.float32) + zero
    # Stored tiles come from batched products before the loops: a scan's stacked outputs would be
    # zero-filled first on XLA:CPU, then written tile by tile (two extra passes over them).
    stored = (None, None)
    if static.store_blocks:
        diagonal = np.arange(grid.count)
        stored = (grid.batched(diagonal, diagonal), grid.batched(*pairs))
    carry, _ = jax.lax.scan(diagonal_body, (total, scores), (jnp.arange(grid.count), stored[0]))
    (total, scores, mirrored), _ = jax.lax.scan(pair_body, (*carry, mirrored), (pairs, stored[1]))
    if scores is not None:
        scores = grid.merge_mirrored(scores, mirrored, combine)
    # The positives keep their own shift, so a row with nothing else in D has lse = its positives' exactly.
    positive_shift, positives = _positive_sums(own, temperature)
    tiles_total = total.reshape(num_views, static.num_samples) * jnp.exp(shift - positive_shift)
    lse = positive_shift + jnp.log(positives + tiles_total)
    if scores is not None:
        scores = jax.lax.stop_gradient(scores if static.aggregation == "max" else scores / num_views)
    return lse, scores, stored if static.store_blocks else None


def _symmetric_backward(static: _Static, residuals, g):
    """d anchors: row r gets sum_c (dS[r, c] + dS[c, r]) z_c; a pair I < J forms both terms in one tile."""
    anchors, temperature, drop, lse, tiles = residuals
    grid, iota_r, iota_c, pairs = _tile_grid(static, anchors)
    zero = _zero_like(anchors, temperature, g)
    shift = 1.0 / temperature
    # dS[r, c] = exp(l_rc - lse_r) * g_r / t = exp(l_rc - shift) * weight_r.
    weight = ((g / temperature) * jnp.exp(shift - lse)).reshape(-1)

    def similarities(tile_i, tile_j, stored):
        return grid.similarities(tile_i, tile_j) if stored is None else stored

    def accumulate(carry, tile_i, tile_j, ds):
        d_rows, d_columns_t = carry
        d_rows = _add_rows(d_rows, tile_i, grid.size, ds @ grid.z(tile_j))
        return d_rows, _add_rows(d_columns_t, tile_j, 1, (grid.z_t(tile_i) @ ds)[None])

    def diagonal_body(carry, x):
        tile, stored = x
        s = similarities(tile, tile, stored)
        left_out = iota_r == iota_c  # the self column; the positives are in D
        if drop is not None:
            left_out |= grid.block(drop, tile, tile)
        weight_i = _tile_slice(weight, tile, grid.size, 0)[:, None]
        ds = jnp.exp(jnp.where(left_out, -jnp.inf, s / temperature) - shift) * weight_i
        return accumulate(carry, tile, tile, ds), None

    def pair_body(carry, x):
        (tile_i, tile_j), stored = x
        e = jnp.exp(similarities(tile_i, tile_j, stored) / temperature - shift)
        weight_i = _tile_slice(weight, tile_i, grid.size, 0)[:, None]
        weight_j = _tile_slice(weight, tile_j, grid.size, 0)[None, :]
        if drop is None:
            ds = e * (weight_i + weight_j)
        else:
            ds = jnp.where(grid.block(drop, tile_i, tile_j), 0.0, e) * weight_i
            ds += jnp.where(grid.block(drop, tile_j, tile_i).T, 0.0, e) * weight_j
        return accumulate(carry, tile_i, tile_j, ds), None

    num_rows, dim = grid.count * grid.size, anchors.shape[2]
    d_columns_t = jnp.zeros((grid.count, dim, grid.size), jnp.float32) + zero  # (T, d, Tt): plain dots
    carry = (jnp.zeros((num_rows, dim), jnp.float32) + zero, d_columns_t)
    diagonal_tiles, pair_tiles = (None, None) if tiles is None else tiles
    carry, _ = jax.lax.scan(diagonal_body, carry, (jnp.arange(grid.count), diagonal_tiles))
    (d_rows, d_columns_t), _ = jax.lax.scan(pair_body, carry, (pairs, pair_tiles))
    d_rows = d_rows + jnp.transpose(d_columns_t, (0, 2, 1)).reshape(num_rows, dim)
    return d_rows.reshape(anchors.shape), jnp.zeros_like(temperature), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _symmetric_denominator(static: _Static, anchors, temperature, drop, own):
    return _symmetric_forward(static, anchors, temperature, drop, own)[:2]


def _symmetric_denominator_fwd(static, anchors, temperature, drop, own):
    lse, scores, tiles = _symmetric_forward(static, anchors, temperature, drop, own)
    return (lse, scores), (anchors, temperature, drop, lse, tiles)


def _symmetric_denominator_bwd(static, residuals, cotangents):
    return _symmetric_backward(static, residuals, cotangents[0])


_symmetric_denominator.defvjp(_symmetric_denominator_fwd, _symmetric_denominator_bwd)


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


def _symmetric_tile(num_anchor_views: int, num_samples: int) -> int | None:
    """The symmetric path's square tile, or None where it would be too narrow (the general path runs)."""
    tile = _square_tile(num_anchor_views, num_samples)
    return tile if tile >= min(_MIN_TILE, num_samples) else None


def symmetric_share(num_anchor_views: int, num_samples: int) -> float:
    """The share of each (M, M) matmul pass the symmetric path computes, (T + 1) / 2T for T tiles of the
    M = Va * N rows (1.0 where the general path runs)."""
    tile = _symmetric_tile(num_anchor_views, num_samples)
    if tile is None:
        return 1.0
    count = num_anchor_views * num_samples // tile
    return (count + 1) / (2 * count)


def denominator_lse(
    anchors: Array,
    candidates: Array | None,
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
      candidates: `(C, d)` float32 candidate features, C a multiple of N; or None: the anchors' own rows
        `anchors.reshape(Va * N, d)` (in-batch on one device, B = N, global_ids = arange(N)), whose
        symmetric similarities are computed once per pair of tiles when `unit_norm` and a static
        temperature allow one shift for all rows (otherwise as if they were passed).
      temperature: a float, or a traced scalar (then it gets its cotangent).
      own: `(Va, B, Va)` <anchors[a, i], own column v> computed from gathered rows (no gradient here).
      drop: optional `(B, C)` bool columns also left out of the denominator (never own columns).
      aggregation: None, or "max" / "mean": also return the `(B, C)` max / mean over the anchor views of
        the raw similarities (stop-gradient), from the same tiles.
      grad_candidates: False when the candidates are constants (skips their gradient's matmul pass).
      store_blocks: keep the tiles for the backward (3 matmul passes, memory the Va blocks; half of each
        on the symmetric path) instead of recomputing them (4 passes, memory a few tiles).
      unit_norm: anchors and candidates have norm <= 1 (l2-normalised), which bounds the logits.

    Returns:
      `(lse, scores)`, scores None without an aggregation.
    """
    num_columns = anchors.shape[0] * anchors.shape[1] if candidates is None else candidates.shape[0]
    fixed_shift = (
        unit_norm
        and not isinstance(temperature, jax.Array)
        and 2.0 / temperature + math.log(num_columns) < _MAX_LOG_TERM
    )
    own = jax.lax.stop_gradient(own)
    tile = _symmetric_tile(anchors.shape[0], num_samples) if candidates is None and fixed_shift else None
    if tile is not None:
        static = _Static(num_samples, tile, aggregation, True, False, store_blocks, True)
        return _symmetric_denominator(static, anchors, jnp.asarray(temperature, jnp.float32), drop, own)
    if candidates is None:
        candidates = anchors.reshape(num_columns, anchors.shape[2])
    static = _Static(
        num_samples=num_samples,
        tile=_tile_size(num_samples, anchors.shape[1]),
        aggregation=aggregation,
        grad_candidates=grad_candidates,
        grad_temperature=isinstance(temperature, jax.Array),
        store_blocks=store_blocks,
        fixed_shift=fixed_shift,
    )
    temperature = jnp.asarray(temperature, jnp.float32)
    return _denominator(static, anchors, candidates, temperature, global_ids.astype(jnp.int32), drop, own)
