"""One loader for every model source: ``load(spec) -> Loaded(config, model, tokenizer)``.

``spec`` is one of
  - ``smollm2``: the packaged SmolLM2-135M-Instruct teacher (``interop.smollm2``; a Q4_1 GGUF);
  - a ``.gguf`` file, or a directory holding exactly one;
  - a HF checkpoint directory (``config.json`` + safetensors, Qwen3/Llama);
  - a HydraHead checkpoint directory: Orbax (``save_pretrained``) or the portable safetensors format.
Teachers (HF, GGUF) load as all-FA models, or with ``layout=`` as a converted (uncalibrated) student; HydraHead
checkpoints restore the saved model. Every CLI loads through here; ``progress=True`` shows a bar per tensor.

Errors in the source (missing, truncated, damaged, unsupported, inconsistent) are ``hydrahead_jax.cli.UserError``s
(``CheckpointError`` / ``CheckpointFileMissing``, ``GGUFError``: also ``ValueError`` / ``FileNotFoundError``) with
one-line messages naming the file; the progress bar is erased before they propagate (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NamedTuple

from hydrahead_jax.cli import UserError
from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.interop.format import read_config
from hydrahead_jax.interop.orbax import MANIFEST, ORBAX_FORMAT, load_orbax, read_manifest
from hydrahead_jax.interop.safetensors import (SAFETENSORS_CONFIG, SAFETENSORS_FORMAT, CheckpointError,
                                               CheckpointFileMissing, load_hybrid_safetensors)

SMOLLM2 = "smollm2"
# Config fields a restored HydraHead checkpoint may change on load: numerics and kernels, never parameter shapes.
RESTORE_OVERRIDES = ("remat", "fa_implementation", "fa_packed_implementation", "fa_context_algorithm",
                     "la_implementation", "conv_implementation", "fusion_implementation", "la_chunk_size")


class Loaded(NamedTuple):
  config: ModelConfig
  model: object  # HydraHeadLM
  tokenizer: object | None  # data.tokenizer.Tokenizer, or None when not asked for


def resolve(spec: str) -> tuple[str, str]:
  """(format, path) of a model source: format is 'orbax', 'hydrahead-safetensors', 'hf' or 'gguf'."""
  if spec == SMOLLM2:
    from hydrahead_jax.interop.smollm2 import smollm2_gguf_path

    try:
      return "gguf", smollm2_gguf_path()
    except FileNotFoundError as e:
      raise CheckpointFileMissing(str(e)) from e
  path = os.fspath(spec)
  if os.path.isfile(path):
    if path.endswith(".gguf"):
      return "gguf", path
    raise CheckpointError(f"model {path}: a file but not a .gguf; give a checkpoint directory, a .gguf file or "
                          f"'{SMOLLM2}'")
  if not os.path.isdir(path):
    raise CheckpointFileMissing(f"model {path}: no such file or directory (give a checkpoint directory, a .gguf "
                                f"file or '{SMOLLM2}')")
  if os.path.isfile(os.path.join(path, MANIFEST)):
    return "orbax", path
  if os.path.isfile(os.path.join(path, SAFETENSORS_CONFIG)):
    return "hydrahead-safetensors", path
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf", path
  ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
  if len(ggufs) == 1:
    return "gguf", os.path.join(path, ggufs[0])
  raise CheckpointFileMissing(
      f"model {path}: holds none of {MANIFEST} (Orbax), {SAFETENSORS_CONFIG} (HydraHead safetensors), "
      f"config.json (HF) or a single .gguf file" + (f" (it has {len(ggufs)} .gguf files)" if ggufs else ""))


def detect_format(path: str) -> str:
  """'orbax', 'hydrahead-safetensors', 'hf' or 'gguf' for a path (raises FileNotFoundError / ValueError)."""
  return resolve(path)[0]


@contextlib.contextmanager
def _tokenizer_errors(what: str):
  """A tokenizer file that cannot be read (missing, bad JSON, unsupported) -> a ``UserError`` naming ``what``."""
  try:
    yield
  except UserError:
    raise
  except FileNotFoundError as e:
    raise CheckpointFileMissing(f"{what}: {e}") from e
  except (OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"{what}: cannot be read ({e})") from e
  except Exception as e:  # the tokenizers library raises plain Exceptions for files it cannot parse
    if type(e) is not Exception:
      raise
    raise CheckpointError(f"{what}: cannot be read ({e})") from e


def read_tokenizer(path: str):
  """``data.tokenizer.load_tokenizer(path)`` for a user-given path; an unreadable file is a ``UserError``."""
  from hydrahead_jax.data.tokenizer import load_tokenizer

  with _tokenizer_errors(f"tokenizer {path}"):
    return load_tokenizer(path)


def _source_tokenizer(fmt: str, path: str, gguf_ckpt=None):
  """``_tokenizer``; a source whose tokenizer cannot be built is a ``UserError`` naming it."""
  with _tokenizer_errors(f"model {path}: its tokenizer"):
    return _tokenizer(fmt, path, gguf_ckpt)


def _check_saved_config(fmt: str, path: str) -> None:
  """The config file of a HydraHead checkpoint reads and is valid (else a ``UserError`` naming it)."""
  name, kind = (MANIFEST, ORBAX_FORMAT) if fmt == "orbax" else (SAFETENSORS_CONFIG, SAFETENSORS_FORMAT)
  try:
    read_config(path, name, kind)
  except UserError:
    raise
  except FileNotFoundError as e:
    raise CheckpointFileMissing(f"model {path}: {e}") from e
  except (OSError, ValueError, TypeError, KeyError) as e:
    raise CheckpointError(f"model {path}: {os.path.join(path, name)} is not a valid HydraHead config ({e})") from e
  if fmt == "orbax" and not os.path.isdir(os.path.join(path, "state")):
    raise CheckpointFileMissing(f"model {path}: has {MANIFEST} but no state/ directory (an incomplete copy?)")


def _tokenizer(fmt: str, path: str, gguf_ckpt=None):
  """The tokenizer a source carries: GGUF metadata, a HF directory's tokenizer.json, an Orbax manifest's
  ``metadata.tokenizer``; else the byte-level tokenizer."""
  from hydrahead_jax.data.tokenizer import load_tokenizer

  if fmt == "gguf":
    from hydrahead_jax.data.tokenizer import GGUFTokenizer

    return GGUFTokenizer(gguf_ckpt if gguf_ckpt is not None else path)
  if fmt == "hf" and os.path.isfile(os.path.join(path, "tokenizer.json")):
    return load_tokenizer(path)
  if fmt == "orbax":
    saved = read_manifest(path).get("metadata", {}).get("tokenizer")
    if saved:
      return load_tokenizer(saved)
  return load_tokenizer(None)


def tokenizer_for(spec: str, tokenizer: str | None = None):
  """The tokenizer ``load(spec)`` returns, without loading weights (``tokenizer``: a tokenizer path that wins)."""
  if tokenizer is not None:
    return read_tokenizer(tokenizer)
  return _source_tokenizer(*resolve(spec))


def load(spec: str, *, dtype: str | None = None, compute_dtype: str | None = None, layout: HeadLayout | None = None,
         mesh=None, tokenizer: bool | str = True, progress: bool = False, **config_overrides) -> Loaded:
  """(config, model, tokenizer) from any model source (see the module docstring).

  Args:
    dtype: parameter dtype (default: float32 for teachers, which are cast / dequantised to it; as saved for
      HydraHead checkpoints, which are cast on restore when given).
    compute_dtype: activation dtype (default: a teacher's ``dtype``, a checkpoint's saved one).
    layout: teachers only: convert to this head layout on load (FA groups keep the teacher's weights, LA heads
      start from the q/k/v slices; calibration is ``hydrahead_jax.transfer``'s job).
    mesh: place every parameter directly on its sharding (default: the mesh active through ``jax.set_mesh``).
    tokenizer: True = the source's own tokenizer; False = none (faster); a path = that tokenizer.
    progress: a progress bar (stderr) over the tensors read.
    config_overrides: other ``ModelConfig`` fields; for HydraHead checkpoints only those in
      ``RESTORE_OVERRIDES`` (numerics and kernels, not parameter shapes).
  """
  from tqdm import tqdm

  fmt, path = resolve(spec)
  with tqdm(total=1, unit="tensor", file=sys.stderr, disable=not progress, desc=f"loading {fmt}") as bar, \
       _erased_on_error(bar):
    gguf_ckpt = None
    if fmt in ("orbax", "hydrahead-safetensors"):
      if layout is not None:
        raise CheckpointError(f"model {path}: layout= converts a teacher on load; this is already a HydraHead "
                              "checkpoint (make a student from its teacher, or load it as it is)")
      bad = sorted(set(config_overrides) - set(RESTORE_OVERRIDES))
      if bad:
        raise CheckpointError(f"model {path}: cannot override {bad} when restoring a checkpoint (parameter shapes "
                              f"are fixed); allowed: {list(RESTORE_OVERRIDES)}")
      _check_saved_config(fmt, path)
      restore = load_orbax if fmt == "orbax" else load_hybrid_safetensors
      cfg, model = restore(path, mesh, dtype=dtype, compute_dtype=compute_dtype, progress=bar, **config_overrides)
    elif fmt == "hf":
      from hydrahead_jax.interop.hf import load_pretrained_hf

      cfg, model = load_pretrained_hf(path, dtype=dtype or "float32", compute_dtype=compute_dtype, layout=layout, mesh=mesh,
                                      progress=bar, **config_overrides)
    else:
      from hydrahead_jax.interop.gguf import GGUFCheckpoint, load_gguf

      bar.set_description("reading GGUF metadata")
      gguf_ckpt = GGUFCheckpoint(path)  # parsing the metadata takes seconds: once, shared with the tokenizer
      bar.set_description(f"loading {fmt}")
      cfg, model = load_gguf(gguf_ckpt, dtype=dtype or "float32", compute_dtype=compute_dtype, layout=layout, mesh=mesh,
                             progress=bar, **config_overrides)
  if tokenizer is True:
    tok = _source_tokenizer(fmt, path, gguf_ckpt)
  elif tokenizer:
    tok = read_tokenizer(tokenizer)
  else:
    tok = None
  return Loaded(cfg, model, tok)


@contextlib.contextmanager
def _erased_on_error(bar):
  """On an error, the progress bar is erased when it closes: the error is then the only line (docs/reliability.md)."""
  try:
    yield bar
  except BaseException:
    bar.leave = False
    raise


def load_pretrained(path: str, mesh=None, **kwargs):
  """(config, model) from any model source; ``load`` without the tokenizer (same keyword arguments)."""
  cfg, model, _ = load(path, mesh=mesh, tokenizer=False, **kwargs)
  return cfg, model
