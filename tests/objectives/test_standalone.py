"""`fnc_jax.objectives` stands alone: it imports and runs with jax and numpy only (what `pip install fnc_jax`
installs). CI also installs it into an empty environment without the training stack (.ci/run)."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter in which every training-stack package, and every fnc_jax module outside
# the loss library, fails to import.
SCRIPT = r"""
import importlib.abc, sys

BLOCKED = ("flax", "optax", "orbax", "tensorflow", "tensorflow_datasets", "clu", "ml_collections", "absl",
           "etils", "mlxtend", "matplotlib")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        inside = name.startswith("fnc_jax.") and not name.startswith("fnc_jax.objectives")
        if top in BLOCKED or inside:
            raise ImportError(f"{name} is not part of the jax-only install")
        return None

sys.meta_path.insert(0, Block())
import jax, jax.numpy as jnp
from fnc_jax import objectives

z = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 16))
loss, aux = objectives.fnc_loss(z, labels=jnp.arange(8) % 2)
grad = jax.grad(lambda e: objectives.fnc_loss(e)[0])(z)
assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(grad)))
print("ok", float(loss), int(aux["num_fn"].sum()))
"""


def test_objectives_import_and_run_with_jax_alone():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok ")
