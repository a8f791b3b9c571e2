"""Orbax checkpoints of a HydraHead model: ``hydrahead_manifest.json`` (format, config, head layout, parameter
dtype, free-form metadata) and ``state/`` (an Orbax ``StandardCheckpointer`` tree of the model's parameters).

``load_orbax`` restores onto any mesh: every array is read straight into its target sharding.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.interop.format import FORMAT_VERSION, prepare_dir, read_config, read_json, write_json
from hydrahead_jax.sharding import concrete_mesh

MANIFEST = "hydrahead_manifest.json"
ORBAX_FORMAT = "hydrahead-orbax"


def save_pretrained(model, path: str, *, overwrite: bool = False, metadata: dict[str, Any] | None = None) -> str:
  """Orbax checkpoint of ``model``'s parameters (sharded arrays are written by their owners) + manifest."""
  import orbax.checkpoint as ocp

  cfg: ModelConfig = model.cfg
  path = prepare_dir(path, overwrite)
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
    write_json(os.path.join(path, MANIFEST), manifest)
  return path


def _abstract_target(cfg: ModelConfig, mesh):
  from hydrahead_jax.nn.model import abstract_model
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


def load_orbax(path: str, mesh=None, *, dtype: str | None = None, compute_dtype: str | None = None, progress=None,
               **config_overrides):
  """(config, model) from a ``save_pretrained`` directory, each array restored onto ``mesh``'s sharding.

  ``dtype`` casts the parameters on restore (default: as saved); ``config_overrides`` replace config fields that
  keep parameter shapes (``interop.load.RESTORE_OVERRIDES``); ``progress`` a tqdm-like bar.
  """
  import orbax.checkpoint as ocp

  mesh = concrete_mesh(mesh)
  path = os.path.abspath(path)
  cfg = read_config(path, MANIFEST, ORBAX_FORMAT, dtype, compute_dtype, **config_overrides)
  state_dir = os.path.join(path, "state")
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f"checkpoint: {path} has a manifest but no state/ directory")
  graphdef, params, rest, target = _abstract_target(cfg, mesh)
  try:
    restored = ocp.StandardCheckpointer().restore(state_dir, target)
  except (ValueError, KeyError) as e:
    raise ValueError(f"checkpoint {path}: parameters do not match the manifest's config: {e}") from e
  params.replace_by_pure_dict(restored)
  if progress is not None:
    progress.update(1)
  return cfg, nnx.merge(graphdef, params, rest)


def read_manifest(path: str) -> dict[str, Any]:
  """The manifest of a ``save_pretrained`` directory (config, layout, metadata, ...)."""
  file = os.path.join(path, MANIFEST)
  try:
    return read_json(file)
  except (OSError, ValueError) as e:
    raise ValueError(f"checkpoint {path}: cannot read {MANIFEST} ({e})") from e
