"""safetensors I/O: a lazy reader over one or several files, a sharded writer, and HydraHead's portable format.

The portable format (``save_hybrid_safetensors``): ``hydrahead_config.json`` + ``model.safetensors`` (or shards +
``model.safetensors.index.json``), one tensor per canonical flat name (``interop.names``) and layer, any layout;
readable from any language without JAX (docs/checkpoint_format.md).

Integrity (docs/reliability.md): before a file is opened its header is checked against the file size (header
length, JSON, every tensor's byte range); a truncated or damaged file is a ``CheckpointError``, a shard missing
from a sharded checkpoint a ``CheckpointFileMissing`` (both ``UserError``s, and ``ValueError`` /
``FileNotFoundError``), one line naming the file, the shard or the tensor.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from hydrahead_jax.cli import UserError
from hydrahead_jax.config import ModelConfig
from hydrahead_jax.interop.format import FORMAT_VERSION, prepare_dir, read_config, write_json
from hydrahead_jax.sharding import concrete_mesh

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_CONFIG = "hydrahead_config.json"
SAFETENSORS_FORMAT = "hydrahead-safetensors"
_FIX = "re-download or re-export it"
# bytes per element of the safetensors dtypes (others, e.g. sub-byte floats, are not size-checked)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "U16": 2, "I16": 2, "F16": 2,
                "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8}


class CheckpointError(UserError, ValueError):
  """A model checkpoint that cannot be used as it is (truncated, damaged, inconsistent, unsupported); the one-line
  message names the file and, where there is one, the tensor."""


class CheckpointFileMissing(UserError, FileNotFoundError):
  """A model checkpoint, or a file of one (a shard), that is not there."""


def check_safetensors_file(path: str) -> dict:
  """The JSON header of a safetensors file, checked against the file's size before any tensor is read: the header
  length, the JSON, each tensor's dtype / shape / byte range. Raises ``CheckpointError`` naming the file (and the
  tensor)."""
  size = os.path.getsize(path)
  if size < 8:
    raise CheckpointError(f"safetensors file {path}: only {size} bytes, too short for a header (an 8-byte length, "
                          f"then JSON); it is truncated or not a safetensors file; {_FIX}")
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
      raise CheckpointError(f"safetensors file {path}: truncated or damaged header: its length field says {n:,} bytes "
                            f"of JSON, but the file has only {size - 8:,} bytes after it; {_FIX}")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
  except ValueError as e:  # (UnicodeDecodeError too)
    raise CheckpointError(f"safetensors file {path}: damaged header (its {n:,} bytes are not valid JSON: {e}); "
                          f"{_FIX}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"safetensors file {path}: damaged header (JSON {type(header).__name__}, not an object); "
                          f"{_FIX}")
  data_start, tensors, past = 8 + n, 0, []
  for name, info in header.items():
    if name == "__metadata__":
      continue
    tensors += 1
    try:
      begin, end = (int(x) for x in info["data_offsets"])
      shape, dtype = [int(d) for d in info["shape"]], str(info["dtype"])
    except (TypeError, KeyError, ValueError):
      raise CheckpointError(f"safetensors file {path}: damaged header: the entry of tensor {name!r} has no valid "
                            f"dtype / shape / data_offsets ({str(info)[:120]}); {_FIX}") from None
    item = _DTYPE_BYTES.get(dtype)
    nbytes = None if item is None else math.prod(shape) * item
    if not 0 <= begin <= end or (nbytes is not None and nbytes != end - begin):
      holds = "its bytes" if nbytes is None else f"its {nbytes:,} bytes"
      raise CheckpointError(f"safetensors file {path}: damaged header: tensor {name!r} ({dtype} {shape}) has "
                            f"data_offsets [{begin}, {end}], which do not hold {holds}; {_FIX}")
    if data_start + end > size:
      past.append((begin, end, name, dtype, shape))
  if past:
    begin, end, name, dtype, shape = min(past, key=lambda e: e[0])
    need = data_start + max(e[1] for e in past)
    raise CheckpointError(
        f"safetensors file {path} is truncated: tensor {name!r} ({dtype} {shape}, {end - begin:,} bytes) needs bytes "
        f"{data_start + begin:,} to {data_start + end:,}, but the file has only {size:,} bytes ({len(past)} of "
        f"{tensors} tensors lie past its end; the complete file has {need:,} bytes); {_FIX}")
  return header


def _open_checked(path: str):
  """``safe_open`` after ``check_safetensors_file``; the library's own errors name the file too."""
  from safetensors import SafetensorError, safe_open

  check_safetensors_file(path)
  try:
    return safe_open(path, framework="numpy")
  except SafetensorError as e:
    raise CheckpointError(f"safetensors file {path}: cannot be read ({e}); {_FIX}") from e


def to_np_dtype(name: str):
  """numpy dtype for a dtype name (bfloat16 included, through ml_dtypes)."""
  try:
    return np.dtype(jnp.dtype(name))
  except TypeError as e:
    raise ValueError(f"dtype: not a dtype: {name!r}") from e


class SafetensorsCheckpoint:
  """Lazy reader over one or several safetensors files: ``get(name)`` reads a single tensor."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f).get("weight_map")
      except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{index}: cannot be read as a JSON object ({e}); {_FIX}") from None
      if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> file name; {_FIX}")
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
      if missing:
        held = [k for k, v in weight_map.items() if v == missing[0]]
        more = f" (and {len(missing) - 1} more: {missing[1:4]})" if len(missing) > 1 else ""
        raise CheckpointFileMissing(
            f"safetensors checkpoint {path}: shard {missing[0]!r}{more} is missing; {INDEX_FILE} puts {len(held)} "
            f"tensor{'s' if len(held) != 1 else ''} there (e.g. {held[0]!r}); copy or download the missing shard(s)")
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
      if not files:
        raise CheckpointFileMissing(f"safetensors checkpoint: no *.safetensors files (and no {INDEX_FILE}) in {path}")
      weight_map = None
    self._files = {fname: _open_checked(os.path.join(path, fname)) for fname in files}
    if weight_map is None:
      weight_map = {k: fname for fname, h in self._files.items() for k in h.keys()}
    else:
      for fname, h in self._files.items():
        absent = sorted(set(k for k, v in weight_map.items() if v == fname) - set(h.keys()))
        if absent:
          raise CheckpointError(f"safetensors checkpoint {path}: {INDEX_FILE} puts tensor {absent[0]!r} in shard "
                                f"{fname!r}, which does not hold it ({len(absent)} such tensors); the index and the "
                                f"shards do not match; {_FIX}")
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
    raise CheckpointError(f"checkpoint {path}: tensors the config does not use: {extra[:8]}")
  return cfg, model
