"""Canonical flat parameter names, independent of how layers are stacked or scanned.

Names are the module path inside one ``Block`` prefixed by ``layers.{i}.`` (e.g. ``layers.3.mixer.fa.wq``,
``layers.0.attn_norm.scale``), plus ``embed.embedding``, ``final_norm.scale`` and ``lm_head``. Interop code
(HF, GGUF, export) maps external names to these; ``model_from_flat`` builds a model from any mapping,
reading one tensor at a time (lazy mappings stay lazy), straight into the parameter dtype and sharding.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.nn.model import HydraHeadLM, Segment, abstract_model, plan_segments
from hydrahead_jax.sharding import param_pspecs


def canonical_names(plan: Sequence[Segment], path: Sequence) -> tuple[str, ...]:
  """The canonical name(s) of the parameter at state ``path`` (a tuple of keys, or a dotted string's parts):
  one per layer of a stacked segment (leading ``layers`` axis), else one. ``plan``: ``plan_segments(cfg)``."""
  path = tuple(str(p) for p in path)
  if path[0] != "segments":
    return (".".join(path),)
  seg = plan[int(path[1])]
  inner = ".".join(path[2:])
  names = tuple(f"layers.{seg.start + j}.{inner}" for j in range(seg.length))
  return names if seg.stacked else names[:1]


def _leaves(cfg: ModelConfig, pure: Mapping) -> Iterator[tuple[tuple, object, tuple[str, ...], bool]]:
  """(state path, leaf, canonical names, stacked) for every leaf of a model's pure state dict."""
  plan = plan_segments(cfg)
  for path, leaf in traverse_util.flatten_dict(pure).items():
    stacked = str(path[0]) == "segments" and plan[int(path[1])].stacked
    yield path, leaf, canonical_names(plan, path), stacked


def flat_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every canonical name with its (per-layer) shape, for a config."""
  pure = nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()
  return {n: tuple(leaf.shape[1:] if stacked else leaf.shape)
          for _, leaf, names, stacked in _leaves(cfg, pure) for n in names}


def model_to_flat(model: HydraHeadLM) -> dict[str, np.ndarray]:
  """All parameters as host numpy arrays under canonical names."""
  out: dict[str, np.ndarray] = {}
  for _, leaf, names, stacked in _leaves(model.cfg, nnx.state(model, nnx.Param).to_pure_dict()):
    arr = np.asarray(jax.device_get(leaf))
    out.update({n: arr[j] for j, n in enumerate(names)} if stacked else {names[0]: arr})
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
  specs = traverse_util.flatten_dict(param_pspecs(params, mesh).to_pure_dict()) if mesh is not None else None
  dtype = jnp.dtype(cfg.param_dtype)
  used: set[str] = set()
  leaves = list(_leaves(cfg, pure))
  if progress is not None:
    progress.reset(total=sum(len(names) for _, _, names, _ in leaves))

  def read(name, shape):
    arr = _read(flat, name, shape)
    used.add(name)
    if progress is not None:
      progress.update(1)
    return arr

  values = {}
  for path, leaf, names, stacked in leaves:
    shape = tuple(leaf.shape)
    arr = (np.stack([read(n, shape[1:]) for n in names]) if stacked else read(names[0], shape)).astype(dtype)
    values[path] = (jax.device_put(arr, jax.sharding.NamedSharding(mesh, specs[path])) if mesh is not None
                    else jnp.asarray(arr))
  if strict and isinstance(flat, Mapping):
    extra = sorted(set(flat) - used)
    if extra:
      raise ValueError(f"checkpoint has tensors the model does not use: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
  pure = traverse_util.unflatten_dict(values)
  params.replace_by_pure_dict(pure)
  return nnx.merge(graphdef, params, rest)


def load_flat_into(model: HydraHeadLM, flat: Mapping[str, np.ndarray]) -> None:
  """In-place: overwrite a built model's parameters from canonical names (shapes checked)."""
  new = model_from_flat(model.cfg, flat)
  nnx.update(model, nnx.state(new, nnx.Param))
