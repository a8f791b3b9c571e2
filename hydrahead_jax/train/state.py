"""Training state as flat dicts: ``{"segments.0.mixer.la.wq": array, ...}``.

Keys are the model's state paths joined by dots (stacked segments keep their leading ``layers``
axis). Flat string keys keep optax labels, Orbax checkpoints and shardings simple; ``leaf_names``
maps each key to the canonical per-layer names of ``hydrahead_jax.interop.names`` (``layers.{i}...``), which
is what freezing and weight-decay patterns match.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.nn.model import plan_segments


def _key(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def flatten_state(state: nnx.State) -> dict[str, Any]:
  """nnx.State (or its pure dict) -> flat ``{dotted path: array}``."""
  pure = state.to_pure_dict() if isinstance(state, nnx.State) else state
  out: dict[str, Any] = {}

  def walk(tree, prefix):
    if isinstance(tree, Mapping):
      for k, v in tree.items():
        walk(v, prefix + (k,))
    else:
      out[_key(prefix)] = tree

  walk(pure, ())
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Flat dict -> nested pure dict (numeric path parts become ints, as nnx.List indices)."""
  root: dict = {}
  for key, value in flat.items():
    parts = [int(p) if p.isdigit() else p for p in key.split(".")]
    node = root
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return root


def merge(graphdef, flat_params: Mapping[str, Any], rest) -> nnx.Module:
  return nnx.merge(graphdef, unflatten(flat_params), rest)


def leaf_names(cfg: ModelConfig, flat: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
  """Flat key -> canonical names (one per layer of a stacked segment, else one)."""
  plan = plan_segments(cfg)
  out = {}
  for key in flat:
    parts = key.split(".")
    if parts[0] == "segments":
      seg = plan[int(parts[1])]
      inner = ".".join(parts[2:])
      names = tuple(f"layers.{seg.start + j}.{inner}" for j in range(seg.length))
      out[key] = names if seg.stacked else names[:1]
    else:
      out[key] = (key,)
  return out


def tree_shardings(flat_state: Mapping[str, Any]) -> dict[str, Any]:
  return {k: getattr(v, "sharding", None) for k, v in flat_state.items()}


def global_norm(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree)]
  return jax.numpy.sqrt(sum(jax.numpy.sum(jax.numpy.square(x.astype(jax.numpy.float32))) for x in leaves))
