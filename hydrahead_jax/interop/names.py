"""Canonical flat parameter names, independent of how layers are stacked or scanned.

Names are the module path inside one ``Block`` prefixed by ``layers.{i}.`` (e.g. ``layers.3.mixer.fa.wq``,
``layers.0.attn_norm.scale``), plus ``embed.embedding``, ``final_norm.scale`` and ``lm_head``. Interop code
(HF, GGUF, export) maps external names to these; ``model_from_flat`` builds a model from any mapping,
reading one tensor at a time (lazy mappings stay lazy), straight into the parameter dtype and sharding.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.nn.model import HydraHeadLM, abstract_model, plan_segments
from hydrahead_jax.sharding import param_pspecs


def _walk(tree, prefix=()) -> Iterator[tuple[tuple, object]]:
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _walk(v, prefix + (k,))
  else:
    yield prefix, tree


def _flat_targets(cfg: ModelConfig, pure: Mapping) -> Iterator[tuple[tuple, str | list[str]]]:
  """(state path, flat name or per-layer flat names) for every leaf of a model's pure state dict."""
  plan = plan_segments(cfg)
  for path, _ in _walk(pure):
    if path[0] == "segments":
      seg = plan[int(path[1])]
      inner = ".".join(str(p) for p in path[2:])
      names = [f"layers.{seg.start + j}.{inner}" for j in range(seg.length)]
      yield path, names if seg.stacked else names[0]
    else:
      yield path, ".".join(str(p) for p in path)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree[p]
  tree[path[-1]] = value


def flat_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every canonical name with its (per-layer) shape, for a config."""
  abstract = abstract_model(cfg)
  pure = nnx.state(abstract, nnx.Param).to_pure_dict()
  out = {}
  for path, target in _flat_targets(cfg, pure):
    shape = tuple(_get(pure, path).shape)
    if isinstance(target, list):
      out.update({n: shape[1:] for n in target})
    else:
      out[target] = shape
  return out


def model_to_flat(model: HydraHeadLM) -> dict[str, np.ndarray]:
  """All parameters as host numpy arrays under canonical names."""
  pure = nnx.state(model, nnx.Param).to_pure_dict()
  out: dict[str, np.ndarray] = {}
  for path, target in _flat_targets(model.cfg, pure):
    arr = np.asarray(jax.device_get(_get(pure, path)))
    if isinstance(target, list):
      out.update({n: arr[j] for j, n in enumerate(target)})
    else:
      out[target] = arr
  return out


def _read(flat: Mapping | Callable, name: str, shape: tuple[int, ...]) -> np.ndarray:
  try:
    arr = flat(name) if callable(flat) else flat[name]
  except KeyError:
    raise ValueError(f"checkpoint is missing tensor {name!r} (expected shape {shape})") from None
  arr = np.asarray(arr)
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f"tensor {name!r}: checkpoint shape {tuple(arr.shape)} but the model expects {tuple(shape)}")
  return arr


def model_from_flat(
    cfg: ModelConfig, flat: Mapping | Callable[[str], np.ndarray], *, mesh=None, strict: bool = True, progress=None
) -> HydraHeadLM:
  """Builds a model from canonical-name tensors without a random init or a second full copy.

  Each tensor is read, cast to ``cfg.param_dtype`` and placed (sharded when ``mesh`` is given) one at a time.
  With ``strict``, extra names in a Mapping are an error (they would be silently ignored otherwise).
  ``progress``: a tqdm-like bar, reset to the number of tensors and advanced per tensor read.
  """
  abstract = abstract_model(cfg, mesh)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  pure = params.to_pure_dict()
  specs = param_pspecs(params, mesh).to_pure_dict() if mesh is not None else None
  dtype = jnp.dtype(cfg.param_dtype)
  used: set[str] = set()
  targets = list(_flat_targets(cfg, pure))
  if progress is not None:
    progress.reset(total=sum(len(t) if isinstance(t, list) else 1 for _, t in targets))

  def read(name, shape):
    arr = _read(flat, name, shape)
    used.add(name)
    if progress is not None:
      progress.update(1)
    return arr

  for path, target in targets:
    shape = tuple(_get(pure, path).shape)
    arr = np.stack([read(n, shape[1:]) for n in target]) if isinstance(target, list) else read(target, shape)
    arr = arr.astype(dtype)
    if mesh is not None:
      value = jax.device_put(arr, jax.sharding.NamedSharding(mesh, _get(specs, path)))
    else:
      value = jnp.asarray(arr)
    _set(pure, path, value)
  if strict and isinstance(flat, Mapping):
    extra = sorted(set(flat) - used)
    if extra:
      raise ValueError(f"checkpoint has tensors the model does not use: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
  params.replace_by_pure_dict(pure)
  return nnx.merge(graphdef, params, rest)


def load_flat_into(model: HydraHeadLM, flat: Mapping[str, np.ndarray]) -> None:
  """In-place: overwrite a built model's parameters from canonical names (shapes checked)."""
  new = model_from_flat(model.cfg, flat)
  nnx.update(model, nnx.state(new, nnx.Param))
