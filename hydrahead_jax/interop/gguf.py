"""GGUF files (llama.cpp) -> HydraHead models and tokenizers, through the ``gguf`` package.

Architecture, hyper-parameters and tokenizer come from the file's metadata. Each tensor is dequantised on
its own (``gguf.quants.dequantize``, float32) and cast to the target dtype while the model is built, so
peak host memory stays near one tensor above the final model. llama.cpp's converter interleaves the rows of
each Q and K head for its RoPE kernel (``permute`` in convert_hf_to_gguf.py: rows ``[2, K/2]`` -> ``[K/2, 2]``);
``unpermute_rope_rows`` undoes it so the weights are exactly the HF layout (rotate-half RoPE).

Supported architectures: ``llama`` (Llama family, e.g. SmolLM2; no QK-norm, Q/K permuted) and ``qwen3``
(QK-norm, not permuted). Tokenizers: ``tokenizer.ggml.model == 'gpt2'`` (byte-level BPE with merges).

Integrity (docs/reliability.md): before any tensor is read, the header must lie inside the file and every
tensor's byte range (offset + size from its type and shape) must end inside the file; a truncated or damaged
file, an unsupported quantisation type or architecture is a ``GGUFError`` (a ``UserError`` and ``ValueError``)
naming the file, the tensor and the bytes expected and present.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import numpy as np

from hydrahead_jax.cli import UserError
from hydrahead_jax.config import HeadLayout, ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen3")

# HF tensor name pieces <-> GGUF names (per layer: "blk.{i}.")
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_FIX = "re-download or re-export it"


class GGUFError(UserError, ValueError):
  """A GGUF file that cannot be used as it is (truncated, damaged, unsupported); one line naming the file."""


class GGUFMissingError(UserError, FileNotFoundError):
  """No file at the given GGUF path."""
_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}


def hf_to_gguf_name(name: str) -> str:
  if name in _GLOBAL:
    return _GLOBAL[name]
  parts = name.split(".", 3)  # model, layers, i, rest
  if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
    return f"blk.{parts[2]}.{_LAYER[parts[3]]}"
  raise KeyError(name)


def gguf_to_hf_name(name: str) -> str | None:
  if name in _GLOBAL_INV:
    return _GLOBAL_INV[name]
  parts = name.split(".", 2)  # blk, i, rest
  if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_INV:
    return f"model.layers.{parts[1]}.{_LAYER_INV[parts[2]]}"
  return None


def unpermute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row interleave: per head, rows [K/2, 2] -> [2, K/2] (HF rotate-half order)."""
  out, inp = w_OxI.shape
  k = out // n_heads
  return w_OxI.reshape(n_heads, k // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def permute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's interleave (the inverse of ``unpermute_rope_rows``), for writing GGUF files in tests."""
  out, inp = w_OxI.shape
  k = out // n_heads
  return w_OxI.reshape(n_heads, 2, k // 2, inp).swapaxes(1, 2).reshape(out, inp)


# -- reading ---------------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Header:
  """GGUF v2/v3 header: metadata and tensor table, parsed in one pass over the file's first bytes.

  (``gguf.GGUFReader`` builds a memmap view per metadata item, which takes seconds for a 49K-token
  vocabulary; the format is simple enough to read directly. Tensor data is memory-mapped, not read.)
  """

  def __init__(self, path: str):
    import struct

    self.path = path
    with open(path, "rb") as f:
      self.file_size = os.fstat(f.fileno()).st_size
      buf = f.read(1 << 20)
      self._f, self._buf, self._pos, self._unpack = f, buf, 0, struct.unpack_from
      self._what = "the magic number"
      if self._raw(4) != b"GGUF":
        raise ValueError(f"not a GGUF file (its first bytes are {self._buf[:4]!r}, not b'GGUF')")
      version = self._scalar(4)
      if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are; big-endian files are not)")
      n_tensors, n_kv = self._scalar(10), self._scalar(10)
      self.fields: dict[str, Any] = {}
      for i in range(n_kv):
        self._what = f"metadata item {i + 1} of {n_kv}"
        key = self._string()
        self._what = f"metadata item {key!r} ({i + 1} of {n_kv})"
        self.fields[key] = self._value(self._scalar(4))
      self.tensor_info = []  # (name, dims in GGUF order, type id, offset)
      for i in range(n_tensors):
        self._what = f"the entry of tensor {i + 1} of {n_tensors} in the tensor table"
        name = self._string()
        self._what = f"the tensor table entry of {name!r} ({i + 1} of {n_tensors})"
        dims = [self._scalar(10) for _ in range(self._scalar(4))]
        self.tensor_info.append((name, dims, self._scalar(4), self._scalar(10)))
      align = int(self.fields.get("general.alignment", 32))
      self.data_start = -(-self._pos // align) * align

  def _ensure(self, n: int) -> None:
    if self._pos + n > len(self._buf):
      if self._pos + n > self.file_size:  # checked before reading: a damaged length field can be huge
        raise ValueError(f"truncated or damaged header: {self._what} needs bytes up to {self._pos + n:,}, but the "
                         f"file has {self.file_size:,} bytes; {_FIX}")
      self._f.seek(len(self._buf))
      more = self._f.read(max(n, 1 << 22))
      if self._pos + n > len(self._buf) + len(more):
        raise ValueError(f"truncated header: {self._what} needs bytes up to {self._pos + n:,}, but only "
                         f"{len(self._buf) + len(more):,} could be read; {_FIX}")
      self._buf += more

  def _raw(self, n: int) -> bytes:
    self._ensure(n)
    out = self._buf[self._pos: self._pos + n]
    self._pos += n
    return out

  def _scalar(self, t: int):
    if t not in _SCALARS:
      raise ValueError(f"damaged header: {self._what} has unknown value type {t}; {_FIX}")
    fmt = _SCALARS[t]
    n = 1 if t in (0, 1, 7) else (2 if t in (2, 3) else (4 if t in (4, 5, 6) else 8))
    self._ensure(n)
    v = self._unpack(fmt, self._buf, self._pos)[0]
    self._pos += n
    return v

  def _string(self) -> str:
    return self._raw(self._scalar(10)).decode("utf-8", errors="replace")

  def _value(self, t: int):
    if t == _STRING:
      return self._string()
    if t == _ARRAY:
      et, count = self._scalar(4), self._scalar(10)
      if et == _STRING:
        return [self._string() for _ in range(count)]
      if et in _SCALARS:
        dt = np.dtype(_SCALARS[et])
        return np.frombuffer(self._raw(count * dt.itemsize), dt).tolist()
      return [self._value(et) for _ in range(count)]
    if t not in _SCALARS:
      raise ValueError(f"damaged header: {self._what} has unknown value type {t}; {_FIX}")
    return self._scalar(t)


class _Tensor(NamedTuple):
  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # numpy order ([out, in] for matrices)
  data: np.ndarray  # raw: uint8 [rows, bytes per row] for block types, typed otherwise


def _supported_qtypes() -> set:
  import gguf

  traits = getattr(gguf.quants, "_type_traits", {})
  return {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *traits}


class GGUFCheckpoint:
  """Metadata + lazy, dequantising tensor access by HF name (``get``)."""

  def __init__(self, path: str):
    import gguf

    if not os.path.isfile(path):
      raise GGUFMissingError(f"GGUF: no such file: {path}")
    self.path = path
    try:
      header = _Header(path)
    except (ValueError, KeyError, UnicodeDecodeError) as e:
      raise GGUFError(f"GGUF file {path}: {e}") from e
    self.fields = header.fields
    self.arch = self.meta("general.architecture")
    if self.arch not in SUPPORTED_ARCHITECTURES:
      raise GGUFError(f"GGUF {path}: unsupported architecture {self.arch!r}; supported: {list(SUPPORTED_ARCHITECTURES)}")
    self.tensors: dict[str, _Tensor] = {}
    bad: dict[str, list[str]] = {}
    ok = _supported_qtypes()
    extents = []  # (start, end, name, type, shape) in file bytes
    for name, dims, type_id, offset in header.tensor_info:
      try:
        qtype = gguf.GGMLQuantizationType(type_id)
      except ValueError:
        bad.setdefault(f"type id {type_id}", []).append(name)
        continue
      if qtype not in ok:
        bad.setdefault(qtype.name, []).append(name)
        continue
      block, type_size = gguf.GGML_QUANT_SIZES[qtype]
      shape = tuple(int(d) for d in reversed(dims))
      if not shape or shape[-1] % block:
        raise GGUFError(f"GGUF file {path}: tensor {name!r} has shape {list(shape)}, whose rows are not whole "
                        f"{qtype.name} blocks of {block} values (a damaged tensor table?); {_FIX}")
      nbytes = math.prod(shape) // block * type_size  # Python ints: a damaged table cannot overflow
      start = header.data_start + int(offset)
      extents.append((start, start + nbytes, name, qtype, shape))
    if bad:
      per_type = "; ".join(f"{t}: tensors {names[:4]}" + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                           for t, names in sorted(bad.items()))
      raise GGUFError(f"GGUF {path}: unsupported quantisation type(s) {sorted(bad)} ({per_type}); "
                      f"supported: {sorted(q.name for q in ok)}")
    self._check_extents(extents, header.file_size, len(header.tensor_info))
    mm = np.memmap(path, np.uint8, mode="r") if header.file_size else np.zeros(0, np.uint8)
    for start, end, name, qtype, shape in extents:
      raw = mm[start:end]
      if qtype == gguf.GGMLQuantizationType.F32:
        raw = raw.view(np.float32)
      elif qtype == gguf.GGMLQuantizationType.F16:
        raw = raw.view(np.float16)
      else:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
      self.tensors[name] = _Tensor(name, qtype, shape, raw)
    if "rope_freqs.weight" in self.tensors:
      raise GGUFError(f"GGUF {path}: has 'rope_freqs.weight' (scaled RoPE, e.g. Llama 3.1); only plain RoPE is supported")

  def _check_extents(self, extents, file_size: int, num_tensors: int) -> None:
    """Every tensor's bytes lie inside the file (checked before any is read: a truncated file)."""
    past = sorted((e for e in extents if e[1] > file_size), key=lambda e: e[0])
    if not past:
      return
    start, end, name, qtype, shape = past[0]
    need = max(e[1] for e in extents)
    raise GGUFError(
        f"GGUF file {self.path} is truncated: tensor {name!r} ({qtype.name} {list(shape)}, {end - start:,} bytes) "
        f"needs bytes {start:,} to {end:,}, but the file has only {file_size:,} bytes ({len(past)} of {num_tensors} "
        f"tensors lie past its end; the complete file has at least {need:,} bytes); {_FIX}")

  def meta(self, key: str, default: Any = KeyError) -> Any:
    if key not in self.fields:
      if default is KeyError:
        raise GGUFError(f"GGUF {self.path}: missing metadata key {key!r}")
      return default
    return self.fields[key]

  def arch_meta(self, key: str, default: Any = KeyError) -> Any:
    return self.meta(f"{self.arch}.{key}", default)

  def config(self, *, dtype: str = "float32", compute_dtype: str | None = None, **overrides) -> ModelConfig:
    d = int(self.arch_meta("embedding_length"))
    heads = self.arch_meta("attention.head_count")
    kv = self.arch_meta("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv, list):
      raise GGUFError(f"GGUF {self.path}: per-layer head counts are not supported")
    heads, kv = int(heads), int(kv)
    head_dim = int(self.arch_meta("attention.key_length", d // heads))
    rope_dim = int(self.arch_meta("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
      raise GGUFError(f"GGUF {self.path}: partial RoPE (rope.dimension_count={rope_dim} != head_dim={head_dim})")
    scaling = self.arch_meta("rope.scaling.type", "none")
    if scaling not in ("none", None):
      raise GGUFError(f"GGUF {self.path}: rope.scaling.type={scaling!r} is not supported (plain RoPE only)")
    vocab = self.arch_meta("vocab_size", None)
    if vocab is None:
      vocab = len(self.meta("tokenizer.ggml.tokens"))
    fields = dict(
        vocab_size=int(vocab), d_model=d, num_layers=int(self.arch_meta("block_count")),
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        mlp_dim=int(self.arch_meta("feed_forward_length")),
        rope_theta=float(self.arch_meta("rope.freq_base", 10000.0)),
        rms_eps=float(self.arch_meta("attention.layer_norm_rms_epsilon", 1e-6)),
        qk_norm=self.arch == "qwen3",
        tie_embeddings="output.weight" not in self.tensors,
        max_position=int(self.arch_meta("context_length", 8192)),
        layout=None, dtype=compute_dtype or dtype, param_dtype=dtype,
    )
    fields.update(overrides)
    return ModelConfig(**fields)

  def hf_names(self) -> list[str]:
    out = []
    for name in self.tensors:
      hf = gguf_to_hf_name(name)
      out.append(hf if hf is not None else f"<gguf>{name}")
    return out

  def get(self, hf_name: str) -> np.ndarray:
    """Dequantised float32 tensor in HF layout ([out, in])."""
    import gguf

    t = self.tensors.get(hf_to_gguf_name(hf_name))
    if t is None:
      raise KeyError(hf_name)
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise GGUFError(f"GGUF {self.path}: tensor {t.name!r}: unsupported quantisation {t.tensor_type.name}") from e
    w = np.asarray(w, np.float32).reshape(t.shape)
    if self.arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
      key = "attention.head_count" if t.name.endswith("attn_q.weight") else "attention.head_count_kv"
      w = unpermute_rope_rows(w, int(self.arch_meta(key, self.arch_meta("attention.head_count"))))
    return w

  __call__ = get


def load_gguf(path: "str | GGUFCheckpoint", *, dtype: str = "float32", compute_dtype: str | None = None,
              layout: HeadLayout | None = None, mesh=None, progress=None, **config_overrides):
  """A GGUF file -> (config, model), dequantised to ``dtype`` (see ``hf.load_pretrained_hf`` for the rest)."""
  from hydrahead_jax.interop.hf import check_extra_tensors, model_from_hf_tensors

  ckpt = path if isinstance(path, GGUFCheckpoint) else GGUFCheckpoint(path)
  cfg = ckpt.config(dtype=dtype, compute_dtype=compute_dtype)
  check_extra_tensors(cfg, ckpt.hf_names(), source=ckpt.path)
  return model_from_hf_tensors(cfg, ckpt.get, layout=layout, mesh=mesh, source=ckpt.path, progress=progress,
                               **config_overrides)
