"""The pretraining views' probabilities and ranges (SimCLR v2 / FNC recipe, docs/training_recipe.md §2),
shared by the host ops (`augment`) and the device ops (`augment_jax`) so that every data path draws the
same views. Pure Python: JAX-only code imports it without TensorFlow.
"""

JITTER_P = 0.8  # colour jitter is applied to a view with this probability
GRAYSCALE_P = 0.2
BLUR_P = 0.5
# Brightness, contrast and saturation factors ~ U[max(0, 1 - spread·strength), 1 + spread·strength);
# the hue shift ~ U[-spread·strength, spread·strength).
JITTER_SPREAD = 0.8
HUE_SPREAD = 0.2
BLUR_SIGMA_RANGE = (0.1, 2.0)
