"""Data: dataset sources (`sources`), host-side augmentation (`augment`, `randaugment_host`), device-side
augmentation (`augment_jax`, `randaugment_jax`), what they share (`recipe`, `randaugment_policy`), the
data paths between them (`layout`) and input pipelines (`pipeline`).

Kept import-free so that JAX-only code importing a submodule does not pay for TensorFlow.
"""
