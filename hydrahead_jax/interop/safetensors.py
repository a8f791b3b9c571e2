"""safetensors I/O: a lazy reader over one or several files, a sharded writer, and HydraHead's portable format.

The portable format (``save_hybrid_safetensors``): ``hydrahead_config.json`` + ``model.safetensors`` (or shards +
``model.safetensors.index.json``), one tensor per canonical flat name (``interop.names``) and layer, any layout;
readable from any language without JAX (docs/checkpoint_format.md).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.interop.format import FORMAT_VERSION, prepare_dir, read_config, write_json
from hydrahead_jax.sharding import concrete_mesh

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_CONFIG = "hydrahead_config.json"
SAFETENSORS_FORMAT = "hydrahead-safetensors"


def to_np_dtype(name: str):
  """numpy dtype for a dtype name (bfloat16 included, through ml_dtypes)."""
  try:
    return np.dtype(jnp.dtype(name))
  except TypeError as e:
    raise ValueError(f"dtype: not a dtype: {name!r}") from e


class SafetensorsCheckpoint:
  """Lazy reader over one or several safetensors files: ``get(name)`` reads a single tensor."""

  def __init__(self, path: str):
    from safetensors import safe_open

    self.path = path
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' object")
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
      if not files:
        raise FileNotFoundError(f"safetensors checkpoint: no *.safetensors files (and no {INDEX_FILE}) in {path}")
      weight_map = None
    self._files = {}
    for fname in files:
      full = os.path.join(path, fname)
      if not os.path.isfile(full):
        raise FileNotFoundError(f"safetensors checkpoint: {INDEX_FILE} names {fname}, which is missing in {path}")
      self._files[fname] = safe_open(full, framework="numpy")
    if weight_map is None:
      weight_map = {k: fname for fname, h in self._files.items() for k in h.keys()}
    self.weight_map: dict[str, str] = dict(weight_map)

  def keys(self) -> list[str]:
    return list(self.weight_map)

  def dtypes(self) -> set[str]:
    return {self._files[f].get_slice(k).get_dtype() for k, f in self.weight_map.items()}

  def get(self, name: str) -> np.ndarray:
    if name not in self.weight_map:
      raise KeyError(name)
    return self._files[self.weight_map[name]].get_tensor(name)

  __call__ = get


def save_safetensors_sharded(tensors: Mapping[str, np.ndarray], path: str, *, base: str = "model",
                             max_shard_bytes: int = 2 << 30, metadata: dict[str, str] | None = None,
                             progress: Callable[[int], None] | None = None) -> list[str]:
  """Writes ``base.safetensors`` (or ``base-0000k-of-0000n.safetensors`` + index) and returns the files."""
  from safetensors.numpy import save_file

  shards, cur, size = [], {}, 0
  for k in tensors:
    nbytes = tensors[k].nbytes
    if cur and size + nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[k] = tensors[k]
    size += nbytes
  shards.append(cur)
  os.makedirs(path, exist_ok=True)
  meta = {"format": "np", **(metadata or {})}
  if len(shards) == 1:
    names = [f"{base}.safetensors"]
  else:
    names = [f"{base}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for fname, shard in zip(names, shards):
    save_file({k: np.ascontiguousarray(v) for k, v in shard.items()}, os.path.join(path, fname), metadata=meta)
    if progress is not None:
      progress(len(shard))
  if len(shards) > 1:
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
             "weight_map": {k: fname for fname, shard in zip(names, shards) for k in shard}}
    with open(os.path.join(path, f"{base}.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=1)
  return names


def save_hybrid_safetensors(model, path: str, *, dtype: str | None = None, max_shard_bytes: int = 2 << 30,
                            overwrite: bool = False, progress: Callable[[int], None] | None = None) -> str:
  """Canonical flat tensors (one per layer and name) as safetensors + ``hydrahead_config.json``."""
  from hydrahead_jax.interop.names import model_to_flat

  cfg: ModelConfig = model.cfg
  path = prepare_dir(path, overwrite)
  np_dtype = to_np_dtype(dtype or cfg.param_dtype)
  flat = {k: v.astype(np_dtype) for k, v in model_to_flat(model).items()}
  save_safetensors_sharded(flat, path, max_shard_bytes=max_shard_bytes, progress=progress,
                           metadata={"hydrahead_format": SAFETENSORS_FORMAT})
  saved_cfg = cfg.replace(param_dtype=np.dtype(np_dtype).name)
  write_json(os.path.join(path, SAFETENSORS_CONFIG), {
      "format": SAFETENSORS_FORMAT, "version": FORMAT_VERSION, "config": saved_cfg.to_dict(),
      "layout": cfg.layout.describe(cfg.num_kv_heads),
  })
  return path


def load_hybrid_safetensors(path: str, mesh=None, *, dtype: str | None = None, compute_dtype: str | None = None, progress=None,
                            **config_overrides):
  """(config, model) from a ``save_hybrid_safetensors`` directory (read lazily, one tensor at a time); arguments
  as ``orbax.load_orbax``."""
  from hydrahead_jax.interop.names import model_from_flat

  mesh = concrete_mesh(mesh)
  cfg = read_config(path, SAFETENSORS_CONFIG, SAFETENSORS_FORMAT, dtype, compute_dtype, **config_overrides)
  ckpt = SafetensorsCheckpoint(path)
  used = set()

  def get(name):
    used.add(name)
    return ckpt.get(name)

  model = model_from_flat(cfg, get, mesh=mesh, progress=progress)
  extra = sorted(set(ckpt.keys()) - used)
  if extra:
    raise ValueError(f"checkpoint {path}: tensors the config does not use: {extra[:8]}")
  return cfg, model
