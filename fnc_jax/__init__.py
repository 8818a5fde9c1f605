"""fnc_jax: contrastive self-supervised learning with False Negative Cancellation (FNC) in JAX.

The loss library, `fnc_jax.objectives`, imports nothing else from the package, so it can be used on
its own. Everything else (data, models, optimiser, trainer, evaluation) is wired by `fnc_jax.main`.
"""

__version__ = "0.1.0"
