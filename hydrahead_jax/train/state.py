"""Training state as flat dicts: ``{"segments.0.mixer.la.wq": array, ...}``.

Keys are the model's state paths joined by dots (stacked segments keep their leading ``layers``
axis). Flat string keys keep optax labels, Orbax checkpoints and shardings simple; ``leaf_names``
maps each key to the canonical per-layer names of ``hydrahead_jax.interop.names`` (``layers.{i}...``), which
is what freezing and weight-decay patterns match.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx, traverse_util

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.interop.names import canonical_names
from hydrahead_jax.nn.model import plan_segments


def flatten_state(state: nnx.State) -> dict[str, Any]:
  """nnx.State (or its pure dict) -> flat ``{dotted path: array}``."""
  pure = state.to_pure_dict() if isinstance(state, nnx.State) else state
  return {".".join(str(p) for p in path): v for path, v in traverse_util.flatten_dict(pure).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Flat dict -> nested pure dict (numeric path parts become ints, as nnx.List indices)."""
  return traverse_util.unflatten_dict({tuple(int(p) if p.isdigit() else p for p in key.split(".")): value
                                       for key, value in flat.items()})


def merge(graphdef, flat_params: Mapping[str, Any], rest) -> nnx.Module:
  return nnx.merge(graphdef, unflatten(flat_params), rest)


def leaf_names(cfg: ModelConfig, flat: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
  """Flat key -> canonical names (one per layer of a stacked segment, else one)."""
  plan = plan_segments(cfg)
  return {key: canonical_names(plan, key.split(".")) for key in flat}


def tree_shardings(flat_state: Mapping[str, Any]) -> dict[str, Any]:
  return {k: getattr(v, "sharding", None) for k, v in flat_state.items()}
