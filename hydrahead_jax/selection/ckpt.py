"""Saving / loading models for the selection CLI.

Delegates to ``hydrahead_jax.checkpoint_io`` (``save_pretrained`` / ``load_pretrained``) when that module is
present. Without it, the same on-disk layout is written here: ``<dir>/hydrahead_manifest.json`` (format
``hydrahead-orbax`` v1: model config incl. head layout, parameter dtype, free-form ``metadata``) and
``<dir>/state`` (an Orbax ``StandardCheckpointer`` tree of the model's ``nnx.Param`` state as a pure dict, the
tree of ``nnx.state(abstract_model(cfg), nnx.Param)``), so either side reads the other's checkpoints.
"""

from __future__ import annotations

import importlib
import json
import os

import jax
from flax import nnx

from hydrahead_jax.config import ModelConfig

FORMAT = "hydrahead-orbax"
MANIFEST = "hydrahead_manifest.json"


def _checkpoint_io():
  try:
    mod = importlib.import_module("hydrahead_jax.checkpoint_io")
  except ImportError:
    return None
  return mod if hasattr(mod, "load_pretrained") and hasattr(mod, "save_pretrained") else None


def save_model(model, path: str, extra: dict | None = None) -> str:
  """Writes ``model`` (config + parameters) to directory ``path`` (must not hold a checkpoint yet)."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, MANIFEST)) or os.path.exists(os.path.join(path, "state")):
    raise ValueError(f"checkpoint {path}: already exists (refusing to overwrite; pick a new --out)")
  io = _checkpoint_io()
  if io is not None:
    return io.save_pretrained(model, path, metadata=extra or {})
  import orbax.checkpoint as ocp

  os.makedirs(path, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "state"), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  ckptr.wait_until_finished()
  cfg = model.cfg
  manifest = {"format": FORMAT, "version": 1, "config": cfg.to_dict(), "layout": cfg.layout.describe(cfg.num_kv_heads),
              "param_dtype": cfg.param_dtype, "num_params": int(model.num_params()), "metadata": extra or {}}
  with open(os.path.join(path, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return path


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict:
  try:
    with open(os.path.join(path, MANIFEST)) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"checkpoint {path}: cannot read {MANIFEST} ({e})") from e


def load_model(path: str, *, dtype: str | None = None, compute_dtype: str | None = None):
  """(config, model) from a model directory (``save_model`` / ``checkpoint_io``)."""
  path = os.path.abspath(path)
  io = _checkpoint_io()
  if io is not None:
    kw = {"dtype": dtype} if dtype else {}
    cfg, model = io.load_pretrained(path, **kw)
  else:
    if not is_checkpoint(path):
      raise ValueError(f"checkpoint {path}: no {MANIFEST} found (not a model directory)")
    manifest = read_manifest(path)
    if manifest.get("format") != FORMAT or "config" not in manifest:
      raise ValueError(f"checkpoint {path}: unknown format {manifest.get('format')!r}")
    import orbax.checkpoint as ocp

    from hydrahead_jax.model import abstract_model

    cfg = ModelConfig.from_dict(manifest["config"])
    if dtype:
      cfg = cfg.replace(param_dtype=dtype)
    graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(params, ocp.StandardCheckpointer().restore(os.path.join(path, "state"), target))
    model = nnx.merge(graphdef, params, rest)
  if compute_dtype and compute_dtype != cfg.dtype:
    from hydrahead_jax.params import model_from_flat, model_to_flat

    cfg = cfg.replace(dtype=compute_dtype)
    model = model_from_flat(cfg, model_to_flat(model))
  return cfg, model


# -- teachers from any source ------------------------------------------------------------------------
def load_any(spec: str, *, dtype: str = "float32", compute_dtype: str | None = None, tokenizer: str | None = None):
  """(config, model, tokenizer) from ``spec``:

  - ``smollm2``: the project's real teacher (``hydrahead_jax.teacher.load_smollm2``);
  - a ``.gguf`` file (``hydrahead_jax.gguf_io``; tokenizer from the file's metadata);
  - a HF directory with ``config.json`` + safetensors (``hydrahead_jax.hf``; its ``tokenizer.json`` if present);
  - a model directory written by ``save_model`` / ``checkpoint_io``.
  ``tokenizer`` (a tokenizer.json path) overrides; the fallback is the byte-level tokenizer.
  """
  from hydrahead_jax.data.tokenizer import load_tokenizer

  tok = None
  if spec == "smollm2":
    from hydrahead_jax.teacher import load_smollm2

    cfg, model, tok = load_smollm2(dtype=dtype, compute_dtype=compute_dtype)
  elif spec.endswith(".gguf"):
    if not os.path.isfile(spec):
      raise FileNotFoundError(f"teacher: no such GGUF file: {spec}")
    from hydrahead_jax.gguf_io import GGUFCheckpoint, GGUFTokenizer, load_gguf

    g = GGUFCheckpoint(spec)
    cfg, model = load_gguf(g, dtype=dtype, compute_dtype=compute_dtype)
    tok = GGUFTokenizer(g)
  elif os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
    from hydrahead_jax.hf import load_pretrained_hf

    cfg, model = load_pretrained_hf(spec, dtype=dtype, compute_dtype=compute_dtype)
    if os.path.isfile(os.path.join(spec, "tokenizer.json")):
      tok = load_tokenizer(spec)
  elif os.path.isdir(spec):
    cfg, model = load_model(spec, dtype=dtype, compute_dtype=compute_dtype)
    extra = read_manifest(spec).get("metadata", {}) if is_checkpoint(spec) else {}
    if extra.get("tokenizer"):
      tok = load_tokenizer(extra["tokenizer"])
  else:
    raise ValueError(f"teacher {spec!r}: not 'smollm2', a .gguf file, a HF directory or a model directory")
  if tokenizer is not None:
    tok = load_tokenizer(tokenizer)
  if tok is None:
    tok = load_tokenizer(None)
  return cfg, model, tok


def tokenizer_for(spec: str, tokenizer: str | None = None):
  """The tokenizer ``load_any(spec)`` would return, without loading the weights."""
  from hydrahead_jax.data.tokenizer import load_tokenizer

  if tokenizer is not None:
    return load_tokenizer(tokenizer)
  if spec == "smollm2" or spec.endswith(".gguf"):
    from hydrahead_jax.gguf_io import GGUFTokenizer

    if spec == "smollm2":
      from hydrahead_jax.teacher import smollm2_gguf_path

      spec = smollm2_gguf_path()
    return GGUFTokenizer(spec)
  if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "tokenizer.json")):
    return load_tokenizer(spec)
  if os.path.isdir(spec) and is_checkpoint(spec):
    extra = read_manifest(spec).get("metadata", {})
    if extra.get("tokenizer"):
      return load_tokenizer(extra["tokenizer"])
  return load_tokenizer(None)
