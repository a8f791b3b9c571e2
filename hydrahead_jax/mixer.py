"""The HydraHead mixer: FA and Gated DeltaNet heads inside one layer, one shared output projection.

Head order inside a layer: the ``n_fa`` FA groups come first (their ``n_fa * r`` query heads
contiguous), then the LA heads. Each path runs once on its slice; no Python loop over heads.

Shape letters: B batch, T length, D model, H query heads (Hf FA, Hl LA), G KV groups (Gf FA), K head dim, W conv width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.layers import (
    RMSNorm,
    apply_rope,
    causal_depthwise_conv,
    fan_in_normal,
    l2_normalize,
    make_param,
    rms_normalize,
)
from hydrahead_jax.ops import gated_delta_rule
from hydrahead_jax.sharding import constrain

HEADS_NAMES = ("batch", "length", "heads", "head_dim")
# Fusion in one Pallas kernel (pallas_kernels.fusion_norm): None = on GPU only; True / False force it on / off.
# Off by default until the kernel has been compiled and timed on a GPU (checked so far in interpret mode only).
USE_FUSED_FUSION: bool | None = False


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, T, T] boolean: query and key belong to the same document."""
  return (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]


def attention_implementation(requested: str | None, dtype) -> str:
  """cuDNN flash attention on GPU for half-precision inputs (jax's own default is the O(T^2) XLA path)."""
  if requested is not None:
    return requested
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if half and jax.default_backend() == "gpu" else "xla"


def _inv_softplus(x: jax.Array) -> jax.Array:
  return x + jnp.log(-jnp.expm1(-x))


def _a_log_init(key, shape, dtype):
  """Per-head decay rates A in [1, 16] (log-uniform), stored as log(A)."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def _dt_bias_init(key, shape, dtype):
  """softplus(dt_bias) log-uniform in [1e-3, 1e-1]: long memory at init."""
  dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(1e-3), math.log(1e-1)))
  return _inv_softplus(dt).astype(dtype)


def _conv_identity_init(key, shape, dtype):
  """Near-identity causal conv: last tap (current token) 1, earlier taps small."""
  w = 0.02 * jax.random.normal(key, shape, jnp.float32)
  return w.at[-1].add(1.0).astype(dtype)


class FullAttention(nnx.Module):
  """Causal softmax GQA with QK RMSNorm (Qwen3) and RoPE, for the first ``num_groups`` groups."""

  def __init__(self, cfg: ModelConfig, num_groups: int, *, rngs: nnx.Rngs):
    D, K, r, pd = cfg.d_model, cfg.head_dim, cfg.heads_per_group, cfg.param_dtype
    self.cfg = cfg
    self.wq = make_param(rngs, fan_in_normal(D), (D, num_groups * r, K), ("embed", "heads", "head_dim"), pd)
    self.wk = make_param(rngs, fan_in_normal(D), (D, num_groups, K), ("embed", "kv_heads", "head_dim"), pd)
    self.wv = make_param(rngs, fan_in_normal(D), (D, num_groups, K), ("embed", "kv_heads", "head_dim"), pd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(K, eps=cfg.rms_eps, names=("head_dim",), param_dtype=pd, rngs=rngs)
      self.k_norm = RMSNorm(K, eps=cfg.rms_eps, names=("head_dim",), param_dtype=pd, rngs=rngs)

  def __call__(self, x_BxTxD, cos_sin, segment_ids_BxT):
    dt, K = self.cfg.dtype, self.cfg.head_dim
    q_BxTxHfxK = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wq[...].astype(dt))
    k_BxTxGfxK = jnp.einsum("btd,dgk->btgk", x_BxTxD, self.wk[...].astype(dt))
    v_BxTxGfxK = jnp.einsum("btd,dgk->btgk", x_BxTxD, self.wv[...].astype(dt))
    if self.cfg.qk_norm:
      q_BxTxHfxK, k_BxTxGfxK = self.q_norm(q_BxTxHfxK), self.k_norm(k_BxTxGfxK)
    q_BxTxHfxK = apply_rope(q_BxTxHfxK, *cos_sin)
    k_BxTxGfxK = apply_rope(k_BxTxGfxK, *cos_sin)
    mask = None if segment_ids_BxT is None else segment_mask(segment_ids_BxT)
    o_BxTxHfxK = jax.nn.dot_product_attention(
        q_BxTxHfxK, k_BxTxGfxK, v_BxTxGfxK, mask=mask, is_causal=True, scale=K**-0.5,
        implementation=attention_implementation(self.cfg.fa_implementation, q_BxTxHfxK.dtype),
    )
    return constrain(o_BxTxHfxK, HEADS_NAMES)


class GatedDeltaNet(nnx.Module):
  """``num_heads`` Gated DeltaNet heads; each owns its q/k/v projections (copyable from a teacher's slices)."""

  def __init__(self, cfg: ModelConfig, num_heads: int, *, rngs: nnx.Rngs):
    D, K, W, pd = cfg.d_model, cfg.head_dim, cfg.la_conv_size, cfg.param_dtype
    hk = ("embed", "heads", "head_dim")
    self.cfg = cfg
    self.wq = make_param(rngs, fan_in_normal(D), (D, num_heads, K), hk, pd)
    self.wk = make_param(rngs, fan_in_normal(D), (D, num_heads, K), hk, pd)
    self.wv = make_param(rngs, fan_in_normal(D), (D, num_heads, K), hk, pd)
    conv_names = ("conv", "heads", "head_dim")
    self.conv_q = make_param(rngs, _conv_identity_init, (W, num_heads, K), conv_names, pd)
    self.conv_k = make_param(rngs, _conv_identity_init, (W, num_heads, K), conv_names, pd)
    self.conv_v = make_param(rngs, _conv_identity_init, (W, num_heads, K), conv_names, pd)
    self.a_log = make_param(rngs, _a_log_init, (num_heads,), ("heads",), pd)
    self.dt_bias = make_param(rngs, _dt_bias_init, (num_heads,), ("heads",), pd)
    self.w_a = make_param(rngs, fan_in_normal(D), (D, num_heads), ("embed", "heads"), pd)
    self.w_b = make_param(rngs, fan_in_normal(D), (D, num_heads), ("embed", "heads"), pd)
    if cfg.la_output_gate:
      # gate = SiLU(W_z x + z_bias). The bias lets a converted head start with a constant gate
      # (W_z = 0, large z_bias: SiLU ~ identity-scaled constant, absorbed by the fusion scale).
      self.w_z = make_param(rngs, fan_in_normal(D), (D, num_heads, K), hk, pd)
      self.z_bias = make_param(rngs, nnx.initializers.zeros, (num_heads, K), ("heads", "head_dim"), pd)

  def _conv(self, x_BxTxHxK, w, segment_ids_BxT):
    B, T, H, K = x_BxTxHxK.shape
    y = causal_depthwise_conv(x_BxTxHxK.reshape(B, T, H * K), w[...].astype(x_BxTxHxK.dtype).reshape(-1, H * K),
                              segment_ids_BxT)
    return jax.nn.silu(y).reshape(B, T, H, K)

  def __call__(self, x_BxTxD, segment_ids_BxT):
    """Raw head outputs [B, T, Hl, K] (before fusion) and the output gate (or None)."""
    cfg, dt = self.cfg, self.cfg.dtype
    proj = lambda w: jnp.einsum("btd,dhk->bthk", x_BxTxD, w[...].astype(dt))
    q_BxTxHxK = l2_normalize(self._conv(proj(self.wq), self.conv_q, segment_ids_BxT))
    k_BxTxHxK = l2_normalize(self._conv(proj(self.wk), self.conv_k, segment_ids_BxT))
    v_BxTxHxK = self._conv(proj(self.wv), self.conv_v, segment_ids_BxT)
    a_BxTxH = jnp.einsum("btd,dh->bth", x_BxTxD, self.w_a[...].astype(dt)).astype(jnp.float32)
    b_BxTxH = jnp.einsum("btd,dh->bth", x_BxTxD, self.w_b[...].astype(dt)).astype(jnp.float32)
    g_BxTxH = -jnp.exp(self.a_log[...].astype(jnp.float32)) * jax.nn.softplus(a_BxTxH + self.dt_bias[...])
    beta_BxTxH = jax.nn.sigmoid(b_BxTxH)
    o_BxTxHxK, _ = gated_delta_rule(
        q_BxTxHxK.astype(dt), k_BxTxHxK.astype(dt), v_BxTxHxK, g_BxTxH, beta_BxTxH,
        segment_ids=segment_ids_BxT, chunk_size=cfg.la_chunk_size, implementation=cfg.la_implementation,
    )
    gate = jax.nn.silu(proj(self.w_z) + self.z_bias[...].astype(dt)) if cfg.la_output_gate else None
    return constrain(o_BxTxHxK, HEADS_NAMES), gate


class ScaleNormFusion(nnx.Module):
  """Scale-normalized fusion of FA and LA head outputs (before the shared output projection).

  scale_norm : LA heads gamma_h * RMSNorm(o_h) (gamma per head and channel), FA heads s_h * o_h.
  rmsnorm_all: every head gamma_h * RMSNorm(o_h).
  none       : raw outputs.
  The LA output gate SiLU(W_z x) multiplies after the normalisation.
  """

  def __init__(self, cfg: ModelConfig, num_fa_heads: int, num_la_heads: int, *, rngs: nnx.Rngs):
    K, pd = cfg.head_dim, cfg.param_dtype
    self.variant, self.eps = cfg.fusion, cfg.rms_eps
    ones = nnx.initializers.ones
    if self.variant == "scale_norm" and num_fa_heads:
      self.fa_scale = make_param(rngs, ones, (num_fa_heads,), ("heads",), pd)
    if self.variant == "rmsnorm_all" and num_fa_heads:
      self.fa_norm_scale = make_param(rngs, ones, (num_fa_heads, K), ("heads", "head_dim"), pd)
    if self.variant != "none" and num_la_heads:
      self.la_norm_scale = make_param(rngs, ones, (num_la_heads, K), ("heads", "head_dim"), pd)

  def fa(self, o_BxTxHxK):
    if self.variant == "scale_norm":
      return o_BxTxHxK * self.fa_scale[...].astype(o_BxTxHxK.dtype)[:, None]
    if self.variant == "rmsnorm_all":
      return (rms_normalize(o_BxTxHxK, self.eps) * self.fa_norm_scale[...]).astype(o_BxTxHxK.dtype)
    return o_BxTxHxK

  def fused(self, o_BxTxHxK, num_fa_heads, gate_BxTxHlxK):
    """fa() and la() over all heads in one Pallas kernel (same math, float32 inside)."""
    from pallas_kernels.fusion_norm import fused_head_fusion
    get = lambda name: getattr(self, name)[...] if hasattr(self, name) else None  # noqa: E731
    return fused_head_fusion(o_BxTxHxK, num_fa_heads, self.variant, get("fa_scale"), get("fa_norm_scale"),
                             get("la_norm_scale"), gate_BxTxHlxK, self.eps)

  def la(self, o_BxTxHxK, gate_BxTxHxK):
    out = o_BxTxHxK.astype(jnp.float32)
    if self.variant != "none":
      out = rms_normalize(out, self.eps) * self.la_norm_scale[...]
    if gate_BxTxHxK is not None:
      out = out * gate_BxTxHxK.astype(jnp.float32)
    return out.astype(o_BxTxHxK.dtype)


class HydraHeadMixer(nnx.Module):
  """One layer's attention: FA groups [0, n_fa) and LA heads for the rest, fused, then W_o."""

  def __init__(self, cfg: ModelConfig, num_fa_groups: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.num_fa_heads = num_fa_groups * cfg.heads_per_group
    self.num_la_heads = cfg.num_heads - self.num_fa_heads
    if self.num_fa_heads:
      self.fa = FullAttention(cfg, num_fa_groups, rngs=rngs)
    if self.num_la_heads:
      self.la = GatedDeltaNet(cfg, self.num_la_heads, rngs=rngs)
    self.fusion = ScaleNormFusion(cfg, self.num_fa_heads, self.num_la_heads, rngs=rngs)
    H, K, D = cfg.num_heads, cfg.head_dim, cfg.d_model
    self.wo = make_param(rngs, fan_in_normal(H * K), (H, K, D), ("heads", "head_dim", "embed"), cfg.param_dtype)

  def __call__(self, x_BxTxD, cos_sin, segment_ids_BxT, patch=None):
    """Returns (y [B, T, D], raw head outputs [B, T, H, K] before fusion).

    ``patch`` = (mask [H], values [B, T, H, K]) replaces raw head outputs where mask is 1
    (activation patching for head selection).
    """
    raw, fused_parts = [], []
    gate = None
    if self.num_fa_heads:
      raw.append(self.fa(x_BxTxD, cos_sin, segment_ids_BxT))
    if self.num_la_heads:
      o_la, gate = self.la(x_BxTxD, segment_ids_BxT)
      raw.append(o_la.astype(self.cfg.dtype))
    raw_BxTxHxK = raw[0] if len(raw) == 1 else jnp.concatenate(raw, axis=2)
    if patch is not None:
      mask_H, values_BxTxHxK = patch
      m = mask_H.astype(raw_BxTxHxK.dtype)[:, None]
      raw_BxTxHxK = raw_BxTxHxK * (1 - m) + values_BxTxHxK.astype(raw_BxTxHxK.dtype) * m
    Hf = self.num_fa_heads
    use_kernel = jax.default_backend() == "gpu" if USE_FUSED_FUSION is None else USE_FUSED_FUSION
    if use_kernel:
      fused_parts.append(self.fusion.fused(raw_BxTxHxK, Hf, gate))
    if Hf and not use_kernel:
      fused_parts.append(self.fusion.fa(raw_BxTxHxK[:, :, :Hf]))
    if self.num_la_heads and not use_kernel:
      fused_parts.append(self.fusion.la(raw_BxTxHxK[:, :, Hf:], gate))
    fused = fused_parts[0] if len(fused_parts) == 1 else jnp.concatenate(fused_parts, axis=2)
    y_BxTxD = jnp.einsum("bthk,hkd->btd", fused.astype(self.cfg.dtype), self.wo[...].astype(self.cfg.dtype))
    return y_BxTxD, raw_BxTxHxK
