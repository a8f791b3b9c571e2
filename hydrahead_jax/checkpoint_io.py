"""Saving and loading HydraHead models: Orbax checkpoints with a manifest, and a portable safetensors format.

Formats (see docs/checkpoint_format.md):

- **Orbax** (``save_pretrained``): a directory with ``hydrahead_manifest.json`` (config, head layout,
  parameter dtype) and ``state/`` (an Orbax ``StandardCheckpointer`` tree of the model's parameters).
  ``load_pretrained`` restores it onto any mesh: every array is read straight into its target sharding.
- **HydraHead safetensors** (``save_hybrid_safetensors``): ``hydrahead_config.json`` + ``model.safetensors``
  (or shards + ``model.safetensors.index.json``) with one tensor per canonical flat name
  (``hydrahead_jax.params``), per layer; readable from any language without JAX.
- **HF** (``hf.save_hf``): all-FA models as a transformers Qwen3/Llama checkpoint.

``load_pretrained(path)`` accepts all of them, plus HF checkpoint directories and GGUF files.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from hydrahead_jax.config import ModelConfig

MANIFEST = "hydrahead_manifest.json"
ORBAX_FORMAT = "hydrahead-orbax"
SAFETENSORS_CONFIG = "hydrahead_config.json"
SAFETENSORS_FORMAT = "hydrahead-safetensors"
FORMAT_VERSION = 1


def _write_json(path: str, data: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=1)


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _prepare_dir(path: str, overwrite: bool) -> str:
  path = os.path.abspath(path)
  if os.path.exists(path) and os.listdir(path):
    if not overwrite:
      raise FileExistsError(f"checkpoint: {path} exists and is not empty (pass overwrite=True)")
    shutil.rmtree(path)
  os.makedirs(path, exist_ok=True)
  return path


def _check_format(data: dict[str, Any], fmt: str, file: str) -> ModelConfig:
  if data.get("format") != fmt:
    raise ValueError(f"{file}: format {data.get('format')!r}, expected {fmt!r}")
  if int(data.get("version", 0)) > FORMAT_VERSION:
    raise ValueError(f"{file}: format version {data['version']} is newer than this library's ({FORMAT_VERSION})")
  if "config" not in data:
    raise ValueError(f"{file}: missing 'config'")
  return ModelConfig.from_dict(data["config"])


def _read_config(path: str, name: str, fmt: str, dtype) -> ModelConfig:
  """The model config stored as ``name`` in a checkpoint directory, format-checked, optional param dtype."""
  file = os.path.join(path, name)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"checkpoint: no {name} in {path}")
  cfg = _check_format(_read_json(file), fmt, file)
  return cfg if dtype is None else cfg.replace(param_dtype=dtype)


# -- Orbax -----------------------------------------------------------------------------------------------


def save_pretrained(model, path: str, *, overwrite: bool = False, metadata: dict[str, Any] | None = None) -> str:
  """Orbax checkpoint of ``model``'s parameters (sharded arrays are written by their owners) + manifest."""
  import orbax.checkpoint as ocp

  cfg: ModelConfig = model.cfg
  path = _prepare_dir(path, overwrite)
  state = nnx.state(model, nnx.Param).to_pure_dict()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "state"), state)
  ckptr.wait_until_finished()
  manifest = {
      "format": ORBAX_FORMAT, "version": FORMAT_VERSION,
      "config": cfg.to_dict(),
      "layout": cfg.layout.describe(cfg.num_kv_heads),
      "param_dtype": cfg.param_dtype,
      "num_params": int(model.num_params()),
      "metadata": metadata or {},
  }
  if jax.process_index() == 0:
    _write_json(os.path.join(path, MANIFEST), manifest)
  return path


def _abstract_target(cfg: ModelConfig, mesh):
  from hydrahead_jax.model import abstract_model
  from hydrahead_jax.sharding import param_pspecs

  abstract = abstract_model(cfg, mesh)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  pure = params.to_pure_dict()
  if mesh is not None:
    specs = param_pspecs(params, mesh).to_pure_dict()
    shard = lambda x, s: jax.sharding.NamedSharding(mesh, s)
  else:
    specs = jax.tree.map(lambda x: None, pure)
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shard = lambda x, s: dev
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard(x, s)), pure, specs,
                        is_leaf=lambda v: isinstance(v, jax.ShapeDtypeStruct))
  return graphdef, params, rest, target


def load_orbax(path: str, mesh=None, *, dtype: str | None = None):
  """(config, model) from a ``save_pretrained`` directory, each array restored onto ``mesh``'s sharding.

  ``dtype`` casts the parameters on restore (default: as saved).
  """
  import orbax.checkpoint as ocp

  from hydrahead_jax.hf import resolve_mesh

  mesh = resolve_mesh(mesh)
  path = os.path.abspath(path)
  cfg = _read_config(path, MANIFEST, ORBAX_FORMAT, dtype)
  state_dir = os.path.join(path, "state")
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f"checkpoint: {path} has a manifest but no state/ directory")
  graphdef, params, rest, target = _abstract_target(cfg, mesh)
  try:
    restored = ocp.StandardCheckpointer().restore(state_dir, target)
  except (ValueError, KeyError) as e:
    raise ValueError(f"checkpoint {path}: parameters do not match the manifest's config: {e}") from e
  params.replace_by_pure_dict(restored)
  return cfg, nnx.merge(graphdef, params, rest)


# -- portable safetensors (any layout) ---------------------------------------------------------------------


def save_hybrid_safetensors(model, path: str, *, dtype: str | None = None, max_shard_bytes: int = 2 << 30,
                            overwrite: bool = False, progress: Callable[[int], None] | None = None) -> str:
  """Canonical flat tensors (one per layer and name) as safetensors + ``hydrahead_config.json``."""
  from hydrahead_jax.hf import _np_dtype, save_safetensors_sharded
  from hydrahead_jax.params import model_to_flat

  cfg: ModelConfig = model.cfg
  path = _prepare_dir(path, overwrite)
  np_dtype = _np_dtype(dtype or cfg.param_dtype)
  flat = {k: v.astype(np_dtype) for k, v in model_to_flat(model).items()}
  save_safetensors_sharded(flat, path, max_shard_bytes=max_shard_bytes, progress=progress,
                           metadata={"hydrahead_format": SAFETENSORS_FORMAT})
  saved_cfg = cfg.replace(param_dtype=np.dtype(np_dtype).name)
  _write_json(os.path.join(path, SAFETENSORS_CONFIG), {
      "format": SAFETENSORS_FORMAT, "version": FORMAT_VERSION, "config": saved_cfg.to_dict(),
      "layout": cfg.layout.describe(cfg.num_kv_heads),
  })
  return path


def load_hybrid_safetensors(path: str, mesh=None, *, dtype: str | None = None):
  """(config, model) from a ``save_hybrid_safetensors`` directory (read lazily, one tensor at a time)."""
  from hydrahead_jax.hf import SafetensorsCheckpoint, resolve_mesh
  from hydrahead_jax.params import model_from_flat

  mesh = resolve_mesh(mesh)
  cfg = _read_config(path, SAFETENSORS_CONFIG, SAFETENSORS_FORMAT, dtype)
  ckpt = SafetensorsCheckpoint(path)
  used = set()

  def get(name):
    used.add(name)
    return ckpt.get(name)

  model = model_from_flat(cfg, get, mesh=mesh)
  extra = sorted(set(ckpt.keys()) - used)
  if extra:
    raise ValueError(f"checkpoint {path}: tensors the config does not use: {extra[:8]}")
  return cfg, model


# -- one entry point ---------------------------------------------------------------------------------------


def detect_format(path: str) -> str:
  """'orbax', 'hydrahead-safetensors', 'hf' or 'gguf' (raises FileNotFoundError/ValueError otherwise)."""
  if os.path.isfile(path):
    if path.endswith(".gguf"):
      return "gguf"
    raise ValueError(f"load_pretrained: {path} is a file but not a .gguf; give a checkpoint directory")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"load_pretrained: no such file or directory: {path}")
  if os.path.isfile(os.path.join(path, MANIFEST)):
    return "orbax"
  if os.path.isfile(os.path.join(path, SAFETENSORS_CONFIG)):
    return "hydrahead-safetensors"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
  if len(ggufs) == 1:
    return "gguf"
  raise FileNotFoundError(
      f"load_pretrained: {path} holds none of {MANIFEST} (Orbax), {SAFETENSORS_CONFIG} (HydraHead safetensors), "
      f"config.json (HF) or a single .gguf file")


def load_pretrained(path: str, mesh=None, **kwargs):
  """(config, model) from any supported checkpoint; ``mesh`` (default: the mesh active through
  ``jax.set_mesh``, if any) places every parameter directly on its sharding.

  Orbax (``save_pretrained``) and HydraHead safetensors restore the saved model; HF directories and GGUF
  files load the teacher (``layout=`` converts it to a hybrid student, see ``hf.load_pretrained_hf``).
  ``kwargs``: ``dtype`` for every format, plus the HF/GGUF options.
  """
  fmt = detect_format(path)
  if fmt == "orbax":
    return load_orbax(path, mesh, **kwargs)
  if fmt == "hydrahead-safetensors":
    return load_hybrid_safetensors(path, mesh, **kwargs)
  if fmt == "hf":
    from hydrahead_jax.hf import load_pretrained_hf

    return load_pretrained_hf(path, mesh=mesh, **kwargs)
  from hydrahead_jax.gguf_io import load_gguf

  if os.path.isdir(path):
    path = os.path.join(path, next(f for f in os.listdir(path) if f.endswith(".gguf")))
  return load_gguf(path, mesh=mesh, **kwargs)
