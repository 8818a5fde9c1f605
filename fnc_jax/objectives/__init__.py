"""The FNC contrastive objective: multi-view NT-Xent with False Negative Cancellation, in pure JAX.

This package imports nothing from the rest of fnc_jax, so it can be copied or imported on its own.
The semantics follow the official implementation (google-research/fnc) exactly by default; the
paper's variants (elimination, mean aggregation, support-only scoring, top-k or threshold alone) and an
oracle selection are options of `FNConfig`; `FNSchedule` starts and ramps the selection over training.
See docs/method.md for the maths.

Layout conventions (docs/method.md §1):
- `embeddings` are `(V, B, d)`: V views of the B samples held by this device. Views 0 and 1 are the
  main views, 2..V-1 the support views.
- Candidates are columns `c = v * N + g`: view v of global sample g, view-major over the global batch
  of N = R * B samples (R devices along `axis_name`). Local sample i on device r has g = r * B + i.
- With `axis_name` (inside `jax.shard_map` / `pmap`), candidates are all-gathered differentiably; the
  loss and every metric are global (averaged over devices), so the sharded loss and its gradients
  equal the single-device loss on the global batch.

Modules: `fn_config` (settings), `layout` (normalisation, candidates, collectives, the per-view loop),
`selection` (false-negative identification and diagnostics), `denominator` (FNC's log-sum-exp and its
hand-written VJP), `fnc` (the FNC losses and the memory queue), `debiased`
(the DCL and HCL losses, in-batch, optionally with false-negative elimination).

Memory: by default (`low_memory=True`) the largest temporaries are `(B, C)` arrays (C = number of
candidate columns), never the `(V, B, C)` stack of all views' similarities: FNC's denominator has a
hand-written VJP over cache-sized tiles that its backward recomputes (`denominator`), DCL / HCL run view
by view in a rematerialised `lax.scan`. `low_memory=False` keeps the blocks (FNC: 3 matmul passes, not 4).
"""

from fnc_jax.objectives.debiased import DEBIASED_FN_MODES, dcl_loss, hcl_loss
from fnc_jax.objectives.fn_config import AGGREGATIONS, MODES, SELECTIONS, SUPPORT_SETS, FNConfig, FNSchedule
from fnc_jax.objectives.fnc import fnc_loss, fnc_memory_loss, update_memory
from fnc_jax.objectives.layout import l2_normalize
from fnc_jax.objectives.selection import false_negative_mask

# The objectives a trainer chooses by name (`loss.name`): FNC (and its multi-view baseline), DCL, HCL.
OBJECTIVES = ("fnc", "dcl", "hcl")

__all__ = [
    "AGGREGATIONS",
    "DEBIASED_FN_MODES",
    "MODES",
    "OBJECTIVES",
    "SELECTIONS",
    "SUPPORT_SETS",
    "FNConfig",
    "FNSchedule",
    "dcl_loss",
    "false_negative_mask",
    "fnc_loss",
    "fnc_memory_loss",
    "hcl_loss",
    "l2_normalize",
    "update_memory",
]
