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


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A persistent XLA compilation cache shared by one test module and the processes it starts."""
  import jax

  path = str(tmp_path_factory.mktemp("jax_cache"))
  old = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  try:  # the cache is set up at the first compile; earlier tests may have done that already
    from jax._src import compilation_cache
    compilation_cache.reset_cache()
  except (ImportError, AttributeError):
    pass
  yield path
  jax.config.update("jax_compilation_cache_dir", None)
  if old is None:
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  else:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = old
