"""Checkpoints of other implementations as fnc_jax networks.

`tf1`: the official TF1 checkpoints of FNC and SimCLR (v1, v2), read with `tf.train.load_checkpoint`
(`tf1_names` holds the name mapping and the architecture inference). `python -m fnc_jax.import_checkpoint`
turns one into a workdir that every evaluation mode starts from.
"""
