"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_PATH = REPO_ROOT / "tests" / "golden" / "fnc_reference_loss.npz"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test that takes more than ~30 s on 2 CPU cores")


@pytest.fixture(scope="session")
def golden_path() -> pathlib.Path:
    if not GOLDEN_PATH.exists():
        raise FileNotFoundError(f"Reference fixture not found at {GOLDEN_PATH} (it is part of the repository).")
    return GOLDEN_PATH
