"""Optional test dependencies: skipped with a reason where they are missing, a failure where they are required.

CI (``CI=true``, as .ci/run runs) installs every extra: there, or with ``HYDRAHEAD_REQUIRE_OPTIONAL=1``, a broken or
missing install fails the run instead of turning tests into skips.
"""

import importlib
import os

import pytest

REQUIRE = any(os.environ.get(k, "").lower() not in ("", "0", "false") for k in ("HYDRAHEAD_REQUIRE_OPTIONAL", "CI"))


def missing_optional(reason: str):
  """Skip (module- or test-level) with ``reason``; fail instead when optional dependencies are required."""
  if REQUIRE:
    pytest.fail(f"required optional dependency missing (HYDRAHEAD_REQUIRE_OPTIONAL=1): {reason}", pytrace=False)
  pytest.skip(reason, allow_module_level=True)


def optional_import(name: str):
  """The module ``name``, or a skip / failure (see ``missing_optional``) naming the import error."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    missing_optional(f"optional dependency {name!r} not importable: {type(e).__name__}: {e}")
