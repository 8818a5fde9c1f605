"""False-negative identification and cancellation settings (`FNConfig`), their allowed values, and the
schedule that starts and ramps the selection over training (`FNSchedule`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

MODES = ("attraction", "elimination", "none")
AGGREGATIONS = ("max", "mean")
SUPPORT_SETS = ("all_views", "support_only")
SELECTIONS = ("topk", "threshold", "topk_and_threshold", "oracle")


@dataclasses.dataclass(frozen=True)
class FNConfig:
    """False-negative identification and cancellation settings (defaults = official implementation).

    Attributes:
      mode: `attraction` (false negatives become extra positives, Eq. 3), `elimination` (they leave
        the denominator, Eq. 2) or `none` (plain multi-view NT-Xent / SimCLR baseline).
      aggregation: how the per-view scores of the anchor image are combined: `max` or `mean`.
      support_set: which anchor views score candidates: `all_views` (official) or `support_only`
        (views 2..V-1, the paper's wording).
      selection: `topk`, `threshold` (raw cosine, strict >), `topk_and_threshold` (their
        intersection, official) or `oracle` (every same-label candidate; needs labels).
      topk: k of the top-k selection, counted in (view, sample) columns; clamped to the number of
        candidates, 0 selects nothing.
      threshold: cosine threshold of the threshold selection (raw cosine, not divided by tau).
      support_as_positives: True (official): support views are anchors and positives like the main
        views. False: only views 0 and 1 enter the loss (2-view NT-Xent over the main views of all
        samples) and the support views only help identify false negatives (paper Table 1 ablation).
    """

    mode: str = "attraction"
    aggregation: str = "max"
    support_set: str = "all_views"
    selection: str = "topk_and_threshold"
    topk: int = 10
    threshold: float = 0.7
    support_as_positives: bool = True

    def __post_init__(self):
        check_choice("fn.mode", self.mode, MODES)
        check_choice("fn.aggregation", self.aggregation, AGGREGATIONS)
        check_choice("fn.support_set", self.support_set, SUPPORT_SETS)
        check_choice("fn.selection", self.selection, SELECTIONS)
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 0:
            raise ValueError(f"fn.topk={self.topk!r} is invalid: allowed values are integers >= 0.")
        # A jax array is accepted as is, so that the threshold can be traced (a schedule, a sweep).
        if isinstance(self.threshold, bool) or (
            not isinstance(self.threshold, jax.Array)
            and not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold))
        ):
            raise ValueError(f"fn.threshold={self.threshold!r} is invalid: allowed values are finite floats.")
        if not isinstance(self.support_as_positives, bool):
            raise ValueError(
                f"fn.support_as_positives={self.support_as_positives!r} is invalid: allowed values are True, False."
            )

    @property
    def uses_topk(self) -> bool:
        return self.selection in ("topk", "topk_and_threshold")

    @property
    def uses_threshold(self) -> bool:
        return self.selection in ("threshold", "topk_and_threshold")


class FNLimits(NamedTuple):
    """The selection a schedule allows at one step (traced scalars)."""

    active: jax.Array  # bool: cancellation has started
    topk: jax.Array  # int32: the k in force (<= FNConfig.topk); 0 before the start
    threshold: jax.Array  # float32: the cosine threshold in force


@dataclasses.dataclass(frozen=True)
class FNSchedule:
    """When false-negative cancellation starts and how its selection reaches `FNConfig`'s values.

    Before `start_step` nothing is selected, so the loss is the `mode='none'` loss. From `start_step` on,
    over `ramp_steps` steps, k rises linearly (rounded half up) from `from_topk` to `FNConfig.topk` and the
    threshold moves linearly from `from_threshold` to `FNConfig.threshold`; from `start_step + ramp_steps`
    on, the selection is exactly the fixed one. Early in training the embeddings do not yet cluster by
    class and most selected candidates are true negatives (the FN precision is low), which is what this
    waits out. The step is a traced argument, so one compiled train step serves the whole run.
    """

    start_step: int = 0
    ramp_steps: int = 0
    from_topk: int = 1
    from_threshold: float = 1.0

    def __post_init__(self):
        for name in ("start_step", "ramp_steps", "from_topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"schedule {name}={value!r} is invalid: allowed values are integers >= 0.")
        if isinstance(self.from_threshold, bool) or not (
            isinstance(self.from_threshold, (int, float)) and math.isfinite(self.from_threshold)
        ):
            raise ValueError(f"schedule from_threshold={self.from_threshold!r} is invalid: allowed are finite floats.")

    def limits(self, step: jax.Array | int, fn: FNConfig) -> FNLimits:
        """The k and threshold in force at `step` (traced or not) for the final selection `fn`."""
        if self.from_topk > fn.topk:
            raise ValueError(
                f"schedule from_topk={self.from_topk} is invalid: allowed values are 0..fn.topk={fn.topk} "
                "(the top-k is computed at the final k and cut to the scheduled one)."
            )
        step = jnp.asarray(step, jnp.int32)
        since = (step - self.start_step).astype(jnp.float32)
        done = since >= self.ramp_steps  # the ramp is over: the fixed selection, exactly
        progress = jnp.clip(since / max(self.ramp_steps, 1), 0.0, 1.0)
        ramped_k = self.from_topk + jnp.floor(progress * (fn.topk - self.from_topk) + 0.5).astype(jnp.int32)  # half up
        ramped_threshold = self.from_threshold + progress * (jnp.float32(fn.threshold) - self.from_threshold)
        active = step >= self.start_step
        return FNLimits(
            active=active,
            topk=jnp.where(active, jnp.where(done, fn.topk, ramped_k), 0).astype(jnp.int32),
            threshold=jnp.where(done, jnp.float32(fn.threshold), ramped_threshold).astype(jnp.float32),
        )


def check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is invalid: allowed values are {', '.join(allowed)}.")
