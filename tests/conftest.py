"""Test setup: 8 fake CPU devices (for sharding tests), set before JAX starts."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  """A fresh random generator per test (seeded from OS entropy, printed on failure)."""
  seed = int(np.random.SeedSequence().entropy % (2**31))
  print(f"random seed: {seed}")
  return np.random.default_rng(seed)
