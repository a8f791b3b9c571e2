"""Teacher (all-FA) -> HydraHead student weights with parameter reuse.

Works on canonical flat names (``hydrahead_jax.interop.names``). For each layer with FA groups ``F`` (sorted) and
LA groups ``R`` (the rest, in order), the student's head order is ``heads(F) + heads(R)``:
- FA groups keep the teacher's q/k/v, QK-norm and the matching W_o rows exactly;
- each LA head takes the teacher's q slice of its own query head and a private copy of its group's k/v
  slices (with ``la_sharing`` 'kv' / 'kv_gates' the group's LA heads share one exact copy, as in the teacher);
  the short conv starts as the exact identity (last tap 1), the decay gate starts input-independent with long memory, the write gate at beta = 0.5, the output gate constant (W_z = 0, SiLU(z_bias));
- W_o rows are permuted to the new head order, so the all-FA layout reproduces the teacher exactly.
Fusion scales start at 1 (FA) / 1 (LA); ``calibrate`` (selection module) sets the LA scales from data.
"""

from __future__ import annotations

import numpy as np

from hydrahead_jax.config import HeadLayout, ModelConfig

# Initial LA gate values for converted heads (documented choices).
CONVERTED_DECAY = 0.002  # -g per token at init: memory ~500 tokens, learned from there
CONVERTED_Z_BIAS = 4.0  # SiLU(4) = 3.93: an almost constant, positive output gate


def head_order(layout: HeadLayout, layer: int, num_groups: int, heads_per_group: int) -> tuple[np.ndarray, np.ndarray]:
  """Teacher query-head indices of the student's FA heads and LA heads of one layer."""
  fa = list(layout.fa_groups[layer])
  la = [g for g in range(num_groups) if g not in fa]
  heads = lambda groups: np.array([g * heads_per_group + j for g in groups for j in range(heads_per_group)], int)
  return heads(fa), heads(la)


def student_config(teacher: ModelConfig, layout: HeadLayout, **overrides) -> ModelConfig:
  """The teacher's architecture with a head layout (and any overrides such as fusion variant)."""
  if any(teacher.num_fa_groups(i) != teacher.num_kv_heads for i in range(teacher.num_layers)):
    raise ValueError("teacher config: conversion needs an all-FA teacher (layout=None)")
  return teacher.replace(layout=layout, **overrides)


def _la_init(cfg: ModelConfig, n: int) -> dict[str, np.ndarray]:
  """Fresh LA parameters of ``n`` converted heads (k/v convs and gates per group when ``cfg.la_sharing`` says so)."""
  K, D, W, r = cfg.head_dim, cfg.d_model, cfg.la_conv_size, cfg.heads_per_group
  n_kv = n if cfg.la_sharing == "none" else n // r
  n_gate = n // r if cfg.la_sharing == "kv_gates" else n
  identity = lambda heads: np.concatenate([np.zeros((W - 1, heads, K), np.float32),  # noqa: E731
                                           np.ones((1, heads, K), np.float32)])
  dt = CONVERTED_DECAY  # a_log = 0 -> A = 1; softplus(dt_bias) = dt
  out = {
      "conv_q": identity(n), "conv_k": identity(n_kv), "conv_v": identity(n_kv),
      "a_log": np.zeros((n_gate,), np.float32),
      "dt_bias": np.full((n_gate,), dt + np.log(-np.expm1(-dt)), np.float32),
      "w_a": np.zeros((D, n_gate), np.float32),
      "w_b": np.zeros((D, n_gate), np.float32),
  }
  if cfg.la_output_gate:
    out["w_z"] = np.zeros((D, n, K), np.float32)
    out["z_bias"] = np.full((n, K), CONVERTED_Z_BIAS, np.float32)
  return out


def convert_layer(teacher_layer: dict[str, np.ndarray], cfg: ModelConfig, layer: int) -> dict[str, np.ndarray]:
  """One layer's teacher tensors (names relative to ``layers.{i}.``) -> the student's."""
  r, G = cfg.heads_per_group, cfg.num_kv_heads
  fa_heads, la_heads = head_order(cfg.layout, layer, G, r)
  t = teacher_layer
  out = {k: v for k, v in t.items() if not k.startswith("mixer.")}
  wq, wk, wv, wo = t["mixer.fa.wq"], t["mixer.fa.wk"], t["mixer.fa.wv"], t["mixer.wo"]
  fa_groups = list(cfg.layout.fa_groups[layer])
  if len(fa_heads):
    out["mixer.fa.wq"] = wq[:, fa_heads]
    out["mixer.fa.wk"] = wk[:, fa_groups]
    out["mixer.fa.wv"] = wv[:, fa_groups]
    for n in ("mixer.fa.q_norm.scale", "mixer.fa.k_norm.scale"):
      if n in t:
        out[n] = t[n]
    if cfg.fusion == "scale_norm":
      out["mixer.fusion.fa_scale"] = t.get("mixer.fusion.fa_scale", np.ones(cfg.num_heads, np.float32))[fa_heads]
    elif cfg.fusion == "rmsnorm_all":
      out["mixer.fusion.fa_norm_scale"] = np.ones((len(fa_heads), cfg.head_dim), np.float32)
  if len(la_heads):
    groups = la_heads // r  # per head: its KV group; with shared k/v: each LA group once (group-major heads)
    groups = groups if cfg.la_sharing == "none" else groups[::r]
    out["mixer.la.wq"] = wq[:, la_heads]
    out["mixer.la.wk"] = wk[:, groups]
    out["mixer.la.wv"] = wv[:, groups]
    out.update({f"mixer.la.{k}": v for k, v in _la_init(cfg, len(la_heads)).items()})
    if cfg.fusion != "none":
      out["mixer.fusion.la_norm_scale"] = np.ones((len(la_heads), cfg.head_dim), np.float32)
  out["mixer.wo"] = wo[np.concatenate([fa_heads, la_heads])]
  return out


def convert_flat(teacher_flat: dict[str, np.ndarray], student_cfg: ModelConfig) -> dict[str, np.ndarray]:
  """All teacher tensors (canonical names) -> the student's canonical tensors."""
  out = {k: v for k, v in teacher_flat.items() if not k.startswith("layers.")}
  for i in range(student_cfg.num_layers):
    prefix = f"layers.{i}."
    layer = {k[len(prefix):]: v for k, v in teacher_flat.items() if k.startswith(prefix)}
    if not layer:
      raise ValueError(f"teacher weights: no tensors for layer {i} (expected {student_cfg.num_layers} layers)")
    out.update({prefix + k: v for k, v in convert_layer(layer, student_cfg, i).items()})
  return out
