"""Data: dataset sources (`sources`), host-side augmentation (`augment`) and input pipelines (`pipeline`).

Kept import-free so that JAX-only code importing a submodule does not pay for TensorFlow.
"""
