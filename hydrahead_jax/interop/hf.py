"""Hugging Face checkpoints (Qwen3 and Llama family) <-> HydraHead models.

Import reads ``config.json`` and one or several ``*.safetensors`` files (sharded checkpoints through
``model.safetensors.index.json``) lazily, one tensor at a time, and builds the model with
``params.model_from_flat`` straight into the target dtype (and sharding, given a mesh): no random init and
no second full copy. Export writes an all-FA model back as HF safetensors + ``config.json``.

Name mapping (HF [out, in] matrices -> canonical names, ``hydrahead_jax.interop.names``):

  model.embed_tokens.weight [V, D]                   -> embed.embedding [V, D]
  model.norm.weight [D]                              -> final_norm.scale
  lm_head.weight [V, D] (untied only)                -> lm_head [D, V]
  model.layers.{i}.input_layernorm.weight            -> layers.{i}.attn_norm.scale
  model.layers.{i}.post_attention_layernorm.weight   -> layers.{i}.mlp_norm.scale
  model.layers.{i}.self_attn.q_proj.weight [H*K, D]  -> layers.{i}.mixer.fa.wq [D, H, K]
  model.layers.{i}.self_attn.{k,v}_proj [G*K, D]     -> layers.{i}.mixer.fa.{wk,wv} [D, G, K]
  model.layers.{i}.self_attn.o_proj.weight [D, H*K]  -> layers.{i}.mixer.wo [H, K, D]
  model.layers.{i}.self_attn.{q,k}_norm.weight [K]   -> layers.{i}.mixer.fa.{q,k}_norm.scale (Qwen3 only)
  model.layers.{i}.mlp.{gate,up}_proj.weight [F, D]  -> layers.{i}.mlp.{w_gate,w_up} [D, F]
  model.layers.{i}.mlp.down_proj.weight [D, F]       -> layers.{i}.mlp.w_down [F, D]

The FA fusion scales (``mixer.fusion.fa_scale``, ones for a teacher) have no HF counterpart; export folds
them into W_o.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from hydrahead_jax.cli import UserError
from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.interop.safetensors import (CheckpointError, CheckpointFileMissing, SafetensorsCheckpoint,
                                               save_safetensors_sharded, to_np_dtype)
from hydrahead_jax.sharding import concrete_mesh

SUPPORTED_MODEL_TYPES = ("qwen3", "llama")
CONFIG_FILE = "config.json"
# Tensors some checkpoints carry that the model does not need.
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq|.*\.rotary_emb\..*)$")

Getter = Callable[[str], np.ndarray]


class ExportError(UserError, ValueError):
  """A model that the HF format cannot express (LA heads, ``rmsnorm_all`` fusion)."""


# -- config ---------------------------------------------------------------------------------------


def read_hf_config(path: str) -> dict[str, Any]:
  """The ``config.json`` of a checkpoint directory (or the file itself)."""
  file = os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise CheckpointFileMissing(f"HF checkpoint: no {CONFIG_FILE} at {file}")
  try:
    with open(file) as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise CheckpointError(f"HF checkpoint: {file} is not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"HF checkpoint: {file} holds a JSON {type(data).__name__}, not an object")
  return data


def _rope(hf: Mapping[str, Any]) -> float:
  """RoPE base from either config style; anything but plain RoPE is an error."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for where, d in (("rope_parameters", params), ("rope_scaling", scaling)):
    kind = d.get("rope_type", d.get("type", "default"))
    if kind not in ("default", None):
      raise CheckpointError(f"config.json: {where}.rope_type={kind!r} is not supported (only plain RoPE, "
                            "'default')")
  theta = params.get("rope_theta", hf.get("rope_theta"))
  if theta is None:
    raise CheckpointError("config.json: no RoPE base (neither 'rope_theta' nor 'rope_parameters.rope_theta')")
  return float(theta)


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32", compute_dtype: str | None = None,
                   **overrides) -> ModelConfig:
  """``config.json`` contents (model_type qwen3 or llama) -> an all-FA ``ModelConfig``.

  ``dtype`` is the parameter dtype, ``compute_dtype`` the activation dtype (default: ``dtype``);
  ``overrides`` are other ``ModelConfig`` fields (e.g. ``scan_layers``, ``remat``).
  """
  mt = hf.get("model_type")
  if mt not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f"config.json: unsupported model_type {mt!r}; supported: {list(SUPPORTED_MODEL_TYPES)}")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise CheckpointError(f"config.json: {key}=true is not supported (the model has no projection biases)")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with 'silu' "
                          "only)")
  if hf.get("use_sliding_window"):
    raise CheckpointError("config.json: use_sliding_window=true is not supported (full causal attention only)")
  try:
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=d,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or d // heads),
        mlp_dim=int(hf["intermediate_size"]),
    )
  except KeyError as e:
    raise CheckpointError(f"config.json: missing field {e.args[0]!r}") from None
  except (TypeError, ValueError, ZeroDivisionError) as e:
    raise CheckpointError(f"config.json: a size field is not a positive integer ({e})") from None
  fields.update(
      rope_theta=_rope(hf),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qk_norm=mt == "qwen3",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position=int(hf.get("max_position_embeddings", 32768)),
      layout=None,
      dtype=compute_dtype or dtype,
      param_dtype=dtype,
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """An all-FA config as a transformers ``config.json`` (qwen3 with QK-norm, else llama)."""
  mt = "qwen3" if cfg.qk_norm else "llama"
  out = {
      "architectures": ["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"],
      "model_type": mt,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_eps,
      "rope_theta": cfg.rope_theta,  # hub style (transformers 4.x) ...
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # ... and transformers 5
      "rope_scaling": None,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_position,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "dtype": torch_dtype,
      "torch_dtype": torch_dtype,
  }
  if mt == "llama":
    out["mlp_bias"] = False
  else:
    out["use_sliding_window"] = False
  return out


# -- name mapping ---------------------------------------------------------------------------------


def _mat_t(shape_out):
  """[out, in] -> in x shape_out (e.g. q_proj [H*K, D] -> [D, H, K])."""
  return lambda w: w.T.reshape(w.shape[1], *shape_out)


def hf_name_map(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]]:
  """Canonical teacher name -> (HF name, expected HF shape, HF -> canonical transform)."""
  D, H, G, K, F, V = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  ident = lambda w: w
  out = {
      "embed.embedding": ("model.embed_tokens.weight", (V, D), ident),
      "final_norm.scale": ("model.norm.weight", (D,), ident),
  }
  if not cfg.tie_embeddings:
    out["lm_head"] = ("lm_head.weight", (V, D), lambda w: w.T)
  for i in range(cfg.num_layers):
    p, c = f"model.layers.{i}.", f"layers.{i}."
    out.update({
        c + "attn_norm.scale": (p + "input_layernorm.weight", (D,), ident),
        c + "mlp_norm.scale": (p + "post_attention_layernorm.weight", (D,), ident),
        c + "mixer.fa.wq": (p + "self_attn.q_proj.weight", (H * K, D), _mat_t((H, K))),
        c + "mixer.fa.wk": (p + "self_attn.k_proj.weight", (G * K, D), _mat_t((G, K))),
        c + "mixer.fa.wv": (p + "self_attn.v_proj.weight", (G * K, D), _mat_t((G, K))),
        c + "mixer.wo": (p + "self_attn.o_proj.weight", (D, H * K), lambda w: w.T.reshape(H, K, D)),
        c + "mlp.w_gate": (p + "mlp.gate_proj.weight", (F, D), lambda w: w.T),
        c + "mlp.w_up": (p + "mlp.up_proj.weight", (F, D), lambda w: w.T),
        c + "mlp.w_down": (p + "mlp.down_proj.weight", (D, F), lambda w: w.T),
    })
    if cfg.qk_norm:
      out[c + "mixer.fa.q_norm.scale"] = (p + "self_attn.q_norm.weight", (K,), ident)
      out[c + "mixer.fa.k_norm.scale"] = (p + "self_attn.k_norm.weight", (K,), ident)
  return out


def _synthetic(cfg: ModelConfig, name: str) -> np.ndarray | None:
  """Teacher tensors that HF checkpoints do not carry (FA fusion scales start at 1)."""
  if name.endswith("mixer.fusion.fa_scale"):
    return np.ones((cfg.num_heads,), np.float32)
  if name.endswith("mixer.fusion.fa_norm_scale"):
    return np.ones((cfg.num_heads, cfg.head_dim), np.float32)
  return None


def teacher_getter(cfg: ModelConfig, get_hf: Getter, source: str = "checkpoint") -> Getter:
  """Canonical teacher name -> tensor, read lazily through ``get_hf`` (HF names), shapes checked."""
  table = hf_name_map(cfg)

  def get(name: str) -> np.ndarray:
    if name not in table:
      syn = _synthetic(cfg, name)
      if syn is None:
        raise KeyError(name)
      return syn
    hf_name, shape, fn = table[name]
    try:
      arr = get_hf(hf_name)
    except KeyError:
      raise CheckpointError(f"{source}: missing tensor {hf_name!r} (expected shape {shape})") from None
    if tuple(arr.shape) != shape:
      raise CheckpointError(f"{source}: tensor {hf_name!r} has shape {tuple(arr.shape)}, but the config implies "
                            f"{shape}")
    return fn(arr)

  return get


def check_extra_tensors(cfg: ModelConfig, names: Iterable[str], source: str) -> None:
  """Tensors in a checkpoint that the config does not explain are an error (config/weights mismatch)."""
  expected = {v[0] for v in hf_name_map(cfg).values()}
  if cfg.tie_embeddings:
    expected.add("lm_head.weight")  # some exporters write the tied head too; it is ignored
  extra = sorted(n for n in names if n not in expected and not _IGNORED.match(n))
  if extra:
    more = " ..." if len(extra) > 8 else ""
    raise CheckpointError(f"{source}: tensors the config does not explain: {extra[:8]}{more} "
                          f"(model_type {'qwen3' if cfg.qk_norm else 'llama'}, {cfg.num_layers} layers)")


class _LayerConverter:
  """Student tensors of a head layout, converted from the teacher one layer at a time.

  Non-mixer tensors pass through; a layer's mixer is converted (``conversion.convert_layer``) from the
  teacher's q/k/v/o slices when first asked for, and kept until another layer is asked for.
  """

  def __init__(self, student: ModelConfig, teacher_get: Getter):
    self.cfg, self.get, self.cached = student, teacher_get, (None, None)

  def __call__(self, name: str) -> np.ndarray:
    from hydrahead_jax.transfer.surgery import convert_layer

    m = re.match(r"layers\.(\d+)\.(mixer\..*)$", name)
    if not m:
      return self.get(name)
    layer, rest = int(m.group(1)), m.group(2)
    if self.cached[0] != layer:
      keys = ["mixer.fa.wq", "mixer.fa.wk", "mixer.fa.wv", "mixer.wo", "mixer.fusion.fa_scale"]
      if self.cfg.qk_norm:
        keys += ["mixer.fa.q_norm.scale", "mixer.fa.k_norm.scale"]
      teacher = {k: self.get(f"layers.{layer}.{k}") for k in keys}
      self.cached = (layer, convert_layer(teacher, self.cfg, layer))
    return self.cached[1][rest]


def model_from_hf_tensors(cfg: ModelConfig, get_hf: Getter, *, layout: HeadLayout | None = None, mesh=None,
                          source: str = "checkpoint", progress=None, **student_overrides):
  """Builds (config, model) from HF-named tensors: the teacher, or with ``layout`` a converted student."""
  from hydrahead_jax.interop.names import model_from_flat

  mesh = concrete_mesh(mesh)
  teacher_get = teacher_getter(cfg, get_hf, source)
  if layout is None:
    if student_overrides:
      cfg = cfg.replace(**student_overrides)
    return cfg, model_from_flat(cfg, teacher_get, mesh=mesh, progress=progress)
  from hydrahead_jax.transfer.surgery import student_config

  student = student_config(cfg, layout, **student_overrides)
  return student, model_from_flat(student, _LayerConverter(student, teacher_get), mesh=mesh, progress=progress)


def load_pretrained_hf(path: str, *, dtype: str = "float32", compute_dtype: str | None = None,
                       layout: HeadLayout | None = None, mesh=None, progress=None, **config_overrides):
  """A HF checkpoint directory -> (config, model), dispatching on ``config.json``'s ``model_type``.

  Args:
    path: directory with config.json and model.safetensors (or shards + model.safetensors.index.json).
    dtype: parameter dtype the weights are cast to while loading (bf16 and f32 files both work).
    compute_dtype: activation dtype (default ``dtype``).
    layout: None = the teacher (all FA); a ``HeadLayout`` = a converted student (FA groups keep the
      teacher's weights, LA heads start from their q/k/v slices; see ``hydrahead_jax.transfer.surgery``).
    mesh: place every parameter directly with its sharding on this mesh (default: the mesh made active
      with ``jax.set_mesh``, if any).
    progress: a tqdm-like bar advanced per tensor.
    config_overrides: other ``ModelConfig`` fields (``scan_layers``, ``remat``, ``fusion``, ...).
  """
  if not os.path.isdir(path):
    raise CheckpointFileMissing(f"HF checkpoint: no such directory: {path}")
  hf = read_hf_config(path)
  cfg = config_from_hf(hf, dtype=dtype, compute_dtype=compute_dtype)
  ckpt = SafetensorsCheckpoint(path)
  check_extra_tensors(cfg, ckpt.keys(), source=path)
  return model_from_hf_tensors(cfg, ckpt.get, layout=layout, mesh=mesh, source=path, progress=progress,
                               **config_overrides)


def _load_typed(model_type: str):
  def load(path: str, *, dtype: str = "float32", compute_dtype: str | None = None,
           layout: HeadLayout | None = None, mesh=None, **config_overrides):
    mt = read_hf_config(path).get("model_type")
    if mt != model_type:
      raise CheckpointError(f"{path}: config.json has model_type {mt!r}, not {model_type!r} "
                            "(use load_pretrained_hf)")
    return load_pretrained_hf(path, dtype=dtype, compute_dtype=compute_dtype, layout=layout, mesh=mesh,
                              **config_overrides)

  load.__name__ = f"load_{model_type}"
  load.__doc__ = f"``load_pretrained_hf`` for a checkpoint whose model_type is {model_type!r}."
  return load


load_qwen3 = _load_typed("qwen3")
load_llama = _load_typed("llama")


# -- export ------------------------------------------------------------------------------------------


def flat_to_hf(flat: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Canonical tensors of an all-FA model -> HF names and layouts (FA fusion scales folded into o_proj)."""
  for i in range(cfg.num_layers):
    if cfg.layout.fa_groups[i] != tuple(range(cfg.num_kv_heads)):
      raise ExportError(f"HF export: layer {i} has LA heads (layout {cfg.layout.describe(cfg.num_kv_heads)}); "
                        "only all-FA models export to HF. Export hybrids with interop.safetensors.save_hybrid_safetensors "
                        "(CLI: --to safetensors)")
  if cfg.fusion == "rmsnorm_all":
    raise ExportError("HF export: fusion='rmsnorm_all' normalises FA heads, which HF Qwen3/Llama cannot express")
  D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
  out = {}
  for name, (hf_name, shape, _) in hf_name_map(cfg).items():
    w = np.asarray(flat[name])
    if name.endswith("mixer.wo"):
      scale = flat.get(name.replace("mixer.wo", "mixer.fusion.fa_scale"))
      if scale is not None:
        w = w * np.asarray(scale, np.float32).astype(w.dtype)[:, None, None]
      w = w.reshape(H * K, D).T
    elif w.ndim == 3:  # wq/wk/wv [D, n, K] -> [n*K, D]
      w = w.reshape(D, -1).T
    elif w.ndim == 2 and hf_name != "model.embed_tokens.weight":  # mlp, lm_head
      w = w.T
    out[hf_name] = np.ascontiguousarray(w.reshape(shape))
  return out


def save_hf(model, path: str, *, dtype: str | None = None, max_shard_bytes: int = 2 << 30,
            progress: Callable[[int], None] | None = None) -> None:
  """Exports an all-FA model as a transformers checkpoint (config.json + safetensors) in ``dtype``
  (default: the parameter dtype)."""
  from hydrahead_jax.interop.names import model_to_flat

  cfg = model.cfg
  dtype = dtype or cfg.param_dtype
  np_dtype = to_np_dtype(dtype)
  tensors = {k: v.astype(np_dtype) for k, v in flat_to_hf(model_to_flat(model), cfg).items()}
  save_safetensors_sharded(tensors, path, max_shard_bytes=max_shard_bytes, progress=progress)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config_to_hf(cfg, torch_dtype=str(np.dtype(np_dtype).name)), f, indent=2)
