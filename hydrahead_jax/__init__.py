"""HydraHead-JAX: head-level hybrid attention (softmax FA + Gated DeltaNet LA) in Flax NNX.

The public names below are imported lazily (on first attribute access), so CLIs that only parse arguments or
report an error do not pay for importing JAX.
"""

import importlib

_EXPORTS = {
    "HeadLayout": "hydrahead_jax.config",
    "ModelConfig": "hydrahead_jax.config",
    "parse_ratio": "hydrahead_jax.config",
    "HydraHeadLM": "hydrahead_jax.nn.model",
    "create_model": "hydrahead_jax.nn.model",
    "gated_delta_rule": "hydrahead_jax.ops",
    "load": "hydrahead_jax.interop.load",
    "load_pretrained": "hydrahead_jax.interop.load",
    "save_pretrained": "hydrahead_jax.interop.orbax",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'hydrahead_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
