"""Shipped configs load, and the GPU ones leave kernel choices automatic (a pinned pure-JAX path is ~10x slower)."""

import glob
import os

import pytest

from hydrahead_jax.transfer.config import load_any, returns_transfer_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))
KERNEL_FIELDS = ("fa_implementation", "la_implementation", "conv_implementation", "fusion_implementation")


def _is_study(path):
  """configs/study/*.py other than transfer recipes: study configs (``hydrahead_jax.study``'s loader)."""
  return os.path.basename(os.path.dirname(path)) == "study" and not returns_transfer_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_loads(path):
  if _is_study(path):
    from hydrahead_jax.study import config as sconfig

    assert sconfig.load(path).arms
    return
  cfg = load_any(path)
  model = getattr(cfg, "model", None)
  if model is not None and os.path.basename(path).startswith(("gpu_", "smollm2", "long_")):
    pinned = {f: getattr(model, f) for f in KERNEL_FIELDS if getattr(model, f) is not None}
    assert not pinned, f"{path}: GPU configs take the automatic kernel choice, but pin {pinned}"


def test_gpu_config_exists():
  assert any(os.path.basename(p).startswith("gpu_") for p in CONFIGS)
