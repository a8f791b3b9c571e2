"""What every HydraHead checkpoint directory shares: a JSON file naming the format, its version and the model config.

Formats (docs/checkpoint_format.md): Orbax (``interop.orbax``, ``hydrahead_manifest.json`` + ``state/``) and the
portable safetensors format (``interop.safetensors``, ``hydrahead_config.json`` + ``model*.safetensors``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

from hydrahead_jax.config import ModelConfig

FORMAT_VERSION = 1


def write_json(path: str, data: Any, default: Callable[[Any], Any] | None = None) -> None:
  """Writes ``data`` as JSON atomically (a temporary file renamed over ``path``: never half-written); ``default``
  converts what json cannot (``json.dump``'s hook)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=default)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str, error: type[Exception] | None = None, what: str = "file") -> Any:
  """The JSON value in ``path``; with ``error``, an unreadable or malformed file raises ``error`` with one line."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    if error is None:
      raise
    raise error(f"{what} {path}: cannot read ({e})") from None


def prepare_dir(path: str, overwrite: bool) -> str:
  path = os.path.abspath(path)
  if os.path.exists(path) and os.listdir(path):
    if not overwrite:
      raise FileExistsError(f"checkpoint: {path} exists and is not empty (pass overwrite=True)")
    shutil.rmtree(path)
  os.makedirs(path, exist_ok=True)
  return path


def check_format(data: dict[str, Any], fmt: str, file: str) -> ModelConfig:
  if data.get("format") != fmt:
    raise ValueError(f"{file}: format {data.get('format')!r}, expected {fmt!r}")
  if int(data.get("version", 0)) > FORMAT_VERSION:
    raise ValueError(f"{file}: format version {data['version']} is newer than this library's ({FORMAT_VERSION})")
  if "config" not in data:
    raise ValueError(f"{file}: missing 'config'")
  return ModelConfig.from_dict(data["config"])


def read_config(path: str, name: str, fmt: str, dtype: str | None = None, compute_dtype: str | None = None,
                **overrides) -> ModelConfig:
  """The model config stored as ``name`` in a checkpoint directory, format-checked; optionally another parameter
  dtype, compute dtype and other fields."""
  file = os.path.join(path, name)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"checkpoint: no {name} in {path}")
  cfg = check_format(read_json(file), fmt, file)
  if dtype is not None:
    overrides["param_dtype"] = dtype
  if compute_dtype is not None:
    overrides["dtype"] = compute_dtype
  return cfg.replace(**overrides) if overrides else cfg
