"""The study's named grids as data: per method, the config overrides of `configs/default.py` (one home).

Each method is compared (paired by seed) with its `baseline`: the multi-view baseline with the same views
as FNC (fn.mode=none), or its long-recipe counterpart. `validate` checks that every override names an
existing config field before any run starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from fnc_jax import errors

LONG_EPOCHS = 18  # 3x the quickstart's 6 epochs: about 6-10 min a run on 2 busy cores


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    overrides: dict[str, Any]
    baseline: str = "multiview"


def _fn(name: str, baseline: str = "multiview", **overrides: Any) -> Method:
    return Method(name, {k.replace("__", "."): v for k, v in overrides.items()}, baseline)


_MULTIVIEW = _fn("multiview", fn__mode="none")
_ATTRACTION = _fn("fnc_attraction", fn__mode="attraction")
_ELIMINATION = _fn("fnc_elimination", fn__mode="elimination")

GRIDS: dict[str, tuple[Method, ...]] = {
    "baselines": (_MULTIVIEW, _fn("simclr_2view", views__support_size=0, fn__mode="none")),
    "fnc": (
        _MULTIVIEW,
        _ATTRACTION,
        _ELIMINATION,
        *(_fn(f"attraction_top{k}", fn__mode="attraction", fn__topk=k) for k in (1, 2, 4)),
        *(_fn(f"attraction_top{k}_only", fn__mode="attraction", fn__topk=k, fn__selection="topk") for k in (1, 2, 4)),
        _fn("attraction_mean", fn__mode="attraction", fn__aggregation="mean"),
        _fn("attraction_no_support_positives", fn__mode="attraction", fn__support_as_positives=False),
    ),
    "threshold": (
        _MULTIVIEW,
        *(
            _fn(f"{mode}_threshold{t}", fn__mode=mode, fn__selection="threshold", fn__threshold=t)
            for mode in ("attraction", "elimination")
            for t in (0.7, 0.9)
        ),
    ),
    # The high-precision selection the FN analysis mode found on the quickstart checkpoint (mean over the
    # support views, cos > 0.9: 81-95% precision at recall below 1%): does precision turn the loss into a gain?
    "precision": (
        _MULTIVIEW,
        *(
            _fn(f"{mode}_mean_threshold0.9", fn__mode=mode, fn__aggregation="mean", fn__threshold=0.9)
            for mode in ("attraction", "elimination")
        ),
    ),
    "schedule": (
        _MULTIVIEW,
        _fn(
            "attraction_start0.5_ramp0.25",
            fn__mode="attraction",
            fn__start_fraction=0.5,
            fn__ramp_fraction=0.25,
            fn__ramp_from_topk=1,
        ),
        _fn(
            "elimination_start0.5_ramp0.25",
            fn__mode="elimination",
            fn__start_fraction=0.5,
            fn__ramp_fraction=0.25,
            fn__ramp_from_topk=1,
        ),
    ),
    "debiased": (
        _MULTIVIEW,
        _fn("dcl_tau0.1", fn__mode="none", loss__name="dcl", loss__tau_plus=0.1),
        _fn("dcl_tau0.05", fn__mode="none", loss__name="dcl", loss__tau_plus=0.05),
        _fn("hcl_tau0.1_beta1", fn__mode="none", loss__name="hcl", loss__tau_plus=0.1, loss__beta=1.0),
        _fn("hcl_tau0.1_beta0.5", fn__mode="none", loss__name="hcl", loss__tau_plus=0.1, loss__beta=0.5),
    ),
    "oracle": (
        _MULTIVIEW,
        _fn("attraction_oracle", fn__mode="attraction", fn__selection="oracle"),
        _fn("elimination_oracle", fn__mode="elimination", fn__selection="oracle"),
    ),
    "long": (
        _fn("long_multiview", "long_multiview", fn__mode="none", epochs=LONG_EPOCHS),
        _fn("long_fnc_attraction", "long_multiview", fn__mode="attraction", epochs=LONG_EPOCHS),
        _fn("long_fnc_elimination", "long_multiview", fn__mode="elimination", epochs=LONG_EPOCHS),
    ),
}


def grid(name: str) -> tuple[Method, ...]:
    """The methods of grid `name`; 'all' is the union of every grid (each method once)."""
    if name == "all":
        return tuple({m.name: m for methods in GRIDS.values() for m in methods}.values())
    if name not in GRIDS:
        raise errors.ConfigError(f"--grid={name!r} is invalid: allowed grids are {', '.join([*GRIDS, 'all'])}.")
    return GRIDS[name]


def validate(methods: tuple[Method, ...], base: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for an override naming no field of `base`, or a baseline outside the grid."""
    names = {m.name for m in methods}
    for method in methods:
        if method.baseline not in names:
            raise errors.ConfigError(
                f"method {method.name!r}: baseline={method.baseline!r} is invalid: allowed are {', '.join(sorted(names))}."
            )
        for field in method.overrides:
            node: Any = base
            for key in field.split("."):
                if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                    raise errors.ConfigError(
                        f"method {method.name!r}: override config.{field} is invalid: no such config field."
                    )
                node = node[key]
