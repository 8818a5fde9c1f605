"""The debiased (DCL; Chuang et al., 2020) and hard-negative (HCL; Robinson et al., 2021) contrastive
losses in fnc_jax's multi-view layout, optionally with false-negative elimination
(docs/related_objectives.md §1 DCL, §2 HCL, §3 the scale convention, §4 more than two views).

For anchor view a of sample i and each positive p (another view of the same image), with logits
l = <z_a(i), Z_c> / t, M(i) negatives (the views of the other images that are not eliminated) and the
class prior tau_plus:

    pos  = exp(l_p)
    mass = sum_j exp(l_j)                                        (DCL)
         = M * sum_j exp((1 + beta) l_j) / sum_j exp(beta l_j)   (HCL: sum_j imp_j neg_j / mean_j imp_j)
    Ng   = max((mass - tau_plus * M * pos) / (1 - tau_plus),  M * exp(-1 / t))
    loss(a, i, p) = -log(pos / (pos + Ng))

averaged over the V - 1 positives, then over samples, summed over views and scaled by 2/V (fnc_jax's
convention: at V = 2 twice the reference mean over the 2N rows). The other positives of the anchor are
neither in `pos` nor among the negatives of the pair, so with tau_plus = 0 the loss equals
`fnc_loss(mode='none')` (and with elimination `fnc_loss(mode='elimination')`) at V = 2 only, where
fnc_loss's denominator is exactly pos + negatives; with hidden_norm=False only while no raw dot product
is below -1 (the clamp can bind then even at tau_plus = 0).

Numerics: everything is computed in the log domain. `mass` comes from a logsumexp over the negatives
(HCL: the difference of two logsumexps, so the importance weights exp(beta l_j) are never formed), and
pos, mass and the clamp bound are rescaled by a per-pair shift (the largest of their logarithms) before
the subtraction, so the values equal the reference's direct exponentials wherever those are finite
(hidden_norm=True), and stay finite with raw dot products (hidden_norm=False), where exp(l) overflows.
The clamp bound is the reference's M * exp(-1/t) in both cases (with raw dot products it is no longer
the smallest possible mass). No stop-gradient on the importance weights, as in the reference code.

False negatives: `fn.mode='elimination'` removes the selected columns F(i) (docs/method.md §4: scored once
per sample, stop-gradient, never own columns) from the negatives of every pair of sample i before the
estimator: the sums run over the remaining columns and M(i) = V(N - 1) - |F(i)| counts them (V: the
anchor views, 2 with fn.support_as_positives=False), both in the debiasing term tau_plus * M(i) * pos
and in the clamp bound M(i) * exp(-1/t); HCL's mean importance is over the remaining columns too. A sample with no negative left has Ng = 0 and loss 0 (as fnc_loss with
B = 1). `fn.mode='attraction'` is refused: DCL/HCL already correct the negatives' false-negative mass
through tau_plus, with the pair's positive as the estimate of a same-class term; making the selected
candidates extra positives while they stay among the negatives would count them in the numerator and
again in that correction, a combination neither paper defines.

There is no memory-bank (EMA queue) variant of these objectives; `fnc_memory_loss` is FNC only.

Memory: by default (`low_memory=True`) view by view in a rematerialised `lax.scan`, so the
largest temporaries are `(B, C)` blocks, not the `(V, B, C)` stack of all views.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from fnc_jax.objectives.fn_config import FNConfig, FNSchedule
from fnc_jax.objectives.layout import check_temperature, global_mean, in_batch_layout, own_columns, per_view
from fnc_jax.objectives.selection import false_negative_mask, fn_metrics, schedule_metrics

Array = jax.Array

DEBIASED_FN_MODES = ("elimination", "none")


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_arguments(tau_plus: float | Array, beta: float | Array | None, fn: FNConfig | None) -> None:
    # Jax arrays (scheduled or swept values) are accepted unchecked: they may be traced.
    if not isinstance(tau_plus, jax.Array) and not (_is_number(tau_plus) and 0 <= tau_plus < 1):
        raise ValueError(f"tau_plus={tau_plus!r} is invalid: allowed values are floats in [0, 1).")
    if beta is not None and not isinstance(beta, jax.Array) and not (_is_number(beta) and beta >= 0):
        raise ValueError(f"beta={beta!r} is invalid: allowed values are finite floats >= 0.")
    if fn is not None and fn.mode not in DEBIASED_FN_MODES:
        raise ValueError(
            f"fn.mode={fn.mode!r} is invalid for dcl_loss / hcl_loss: allowed values are "
            f"{', '.join(DEBIASED_FN_MODES)}. Attraction is refused because the debiasing term tau_plus * M * pos "
            "already corrects the negatives for false negatives; extra positives that stay among the negatives "
            "would be counted twice."
        )


def _logsumexp_rows(x: Array, mask: Array) -> Array:
    """(B,) log sum_{mask} exp(x) per row; 0 (not -inf, so no nan anywhere) for rows with an empty mask."""
    x = jnp.where(mask, x, -jnp.inf)  # before exp: exp of a masked-out large logit would make 0 * inf gradients
    shift = jax.lax.stop_gradient(jnp.max(x, axis=1, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    total = jnp.sum(jnp.exp(x - shift), axis=1)
    return jnp.log(jnp.where(total > 0, total, 1.0)) + shift[:, 0]


def _log_negative_mass(logits: Array, negatives: Array, count: Array, beta: float | Array | None) -> Array:
    """(B,) log of DCL's sum_j neg_j (beta None) or HCL's sum_j imp_j neg_j / mean_j imp_j; -inf if M = 0."""
    if beta is None:
        log_mass = _logsumexp_rows(logits, negatives)
    else:
        # log M + LSE((1 + beta) l) - LSE(beta l), grouped so that beta = 0 reproduces DCL bit for bit.
        log_mean_importance = _logsumexp_rows(beta * logits, negatives) - jnp.log(jnp.maximum(count, 1.0))
        log_mass = _logsumexp_rows((1.0 + beta) * logits, negatives) - log_mean_importance
    return jnp.where(count > 0, log_mass, -jnp.inf)


def _pair_losses(
    pos_logits: Array, log_mass: Array, count: Array, temperature: float | Array, tau_plus: float | Array
) -> Array:
    """(B, P) -log(pos / (pos + Ng)) with Ng debiased and clamped, computed from logarithms (module doc)."""
    log_floor = jnp.where(count > 0, jnp.log(jnp.maximum(count, 1.0)) - 1.0 / temperature, -jnp.inf)
    log_mass, log_floor, count = log_mass[:, None], log_floor[:, None], count[:, None]
    # Any shift gives the same value; the largest of the three logarithms puts every rescaled term in
    # [0, 1] with one of them 1, so nothing overflows and pos + Ng stays away from 0.
    shift = jax.lax.stop_gradient(jnp.maximum(jnp.maximum(pos_logits, log_mass), log_floor))
    pos = jnp.exp(pos_logits - shift)
    negative = (jnp.exp(log_mass - shift) - tau_plus * count * pos) / (1.0 - tau_plus)
    negative = jnp.maximum(negative, jnp.exp(log_floor - shift))
    return jnp.log(pos + negative) + shift - pos_logits


def _view_losses(
    anchors: Array,
    candidates: Array,
    negatives: Array,
    *,
    num_samples: int,
    global_ids: Array,
    temperature: float | Array,
    tau_plus: float | Array,
    beta: float | Array | None,
    low_memory: bool,
) -> Array:
    """(V,) per-anchor-view mean over samples of the mean over positives of the pair losses."""
    num_views = anchors.shape[0]
    count = jnp.sum(negatives, axis=1).astype(jnp.float32)
    positive_columns = jnp.arange(num_views)[None, :] * num_samples + global_ids[:, None]  # (B, V), self included

    def view_loss(a: Array, z_a: Array) -> Array:
        logits = (z_a @ candidates.T) / temperature  # (B, C)
        pos_logits = jnp.take_along_axis(logits, positive_columns, axis=1)
        pairs = _pair_losses(
            pos_logits, _log_negative_mass(logits, negatives, count, beta), count, temperature, tau_plus
        )
        is_positive = jnp.arange(num_views) != a  # drop the self pair
        return jnp.mean(jnp.sum(jnp.where(is_positive[None, :], pairs, 0.0), axis=1)) / (num_views - 1)

    return per_view(view_loss, anchors, low_memory)


def _debiased_loss(
    embeddings: Array,
    *,
    temperature: float | Array,
    tau_plus: float | Array,
    beta: float | Array | None,
    hidden_norm: bool,
    fn: FNConfig | None,
    axis_name: str | None,
    labels: Array | None,
    low_memory: bool,
    schedule: FNSchedule | None,
    step: Array | int,
) -> tuple[Array, dict[str, Array]]:
    check_temperature(temperature)
    _check_arguments(tau_plus, beta, fn)
    fn = FNConfig(mode="none") if fn is None else fn
    z, anchors, candidates, labels, candidate_labels, num_samples, sample_offset = in_batch_layout(
        embeddings, hidden_norm, axis_name, labels, fn.support_as_positives
    )
    anchor_views, batch = anchors.shape[:2]
    global_ids = sample_offset + jnp.arange(batch)
    own = own_columns(candidates.shape[0], num_samples, anchor_views, global_ids)
    if fn.mode == "none":
        fn_mask = jnp.zeros_like(own)
    else:
        fn_mask = false_negative_mask(
            z,
            candidates,
            fn=fn,
            num_samples=num_samples,
            sample_offset=sample_offset,
            labels=labels,
            candidate_labels=candidate_labels,
            low_memory=low_memory,
            schedule=schedule,
            step=step,
        )
    losses = _view_losses(
        anchors,
        candidates,
        ~own & ~fn_mask,
        num_samples=num_samples,
        global_ids=global_ids,
        temperature=temperature,
        tau_plus=tau_plus,
        beta=beta,
        low_memory=low_memory,
    )
    loss = global_mean(jnp.sum(losses) * (2.0 / anchor_views), axis_name)
    aux = fn_metrics(fn_mask, own, labels, candidate_labels, axis_name) | schedule_metrics(schedule, step, fn)
    aux["fn_mask"] = fn_mask.reshape(batch, anchor_views, num_samples)
    return loss, aux


def dcl_loss(
    embeddings: Array,
    *,
    temperature: float | Array = 0.1,
    tau_plus: float | Array = 0.1,
    hidden_norm: bool = True,
    fn: FNConfig | None = None,
    axis_name: str | None = None,
    labels: Array | None = None,
    low_memory: bool = True,
    schedule: FNSchedule | None = None,
    step: Array | int = 0,
) -> tuple[Array, dict[str, Array]]:
    """Multi-view debiased contrastive loss (DCL), in-batch, optionally with false-negative elimination.

    Args:
      embeddings: `(V, B, d)` projections of V views of this device's B samples (computed in float32).
      temperature: t of the logits (a float > 0, or a scalar array when traced).
      tau_plus: class prior in [0, 1) (or a scalar array); 0 = no debiasing (SimCLR's NT-Xent at V = 2).
      hidden_norm: l2-normalise the embeddings first (cosine similarities); off = raw dot products.
      fn: None (no cancellation) or an `FNConfig` with `mode='none'` or `'elimination'` (attraction is
        refused, see the module docstring); `support_as_positives=False` keeps views 0 and 1 as the only
        anchors and candidates, the support views scoring false negatives only.
      axis_name: mapped axis of the global batch; candidates are all-gathered across it (gradients flow
        back through the gather) and the loss and metrics are global.
      labels: optional `(B,)` integer labels, for FN precision / recall and `selection='oracle'`.
      low_memory: view-by-view computation (module docstring); False vectorises over the views.
      schedule, step: the elimination's `FNSchedule` evaluated at the training step, as in `fnc_loss`.

    Returns:
      `(loss, aux)` with the keys of `fnc_loss`: `fn_mask` `(B, V, N)`, `num_fn` `(B,)`, `mean_num_fn`,
      and with labels `fn_precision`, `fn_recall`, `fn_true`, `fn_selected`, `fn_same_label`.
    """
    return _debiased_loss(
        embeddings,
        temperature=temperature,
        tau_plus=tau_plus,
        beta=None,
        hidden_norm=hidden_norm,
        fn=fn,
        axis_name=axis_name,
        labels=labels,
        low_memory=low_memory,
        schedule=schedule,
        step=step,
    )


def hcl_loss(
    embeddings: Array,
    *,
    temperature: float | Array = 0.1,
    tau_plus: float | Array = 0.1,
    beta: float | Array = 1.0,
    hidden_norm: bool = True,
    fn: FNConfig | None = None,
    axis_name: str | None = None,
    labels: Array | None = None,
    low_memory: bool = True,
    schedule: FNSchedule | None = None,
    step: Array | int = 0,
) -> tuple[Array, dict[str, Array]]:
    """Multi-view hard-negative contrastive loss (HCL): DCL with the negatives reweighted by exp(beta l).

    `beta` >= 0 is the concentration of the importance weights (0 gives `dcl_loss` exactly); the other
    arguments and the returned `(loss, aux)` are those of `dcl_loss`.
    """
    return _debiased_loss(
        embeddings,
        temperature=temperature,
        tau_plus=tau_plus,
        beta=beta,
        hidden_norm=hidden_norm,
        fn=fn,
        axis_name=axis_name,
        labels=labels,
        low_memory=low_memory,
        schedule=schedule,
        step=step,
    )
