"""Test setup: 8 fake CPU devices (for sharding tests), set before JAX starts."""

import os

# Fake devices for sharding tests; LLVM optimisation off: same numerics, ~2.5x faster CPU compiles.
# The concurrency-optimized CPU scheduler deadlocked a teacher + chunked-GDN program (docs/transfer.md): off.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  """A fresh random generator per test (seeded from OS entropy, printed on failure)."""
  seed = int(np.random.SeedSequence().entropy % (2**31))
  print(f"random seed: {seed}")
  return np.random.default_rng(seed)
