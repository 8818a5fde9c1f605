"""False-negative identification and cancellation settings (`FNConfig`) and their allowed values."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

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


def check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is invalid: allowed values are {', '.join(allowed)}.")
